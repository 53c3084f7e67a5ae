"""Replies made of real o200k_base tokens, and prompt counting like OpenAI's.

The fake must report the same numbers a client-side tiktoken counter computes,
otherwise a budget test cannot tell a metering bug from a fake-server artefact.
So a reply is a token list `ids` with `encode(decode(ids)) == ids`: counting the
text it sent gives back exactly the `completion_tokens` it reported.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tiktoken

from budget_client._tokenizer import get_encoding_for_model
from budget_client.testing._styles import iter_pieces

# The fake always speaks o200k_base (the gpt-4o / gpt-4.1 / o-series tokenizer),
# whatever model name the request carries: use such a model name in tests so that
# client-side counting picks the same encoding.
_MODEL_FOR_ENCODING = "gpt-4o"

# Appended one at a time when cutting the generated text at exactly N tokens
# left it short; each is accepted only if it adds exactly one token.
_FILLERS = (" a", ".", "\n", " ", "a", "!")


def get_encoding() -> tiktoken.Encoding:
    """o200k_base, loaded offline by the client's tokenizer module (cached there)."""
    return get_encoding_for_model(_MODEL_FOR_ENCODING)


@dataclass(frozen=True)
class Reply:
    """A planned reply: its text, its token ids and how they are grouped into chunks."""

    text: str
    ids: tuple[int, ...]

    def chunks(self) -> Iterator[tuple[str, int]]:
        """Yield `(text, n_tokens)`, one token per chunk where the bytes allow it.

        A token may end inside a UTF-8 sequence (rare CJK characters, emoji with
        modifiers), and a chunk's `content` must be a valid string, so bytes are
        buffered until they decode: such a chunk carries 2 or more tokens.
        """
        enc = get_encoding()
        buf = b""
        pending = 0
        for token in self.ids:
            buf += enc.decode_single_token_bytes(token)
            pending += 1
            try:
                piece = buf.decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield piece, pending
            buf, pending = b"", 0
        if buf:  # impossible for ids of valid text; fail loudly rather than drop bytes
            raise ValueError("reply ends inside a UTF-8 sequence")


@functools.lru_cache(maxsize=32)
def build_reply(n_tokens: int, style: str, seed: int) -> Reply:
    """Deterministic text of exactly `n_tokens` o200k_base tokens in `style`.

    Cached: benchmarks repeat the same request, and building runs on the server's
    event loop, where it would delay other streams' writes and disconnect checks.
    """
    if n_tokens <= 0:
        return Reply("", ())
    enc = get_encoding()
    pieces = iter_pieces(style, seed)
    parts: list[str] = []
    chars = 0
    target = n_tokens * 4 + 16
    while True:
        while chars < target:
            parts.append(next(pieces))
            chars += len(parts[-1])
        ids = enc.encode_ordinary("".join(parts))
        if len(ids) >= n_tokens:
            break
        target = int(chars * (n_tokens + 8) / max(len(ids), 1) * 1.2) + 16
    text, head = _cut(enc, ids, n_tokens)
    text, head = _pad(enc, text, head, n_tokens)
    return Reply(text, tuple(head))


def _cut(enc: tiktoken.Encoding, ids: Sequence[int], n: int) -> tuple[str, list[int]]:
    """Longest prefix of at most `n` tokens that is valid text and re-encodes to itself.

    Cutting BPE output at an arbitrary token can land inside a character or leave
    a word tail that would encode differently on its own.
    """
    for k in range(n, -1, -1):
        head = list(ids[:k])
        try:
            text = enc.decode_bytes(head).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if enc.encode_ordinary(text) == head:
            return text, head
    return "", []  # unreachable: k == 0 always matches


def _pad(enc: tiktoken.Encoding, text: str, head: list[int], n: int) -> tuple[str, list[int]]:
    """Top `text` up to exactly `n` tokens with single-token fillers."""
    while len(head) < n:
        for filler in _FILLERS:
            ids = enc.encode_ordinary(text + filler)
            if len(ids) == len(head) + 1 and ids[: len(head)] == head:
                text, head = text + filler, ids
                break
        else:
            raise RuntimeError(f"cannot extend {text[-20:]!r} by one token")
    return text, head


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens by OpenAI's published chat formula for gpt-4o-class models.

    3 tokens of framing per message, +1 for a `name`, the encoded role, content
    and name strings, and 3 tokens priming the assistant reply. Non-text content
    parts (images, audio) are not counted: the fake has no price for them.
    """
    enc = get_encoding()
    total = 3
    for message in messages:
        total += 3
        for key in ("role", "content", "name"):
            value = message.get(key)
            for text in _texts(value):
                total += len(enc.encode_ordinary(text))
            if key == "name" and value is not None:
                total += 1
    return total


def _texts(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]
