"""Tests for budget_client._tokenizer: offline vocabularies, exact streaming counts, prompts.

Everything runs against real tiktoken encodings; the only stand-ins are a counting
subclass of tiktoken.Encoding and a counting wrapper around the real pre-tokenizer regex,
used to measure how much text the incremental counter re-processes.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from importlib import util as importlib_util
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessage

from budget_client import _tokenizer as tok
from budget_client._tokenizer import (
    IMAGE_PART_TOKEN_ESTIMATE,
    IncrementalTokenCounter,
    TokenizerDataError,
    count_chat_prompt_tokens,
    count_text,
    get_encoding_for_model,
    seed_tiktoken_cache,
)

ENCODINGS = ("o200k_base", "cl100k_base")
_MODEL_FOR = {"o200k_base": "gpt-4o", "cl100k_base": "gpt-4"}


def _enc(name: str) -> tiktoken.Encoding:
    enc = get_encoding_for_model(_MODEL_FOR[name])
    assert enc.name == name
    return enc


def _n(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


# ---------------------------------------------------------------------------------------
# Offline vocabularies
# ---------------------------------------------------------------------------------------

_OPENAI_PUBLIC = Path(str(importlib_util.find_spec("tiktoken_ext.openai_public").origin))  # type: ignore[union-attr]


def _published_hashes() -> dict[str, str]:
    """url -> expected_hash, as tiktoken_ext/openai_public.py passes them to tiktoken."""
    source = _OPENAI_PUBLIC.read_text()
    pairs = re.findall(r'load_tiktoken_bpe\(\s*"([^"]+)",\s*expected_hash="([0-9a-f]{64})"', source)
    return dict(pairs)


def test_pinned_urls_and_hashes_equal_tiktoken_source() -> None:
    published = _published_hashes()
    assert len(published) >= 4  # r50k, p50k, cl100k, o200k: the regex really parsed the file
    for name in ENCODINGS:
        vocab = tok._BUNDLED[name]
        assert vocab.url.endswith(f"/{name}.tiktoken")
        assert published[vocab.url] == vocab.sha256


def test_seed_writes_verified_files_under_tiktoken_cache_names(tmp_path: Path) -> None:
    assert seed_tiktoken_cache(tmp_path) == tmp_path
    published = _published_hashes()
    for name in ENCODINGS:
        url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
        cached = tmp_path / hashlib.sha1(url.encode()).hexdigest()  # tiktoken/load.py's key
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == published[url]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        hashlib.sha1(tok._BUNDLED[name].url.encode()).hexdigest() for name in ENCODINGS
    )


def test_seed_is_idempotent_and_repairs_a_corrupt_cache_file(tmp_path: Path) -> None:
    seed_tiktoken_cache(tmp_path)
    o200k = tmp_path / tok._BUNDLED["o200k_base"].cache_name
    cl100k = tmp_path / tok._BUNDLED["cl100k_base"].cache_name
    before = o200k.stat()
    cl100k.write_bytes(b"truncated download")

    seed_tiktoken_cache(tmp_path)

    after = o200k.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert hashlib.sha256(cl100k.read_bytes()).hexdigest() == tok._BUNDLED["cl100k_base"].sha256


def test_hash_mismatch_raises_and_installs_nothing(tmp_path: Path) -> None:
    source = tmp_path / "o200k_base.tiktoken.gz"
    source.write_bytes(gzip.compress(b"aGVsbG8= 0\n"))
    dest_dir = tmp_path / "cache"
    dest = dest_dir / tok._BUNDLED["o200k_base"].cache_name
    with pytest.raises(TokenizerDataError, match="SHA-256"):
        tok._install_verified(source, dest, tok._BUNDLED["o200k_base"].sha256)
    assert not dest_dir.exists() or list(dest_dir.iterdir()) == []


def test_concurrent_seeding_from_threads_and_processes(tmp_path: Path) -> None:
    script = (
        f"import pathlib, {tok.__name__} as t; "
        f"t.seed_tiktoken_cache(pathlib.Path({str(tmp_path)!r}))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    errors: list[BaseException] = []

    def seed() -> None:
        try:
            seed_tiktoken_cache(tmp_path)
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=seed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert errors == []
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(tok._BUNDLED[n].cache_name for n in ENCODINGS)  # no stray temp files
    for name in ENCODINGS:
        data = (tmp_path / tok._BUNDLED[name].cache_name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == tok._BUNDLED[name].sha256


def _offline_env(**extra: str) -> dict[str, str]:
    """The current environment with every download routed to a closed port."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in {"TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "NO_PROXY"}
    }
    blackhole = "http://127.0.0.1:9"
    env |= {"HTTPS_PROXY": blackhole, "HTTP_PROXY": blackhole}
    env |= {"https_proxy": blackhole, "http_proxy": blackhole}
    env |= extra
    return env


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_blocked_network_really_blocks_tiktoken_downloads(tmp_path: Path) -> None:
    # Control for the offline test below: without seeding, tiktoken must fail here.
    result = _run_python(
        "import tiktoken; tiktoken.get_encoding('cl100k_base')",
        _offline_env(TIKTOKEN_CACHE_DIR=str(tmp_path)),
    )
    assert result.returncode != 0
    assert "ProxyError" in result.stderr or "ConnectionError" in result.stderr


