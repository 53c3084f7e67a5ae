"""Deterministic filler text in several styles, as an endless stream of pieces.

The styles exist to exercise the tokenizer, not to read well: English is the
easy case, code has indentation and punctuation runs, Chinese has multi-byte
characters (a few rare ones that o200k_base splits into byte tokens), and the
emoji style has ZWJ sequences, flags and skin tones whose tokens end in the
middle of a UTF-8 sequence.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Literal, get_args

TextStyle = Literal["english", "code", "chinese", "emoji", "mixed"]
TEXT_STYLES: tuple[str, ...] = get_args(TextStyle)


def _split(words: str) -> tuple[str, ...]:
    return tuple(words.split())


_WORDS = _split(
    "the budget token stream model request limit service client server tenant cost "
    "price window minute second reply answer prompt cache retry error network socket "
    "quick brown fox jumps over lazy dog river mountain garden window coffee paper "
    "light music quiet yesterday tomorrow always never often simple careful honest "
    "measure count spend save share abort close open send receive wait check return "
    "because although while before after during without within between across every "
    "system engineer design test result number value table graph signal noise delay"
)

_IDENTS = _split("budget tokens spent limit chunk delta usage reply tenant window rate cost")

_CHINESE = _split(
    "预算 令牌 模型 请求 服务器 客户端 流式 响应 限制 计费 今天 天气 很好 我们 "
    "一起 学习 编程 数据 网络 连接 关闭 发送 接收 等待 检查 结果 数字 时间 分钟 秒钟 "
    "龘 䶮 𠀀 𪚥 𰻞 鱻 麤"
)
_CHINESE_PUNCT = ("，", "，", "、", "。", "！", "？", "；")

_EMOJI = _split("😀 🚀 👍🏽 👩‍💻 🇯🇵 🇫🇷 ❤️ 🧑‍🤝‍🧑 🫠 🦀 ✨ 🎉 🐍 👨‍👩‍👧‍👦 🏳️‍🌈 🤖 💸 ⏱️ 🔥 🙏🏿")


def _english_sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.choice((7, 42, 365, 2024, 1000000))))
    if rng.random() < 0.4:
        words[rng.randrange(len(words) - 1)] += ","
    text = " ".join(words)
    end = rng.choice((". ", ". ", ". ", "? ", "! "))
    if rng.random() < 0.15:
        end = end.rstrip() + "\n\n"
    return text[0].upper() + text[1:] + end


def _code_block(rng: random.Random) -> str:
    a, b, c = rng.sample(_IDENTS, 3)
    n = rng.randint(2, 999)
    return (
        f"def {a}_{b}({a}: int, {b}: float = {n / 10}) -> dict[str, int]:\n"
        f'    """Return the {c} for {a}."""\n'
        f"    {c} = ({a} * {n}) // max({b}, 1)\n"
        f"    if {c} >= {n} and not {a} % 3:\n"
        f'        return {{"{c}": {c}, "{a}": [{a}, {n}]}}\n'
        f"    return {{}}\n\n"
    )


def _chinese_sentence(rng: random.Random) -> str:
    parts = [rng.choice(_CHINESE) for _ in range(rng.randint(4, 10))]
    out = "".join(p + (rng.choice(_CHINESE_PUNCT[:3]) if rng.random() < 0.2 else "") for p in parts)
    return out + rng.choice(_CHINESE_PUNCT[3:]) + ("\n" if rng.random() < 0.15 else "")


def _emoji_sentence(rng: random.Random) -> str:
    parts = [
        rng.choice(_EMOJI) if rng.random() < 0.5 else rng.choice(_WORDS)
        for _ in range(rng.randint(4, 10))
    ]
    return " ".join(parts) + rng.choice((" ", "! ", "\n"))


_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "english": _english_sentence,
    "code": _code_block,
    "chinese": _chinese_sentence,
    "emoji": _emoji_sentence,
}


def iter_pieces(style: str, seed: int) -> Iterator[str]:
    """Yield an endless, seed-determined stream of text pieces in `style`.

    A longer reply for the same seed is an extension of a shorter one, so a test
    can compare replies of different lengths.
    """
    rng = random.Random(seed)
    if style == "mixed":
        makers = list(_MAKERS.values())
        while True:
            yield rng.choice(makers)(rng)
    try:
        maker = _MAKERS[style]
    except KeyError:
        raise ValueError(f"unknown text style {style!r}; expected one of {TEXT_STYLES}") from None
    while True:
        yield maker(rng)