def test_encodings_load_with_no_network_and_an_empty_cache(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    result = _run_python(
        """
        import json
        from budget_client._tokenizer import get_encoding_for_model
        out = {}
        for model in ("gpt-4o", "gpt-4"):
            enc = get_encoding_for_model(model)
            out[model] = [enc.name, enc.encode_ordinary("hello world")]
        print(json.dumps(out))
        """,
        _offline_env(TIKTOKEN_CACHE_DIR=str(cache)),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "gpt-4o": ["o200k_base", [24912, 2375]],
        "gpt-4": ["cl100k_base", [15339, 1917]],
    }
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        tok._BUNDLED[n].cache_name for n in ENCODINGS
    )


def test_unset_cache_dir_is_pinned_to_a_per_user_directory(tmp_path: Path) -> None:
    env = _offline_env(HOME=str(tmp_path))
    env.pop("XDG_CACHE_HOME", None)
    result = _run_python(
        """
        import os
        from budget_client._tokenizer import get_encoding_for_model
        assert get_encoding_for_model("gpt-4o").encode_ordinary("hello world") == [24912, 2375]
        print(os.environ["TIKTOKEN_CACHE_DIR"])
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    expected = tmp_path / ".cache" / "budgetd" / "tiktoken"
    assert result.stdout.strip() == str(expected)
    assert len(list(expected.iterdir())) == 2


def test_caching_disabled_by_empty_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(TokenizerDataError, match="caching is disabled"):
        seed_tiktoken_cache()


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-oss-120b", "o200k_harmony"),
        ("some-model-from-next-year", "o200k_base"),
    ],
)
def test_model_to_encoding(model: str, encoding: str) -> None:
    enc = get_encoding_for_model(model)
    assert enc.name == encoding
    assert get_encoding_for_model(model) is enc


def test_unbundled_legacy_encoding_is_refused_not_downloaded() -> None:
    with pytest.raises(TokenizerDataError, match="p50k_base"):
        get_encoding_for_model("text-davinci-003")


def test_count_text_treats_special_token_text_as_ordinary() -> None:
    enc = _enc("o200k_base")
    assert count_text(enc, "hello world") == 2
    assert count_text(enc, "<|endoftext|>") == len(enc.encode_ordinary("<|endoftext|>")) > 1


# ---------------------------------------------------------------------------------------
# Incremental counting
# ---------------------------------------------------------------------------------------

CORPORA = {
    "english": (
        "The quick brown fox jumps over the lazy dog. It wasn't the first time; the dog's "
        "owner had said so twice.\n\nMeanwhile, in 1999, a committee of 12 people met for "
        '3.5 hours to decide nothing at all. "Why?" asked Dr. O\'Neill — nobody knew.'
    ),
    "python": (
        "def fib(n: int) -> int:\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b  # advance\n"
        "    return a\n\n\n"
        "if __name__ == '__main__':\n"
        "\tprint(f\"{fib(30)=}\", end='\\n')\n"
        "    xs = [i ** 2 for i in range(10) if i % 3 != 0]\n"
    ),
    "chinese": (
        "我们今天去公园散步，天气非常好。你好，世界！"
        "这是一个测试：中文分词与标点符号。2024年5月13日。"
    ),
    "emoji": (
        "Family 👨\u200d👩\u200d👧\u200d👦 and 🧑🏿\u200d💻 coder, 👍🏽👍🏻 thumbs, ❤️\u200d🔥, "
        "🏳️\u200d🌈 flag, 🇫🇷🇯🇵 flags, keycap 1️⃣ end 🫠🫠🫠"
    ),
    "whitespace": "para" + "\n\n\n   \t   " * 60 + "end" + " " * 2000 + "y\r\n\r\n  \t\n",
    "numbers": "3.14159 2718281828459045 1,000,000.00 -42 0x1F 2024-05-13T12:00:00Z 99.9% $1234",
    "contractions": (
        "Don't stop. It's John's car; they'll say we've, I'd, you're, I'M, HE'S, she'S, "
        "we'Re 'twas rock'n'roll ''s don' t can't've"
    ),
    "tool_arguments": '{"location": "San Francisco, CA", "unit": "celsius", "days": [1, 2, 3]}',
}


def _single_chars(text: str) -> list[str]:
    return list(text)


def _random_sizes(text: str) -> list[str]:
    rng = random.Random(len(text))
    chunks, i = [], 0
    while i < len(text):
        size = rng.randint(1, 9)
        chunks.append(text[i : i + size])
        i += size
    return chunks


def _word_sized(text: str) -> list[str]:
    return regex.findall(r"\s*\S+|\s+", text)


SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "single_chars": _single_chars,
    "random_sizes": _random_sizes,
    "word_sized": _word_sized,
}


def _assert_exact_after_every_chunk(
    enc: tiktoken.Encoding, chunks: list[str], counter: IncrementalTokenCounter | None = None
) -> None:
    counter = counter if counter is not None else IncrementalTokenCounter(enc)
    so_far = ""
    for i, chunk in enumerate(chunks):
        so_far += chunk
        expected = len(enc.encode_ordinary(so_far))
        assert counter.feed(chunk) == expected, (i, so_far[-40:])
        assert counter.count == expected


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("splitter", SPLITTERS)
@pytest.mark.parametrize("corpus", CORPORA)
def test_incremental_equals_full_encode_after_every_chunk(
    encoding: str, splitter: str, corpus: str
) -> None:
    text = CORPORA[corpus]
    chunks = SPLITTERS[splitter](text)
    assert "".join(chunks) == text
    _assert_exact_after_every_chunk(_enc(encoding), chunks)


@pytest.mark.parametrize(
    "chunks",
    [
        ["don", "'", "t"],  # two pieces ("don", "'") become one ("don't")
        ["\n  ", "\n"],  # "\n" then "  " become one newline-run piece
        ["\n", " ", "\n"],
    ],
)
def test_holding_back_one_piece_is_not_enough(chunks: list[str]) -> None:
    class HoldOne(IncrementalTokenCounter):
        HOLD_BACK = 2 - 1

    enc = _enc("o200k_base")
    text = "".join(chunks)
    one = HoldOne(enc)
    for chunk in chunks:
        one.feed(chunk)
    assert one.count != len(enc.encode_ordinary(text))  # the failure HOLD_BACK=2 prevents
    _assert_exact_after_every_chunk(enc, chunks)


def test_empty_chunks_change_nothing() -> None:
    enc = _enc("o200k_base")
    counter = IncrementalTokenCounter(enc)
    assert counter.feed("") == 0
    _assert_exact_after_every_chunk(enc, ["Hello", "", " wor", "", "ld", ""], counter)


def test_one_counter_per_tool_call_counts_streamed_arguments() -> None:
    enc = _enc("o200k_base")
    calls = {"call_a": '{"city": "Paris"}', "call_b": '{"query": "weather in Oslo", "n": 3}'}
    counters = {call_id: IncrementalTokenCounter(enc) for call_id in calls}
    for step in range(max(map(len, calls.values()))):  # interleaved deltas, 1 char each
        for call_id, args in calls.items():
            counters[call_id].feed(args[step : step + 1])
    assert {k: c.count for k, c in counters.items()} == {
        k: len(enc.encode_ordinary(v)) for k, v in calls.items()
    }


_BOUNDARY_FRAGMENTS = ["\n", " ", "\t", "'", "t", "re", "don", "A", ".", "1"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_short_sequence_of_boundary_fragments(encoding: str) -> None:
    # Random texts rarely hit a case where a wrong split changes the *count* (BPE often
    # tokenizes the parts the same way as the whole), so enumerate every sequence of up to
    # four fragments that move piece boundaries, one fragment per chunk. With HOLD_BACK=1
    # this finds 56 miscounts on o200k_base.
    enc = _enc(encoding)
    for n in range(1, 5):
        for seq in itertools.product(_BOUNDARY_FRAGMENTS, repeat=n):
            _assert_exact_after_every_chunk(enc, list(seq))


# Grouped so that each kind of text is drawn equally often: apostrophes and whitespace
# are where piece boundaries move, so they must not drown in a sea of single letters.
_FRAGMENT_GROUPS: list[list[str]] = [
    ["a", "A", "z", "Z", "é", "É", "ß", "ñ", "don", "The", "we", "I", "x"],
    ["'", "'s", "'t", "'re", "'ll", "'ve", "'d", "'M", "'S"],
    [" ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\n ", "\u00a0", "\u3000"],
    [*"0123456789", "123456", "3.14"],
    [*'.,;:!?-_/\\()[]{}"`~@#$%^&*=+<>|', "==", "->", "//"],
    ["你", "好", "世", "界", "。", "，", "ا", "ع", "ر"],
    ["👍", "🏽", "👨", "👩", "👧", "❤", "🇫", "🇷", "\u200d", "\ufe0f"],
    ["\u0301", "\u0308", "Ǆ", "ǅ", "ǆ", "ʰ", "Ⅻ", "½", "١"],
]
_FRAGMENT = st.sampled_from(_FRAGMENT_GROUPS).flatmap(st.sampled_from)


@settings(max_examples=300, deadline=None, database=None)
@given(
    encoding=st.sampled_from(ENCODINGS),
    parts=st.lists(_FRAGMENT, min_size=1, max_size=60),
    sizes=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=30),
)
def test_property_random_text_random_splits(
    encoding: str, parts: list[str], sizes: list[int]
) -> None:
    # Chunk sizes are drawn (and cycled) rather than cut positions, so that most examples
    # put chunk boundaries between nearly every pair of pieces.
    text = "".join(parts)
    chunks, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= len(text):
            break
        chunks.append(text[start : start + size])
        start += size
    _assert_exact_after_every_chunk(_enc(encoding), chunks)


class _CountingEncoding(tiktoken.Encoding):
    """A real tiktoken Encoding that also counts the characters it is asked to encode."""

    def __init__(self, base: tiktoken.Encoding) -> None:
        super().__init__(
            name=f"counting-{base.name}",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens=base._special_tokens,
        )
        self.chars_encoded = 0

    def encode_ordinary(self, text: str) -> list[int]:
        self.chars_encoded += len(text)
        return super().encode_ordinary(text)


def _english_response(enc: tiktoken.Encoding, n_tokens: int) -> str:
    from pydoc_data.topics import topics  # the stdlib's own English reference text

    corpus = "\n\n".join(topics[key] for key in sorted(topics))
    return enc.decode(enc.encode_ordinary(corpus)[:n_tokens])


def _four_char_chunks(text: str) -> Iterator[str]:
    rng = random.Random(7)
    i = 0
    while i < len(text):
        size = rng.randint(1, 7)  # mean 4
        yield text[i : i + size]
        i += size


def test_work_is_linear_in_response_length(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _enc("o200k_base")
    enc = _CountingEncoding(base)
    split_chars = 0
    pattern = regex.compile(base._pat_str)

    def counting_split(text: str) -> list[str]:
        nonlocal split_chars
        split_chars += len(text)
        return list(pattern.findall(text))

    monkeypatch.setitem(tok._splitters, base._pat_str, counting_split)
    text = _english_response(base, 8000)
    chunks = list(_four_char_chunks(text))
    counter = IncrementalTokenCounter(enc)
    for chunk in chunks:
        counter.feed(chunk)

    assert counter.count == len(base.encode_ordinary(text)) >= 7900
    assert 0 < enc.chars_encoded < 20 * len(text)
    assert 0 < split_chars < 20 * len(text)
    # The bound can fail: re-encoding the whole text per chunk would cost this much.
    naive = sum(range(4, len(text) + 1, 4))  # prefix lengths at every 4th character
    assert naive > 500 * len(text)


# ---------------------------------------------------------------------------------------
# Prompt counting
# ---------------------------------------------------------------------------------------

# Example from OpenAI's cookbook "How to count tokens with tiktoken" (section 6); the
# cookbook reports the API's own prompt_tokens for it: 129 on gpt-4, 124 on gpt-4o.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# Section 7's tool example; the API reported 105 prompt tokens on gpt-4, 101 on gpt-4o.
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(("model", "api_count"), [("gpt-4", 129), ("gpt-4o", 124)])
def test_cookbook_messages_match_the_api_count(model: str, api_count: int) -> None:
    assert count_chat_prompt_tokens(COOKBOOK_MESSAGES, model) == api_count


@pytest.mark.parametrize(("model", "api_count"), [("gpt-4", 105), ("gpt-4o", 101)])
def test_cookbook_tools_match_the_api_count(model: str, api_count: int) -> None:
    assert count_chat_prompt_tokens(COOKBOOK_TOOL_MESSAGES, model, COOKBOOK_TOOLS) == api_count


def test_hand_computed_multimodal_and_tool_call_messages_gpt_4o() -> None:
    enc = tiktoken.get_encoding("o200k_base")
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "cat"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "A cat."},
    ]
    expected = (
        3  # reply primer
        + (3 + _n(enc, "system") + _n(enc, "You are terse."))
        + (3 + _n(enc, "user") + _n(enc, "alice") + 1 + _n(enc, "What is in this picture?") + 765)
        + (3 + _n(enc, "assistant") + _n(enc, "lookup") + _n(enc, '{"q": "cat"}'))
        + (3 + _n(enc, "tool") + _n(enc, "call_1") + _n(enc, "A cat."))
    )
    assert IMAGE_PART_TOKEN_ESTIMATE == 765
    assert count_chat_prompt_tokens(messages, "gpt-4o") == expected


def test_hand_computed_tools_gpt_4() -> None:
    enc = tiktoken.get_encoding("cl100k_base")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "description": "City name."},
                        "unit": {"type": "string", "description": "Unit", "enum": ["c", "f"]},
                    },
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "now",
                "description": "Current time",
                "parameters": {"type": "object", "properties": {}},
            },
        },
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = 10, 3, 3, -3, 3, 12
    expected_tools = (
        func_init
        + _n(enc, "get_weather:Get the weather")  # trailing "." dropped, as in the cookbook
        + prop_init
        + (prop_key + _n(enc, "city:string:City name"))
        + (prop_key + enum_init + enum_item + _n(enc, "c") + enum_item + _n(enc, "f"))
        + _n(enc, "unit:string:Unit")
        + func_init
        + _n(enc, "now:Current time")
        + func_end
    )
    expected_messages = 3 + _n(enc, "user") + _n(enc, "Weather in Paris?") + 3
    assert count_chat_prompt_tokens(messages, "gpt-4", tools) == expected_messages + expected_tools
    assert count_chat_prompt_tokens(messages, "gpt-4", []) == expected_messages


def test_pydantic_messages_count_like_dicts() -> None:
    enc = tiktoken.get_encoding("o200k_base")
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    as_model = ChatCompletionMessage(role="assistant", content="Sure.", tool_calls=[call])
    as_dict = {"role": "assistant", "content": "Sure.", "tool_calls": [call]}
    expected = 3 + (3 + _n(enc, "assistant") + _n(enc, "Sure.") + _n(enc, "f") + _n(enc, "{}"))
    assert count_chat_prompt_tokens([as_model], "gpt-4o") == expected
    assert count_chat_prompt_tokens([as_dict], "gpt-4o") == expected


def test_non_message_is_rejected() -> None:
    with pytest.raises(TypeError, match="message must be"):
        count_chat_prompt_tokens(["hello"], "gpt-4o")  # type: ignore[list-item]
