"""`wrap_openai` with the official SDK (AsyncOpenAI and OpenAI) against the local fake
OpenAI server and a real budgetd, on SQLite and PostgreSQL.

The fake records exactly what reached its socket, so a cut-off stream can be checked from
both ends: the ledger charged what the client counted, and what the client counted is what
the provider sent, short only of the tokens in flight when the stream was closed.

The sync client runs in a worker thread (`asyncio.to_thread`): budgetd runs in the test's
event loop, which must stay free to serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import openai
import pytest
import tiktoken
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from budget_client import BudgetClient, BudgetExceeded, SyncBudgetClient, wrap_openai
from budget_client._openai import (
    COUNT_AFTER_CUT_S,
    YIELD_EVERY_CHUNKS,
    MeteredAsyncStream,
    count_chunk,
)
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._tokenizer import count_chat_prompt_tokens, get_encoding_for_model
from budget_client.testing import FakeOpenAIServer, RequestRecord
from tests.support.ledger import all_entries, assert_ledger_clean, create
from tests.support.meter import WAIT_S, wait_until
from tests.support.servers import Stubs

MODEL = "gpt-4o"  # o200k_base, the fake's tokenizer
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]
# Tools make the client's prompt estimate (which counts them) differ from the fake's
# prompt_tokens (which does not), so a test can tell whose figure was committed.
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up in the dictionary.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
        },
    }
]

RUNAWAY_TOKENS = 5000
APP_WORK_S = 0.2  # an app that stops reading early works on what it read first
RUNAWAY_RATE = 500  # tokens/s: a fast model; 1,000 tokens take 2 s
ABORT_PATH_S = 1.0
"""Latency allowed on the abort path: from the client's count reaching the grant (a final
one: the client cuts there itself; the sync client via its loop thread) to the fake seeing
the disconnect. Tokens the fake sends meanwhile are counted after the grant (overage): the
client reads on until the fake, having seen the cut, ends the response. Measured here
(fake, budgetd and client in one process on 2 cores): 0-1 token past the grant on an idle
machine (under 2 ms); with other test suites loading it to 3-6x its cores, usually 0-3, at
worst 385 (a 770 ms stall). The bound is therefore a
loose one, kept so the test does not flake on a shared machine; it still catches the real
failures (a `break` without a close lets all 5,000 tokens through, an abort waiting for
the 5 s heartbeat 2,500). The tight latency figures are the benchmarks' job."""
BEYOND_GRANT_MAX = math.ceil(RUNAWAY_RATE * ABORT_PATH_S)  # 500 tokens


@pytest.fixture(params=["async", "sync"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIServer]:
    """One fake for the module; each test finds its own requests by id."""
    with FakeOpenAIServer(tokens=RUNAWAY_TOKENS, tokens_per_second=RUNAWAY_RATE) as server:
        yield server


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return get_encoding_for_model(MODEL)


# ----------------------------------------------------------------------------- the app


@dataclass
class Outcome:
    """What an app saw of one metered call."""

    chunks: list[ChatCompletionChunk]
    error: BudgetExceeded | None
    reservation_id: str
    completion: ChatCompletion | None = None


async def _call_async(
    address: str,
    spool_dir: Path,
    base_url: str,
    budget_id: str,
    stop_after: int | None = None,
    **kwargs: Any,
) -> Outcome:
    chunks: list[ChatCompletionChunk] = []
    reservation_id = ""
    async with (
        BudgetClient(address, spool_dir=spool_dir) as budgets,
        openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0) as raw,
    ):
        client: Any = wrap_openai(raw, budgets)  # `budget=` is ours, not in the SDK types
        try:
            result = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, budget=budget_id, **kwargs
            )
            if not kwargs.get("stream"):
                return Outcome([], None, "", completion=result)
            assert isinstance(result, MeteredAsyncStream)
            reservation_id = result.meter.reservation_id
            async with result:  # closed on leaving, as the SDK's own streams are
                async for chunk in result:
                    chunks.append(chunk)
                    if len(chunks) == stop_after:
                        await asyncio.sleep(APP_WORK_S)  # the provider sends on meanwhile
                        break
        except BudgetExceeded as error:
            return Outcome(chunks, error, reservation_id)
    return Outcome(chunks, None, reservation_id)


def _call_sync(
    address: str,
    spool_dir: Path,
    base_url: str,
    budget_id: str,
    stop_after: int | None = None,
    **kwargs: Any,
) -> Outcome:
    chunks: list[ChatCompletionChunk] = []
    reservation_id = ""
    with (
        SyncBudgetClient(address, spool_dir=spool_dir) as budgets,
        openai.OpenAI(base_url=base_url, api_key="test", max_retries=0) as raw,
    ):
        client: Any = wrap_openai(raw, budgets)  # `budget=` is ours, not in the SDK types
        try:
            result = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, budget=budget_id, **kwargs
            )
            if not kwargs.get("stream"):
                return Outcome([], None, "", completion=result)
            reservation_id = result.meter.reservation_id
            with result:
                for chunk in result:
                    chunks.append(chunk)
                    if len(chunks) == stop_after:
                        time.sleep(APP_WORK_S)  # the provider sends on meanwhile
                        break
        except BudgetExceeded as error:
            return Outcome(chunks, error, reservation_id)
    return Outcome(chunks, None, reservation_id)


class Provider(Protocol):
    """What the app needs of a provider: where it is (the fake, or a test's own server)."""

    @property
    def base_url(self) -> str: ...


async def call_app(
    flavour: str, api: Stubs, tmp_path: Path, fake: Provider, budget_id: str, **kwargs: Any
) -> Outcome:
    spool_dir = tmp_path / "spool"
    if flavour == "async":
        return await _call_async(api.address, spool_dir, fake.base_url, budget_id, **kwargs)
    return await asyncio.to_thread(
        _call_sync, api.address, spool_dir, fake.base_url, budget_id, **kwargs
    )


@contextlib.asynccontextmanager
async def metered_stream(
    api: Stubs, tmp_path: Path, fake: Provider, budget_id: str, tokens: int, rate: float
) -> AsyncIterator[MeteredAsyncStream]:
    """An async metered stream of `tokens` at `rate` tokens/s (0: all at once), with its
    client and SDK open for the block."""
    async with (
        BudgetClient(api.address, spool_dir=tmp_path / "spool") as budgets,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0) as raw,
    ):
        client: Any = wrap_openai(raw, budgets)
        yield await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            budget=budget_id,
            stream=True,
            extra_headers={"x-fake-tokens": str(tokens), "x-fake-rate": str(rate)},
        )


async def finished_record(fake: FakeOpenAIServer, request_id: str) -> RequestRecord:
    async with asyncio.timeout(WAIT_S):
        return await fake.wait_for_async(
            lambda r: r.request_id == request_id and r.finished_at is not None
        )


async def reservation_entries(
    api: Stubs, budget_id: str, reservation_id: str
) -> list[pb.LedgerEntry]:
    return [e for e in await all_entries(api, budget_id) if e.reservation_id == reservation_id]


async def spent(api: Stubs, budget_id: str) -> pb.Budget:
    return (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id=budget_id))).budget


# ----------------------------------------------------------------------------- 1. runaway


async def test_a_runaway_stream_is_cut_off_at_the_budget(
    api: Stubs, tmp_path: Path, fake: FakeOpenAIServer, enc: tiktoken.Encoding, flavour: str
) -> None:
    budget_id = f"oai:runaway-{flavour}"
    await create(api, budget_id, 1000)
    prompt_tokens = count_chat_prompt_tokens(MESSAGES, MODEL)

    outcome = await call_app(flavour, api, tmp_path, fake, budget_id, stream=True)

    error = outcome.error
    assert error is not None, "the stream ran to its end"
    assert error.budget_id == budget_id
    assert outcome.chunks, "the app saw nothing before the abort"
    record = await finished_record(fake, outcome.chunks[0].id)
    assert record.disconnected
    assert not record.completed
    assert record.tokens_sent <= 1000 + BEYOND_GRANT_MAX  # of the 5,000 it would have sent
    assert record.prompt_tokens == prompt_tokens
    grant_output = 1000 - prompt_tokens  # the grants grow until they hold the whole limit

    # What the client counted is exactly what it received, and what was charged.
    counted = len(enc.encode(error.partial_text))
    assert record.text_sent.startswith(error.partial_text)
    assert error.usage is not None
    assert (error.usage.input_tokens, error.usage.output_tokens) == (prompt_tokens, counted)
    assert error.charged == prompt_tokens + counted
    # The provider sent that plus the tokens in flight when the stream was closed, so the
    # ledger's charge is prompt + count(text_sent) less those: sent - counted = in flight.
    sent = len(enc.encode(record.text_sent))
    assert sent == record.tokens_sent  # the fake's tokens re-encode to themselves
    in_flight = sent - counted
    overage = counted - grant_output  # sent after the grant, before the provider saw the cut
    # After the cut the client reads on until the provider, having seen it, ends the
    # response: every token the provider sent (and bills) is counted and charged.
    assert in_flight == 0, f"{in_flight} tokens sent but not counted"
    assert overage >= 0, "aborted before the grant was used up"
    assert in_flight + overage <= BEYOND_GRANT_MAX, (
        f"{overage} tokens counted past the grant and {in_flight} in flight"
    )
    assert prompt_tokens + sent - error.charged == in_flight

    entries = await reservation_entries(api, budget_id, outcome.reservation_id)
    holds = [e.amount for e in entries if e.kind in (pb.ENTRY_KIND_RESERVE, pb.ENTRY_KIND_EXTEND)]
    assert sum(holds) == 1000
    commit = entries[-1]
    assert commit.kind == pb.ENTRY_KIND_COMMIT
    assert commit.spent_delta == error.charged
    assert commit.overage_delta == error.charged - 1000
    assert commit.usage.output_tokens == counted
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved) == (error.charged, 0)
    assert figures.overage == error.charged - 1000
    await assert_ledger_clean(api)


async def test_an_app_that_leaves_early_is_charged_what_the_provider_sent(
    api: Stubs, tmp_path: Path, fake: FakeOpenAIServer, enc: tiktoken.Encoding, flavour: str
) -> None:
    """The app stops reading after a few chunks and closes the stream. The provider bills
    what it sent until it saw the close, so the client half-closes and reads on, counting
    without handing on, as after a cut-off. It used to charge only what the app had read."""
    budget_id = f"oai:early-{flavour}"
    await create(api, budget_id, 100_000)
    outcome = await call_app(
        flavour,
        api,
        tmp_path,
        fake,
        budget_id,
        stop_after=5,
        stream=True,
        extra_headers={"x-fake-tokens": "3000", "x-fake-rate": "2000"},
    )
    assert outcome.error is None
    assert len(outcome.chunks) == 5
    record = await finished_record(fake, outcome.chunks[0].id)
    assert record.disconnected
    assert not record.completed
    sent = len(enc.encode(record.text_sent))
    assert sent == record.tokens_sent
    assert sent > 5, "the provider saw the close before it sent more than the app read"

    entries = await reservation_entries(api, budget_id, outcome.reservation_id)
    commit = entries[-1]
    assert commit.kind == pb.ENTRY_KIND_COMMIT
    assert commit.usage.output_tokens == sent  # every token sent, not the 5 the app read
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved) == (record.prompt_tokens + sent, 0)
    await assert_ledger_clean(api)


@pytest.mark.parametrize("backend", ["sqlite"])  # the client's own clean-up is under test
async def test_a_stream_the_app_drops_unread_is_ended_and_charged(
    api: Stubs, tmp_path: Path, fake: FakeOpenAIServer, enc: tiktoken.Encoding
) -> None:
    """An app that creates a stream and drops it without reading or closing it: the plain
    SDK's response is closed by the garbage collector; the metered one was kept alive by
    its meter, whose heartbeats held the reservation open as long as the process ran,
    charging nothing of what the provider sent."""
    budget_id = "oai:dropped"
    await create(api, budget_id, 100_000)
    # 2,999 tokens: this test's request among the module's fake's records.
    async with metered_stream(api, tmp_path, fake, budget_id, 2999, 2000) as stream:
        reservation_id = stream.meter.reservation_id
        await asyncio.sleep(APP_WORK_S)  # the provider sends meanwhile
        del stream
        gc.collect()

        async def committed() -> pb.LedgerEntry | None:
            entries = await reservation_entries(api, budget_id, reservation_id)
            return next((e for e in entries if e.kind == pb.ENTRY_KIND_COMMIT), None)

        commit = await wait_until(committed, "the dropped stream's commit")
    record = await fake.wait_for_async(
        lambda r: r.tokens_planned == 2999 and r.finished_at is not None
    )
    assert record.disconnected
    sent = len(enc.encode(record.text_sent))
    assert sent > 0
    assert commit.usage.output_tokens == sent  # what the provider sent, read on and counted
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved) == (record.prompt_tokens + sent, 0)
    await assert_ledger_clean(api)


@pytest.mark.parametrize("backend", ["sqlite"])  # the client's own clean-up is under test
async def test_a_sync_stream_the_app_drops_unread_is_ended_and_committed(
    api: Stubs, tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    """The sync flavour's dropped stream is shut and committed at what was counted (its
    collector may run in any thread, so it does not read on)."""
    budget_id = "oai:dropped-sync"
    await create(api, budget_id, 100_000)

    def app() -> str:
        with (
            SyncBudgetClient(api.address, spool_dir=tmp_path / "spool") as budgets,
            openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0) as raw,
        ):
            client: Any = wrap_openai(raw, budgets)
            stream = client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                budget=budget_id,
                stream=True,
                extra_headers={"x-fake-tokens": "2998", "x-fake-rate": "2000"},
            )
            reservation_id: str = stream.meter.reservation_id
            del stream
            gc.collect()
            time.sleep(APP_WORK_S)  # the client's loop commits meanwhile
            return reservation_id

    reservation_id = await asyncio.to_thread(app)
    entries = await reservation_entries(api, budget_id, reservation_id)
    assert [e.kind for e in entries][-1] == pb.ENTRY_KIND_COMMIT
    record = await fake.wait_for_async(
        lambda r: r.tokens_planned == 2998 and r.finished_at is not None
    )
    assert record.disconnected
    assert not record.completed
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved) == (record.prompt_tokens, 0)
    await assert_ledger_clean(api)


async def test_the_client_cuts_at_a_final_grant_in_the_call_that_counts(
    api: Stubs, tmp_path: Path
) -> None:
    """No round trip on the abort path once the grant is final: the count that reaches it
    aborts before control returns (no await in between), and budgetd, seeing the same
    totals, aborts and charges the same."""
    await create(api, "oai:final", 130)
    async with BudgetClient(api.address, spool_dir=tmp_path / "spool") as budgets:
        meter = budgets.meter("oai:final", model=MODEL, prompt_tokens=100)
        await meter.open()
        assert (meter.granted_output_tokens, meter.grant_final) == (30, True)
        cut: list[BudgetExceeded] = []
        meter.on_abort(cut.append)
        meter.add_output_tokens(29)
        assert meter.aborted is None
        assert not cut
        meter.add_output_tokens(1)
        assert meter.aborted is not None
        assert cut == [meter.aborted]
        assert meter.aborted.budget_id == "oai:final"
        committed = await meter.finish()
    assert (committed.charged, committed.overage) == (130, 0)
    assert committed.budget is not None
    assert (committed.budget.spent, committed.budget.reserved) == (130, 0)
    await assert_ledger_clean(api)


@dataclass
class DeafProvider:
    """A streaming endpoint that never reads after the request, so it ignores the client's
    close (half-close) and keeps sending one token every 10 ms until a write fails."""

    base_url: str = ""
    ended_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        event = (
            b'data: {"id":"deaf","object":"chat.completion.chunk","created":0,'
            b'"model":"gpt-4o","choices":[{"index":0,"delta":{"content":" word"},'
            b'"finish_reason":null}]}\n\n'
        )
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        try:
            while True:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError):
            self.ended_at = time.monotonic()
            self.ended.set()
        finally:
            writer.close()


async def test_a_provider_that_ignores_the_cut_is_shut_out_after_the_bound(
    api: Stubs, tmp_path: Path, flavour: str
) -> None:
    """After the cut the client reads on for what the provider had sent, but no longer than
    COUNT_AFTER_CUT_S: then it shuts the connection for good and says the charge may be
    short. (The sync client's read would otherwise block on this provider forever.)"""
    budget_id = f"oai:deaf-{flavour}"
    prompt_tokens = count_chat_prompt_tokens(MESSAGES, MODEL)
    await create(api, budget_id, prompt_tokens + 5)
    deaf = DeafProvider()
    server = await asyncio.start_server(deaf.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    deaf.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.monotonic()
        async with asyncio.timeout(COUNT_AFTER_CUT_S + 20):
            outcome = await call_app(flavour, api, tmp_path, deaf, budget_id, stream=True)
        returned = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await deaf.ended.wait()
    finally:
        server.close()
    error = outcome.error
    assert error is not None, "the stream ran to its end"
    assert error.uncounted_tail
    assert COUNT_AFTER_CUT_S <= returned - started < COUNT_AFTER_CUT_S + 10
    assert deaf.ended_at is not None
    assert deaf.ended_at < returned + 5, "the connection was not shut after the bound"
    # What arrived within the bound was counted and charged, past the grant of 5.
    assert error.usage is not None
    counted = error.usage.output_tokens
    assert counted > 5
    assert error.charged == prompt_tokens + counted
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved, figures.overage) == (
        prompt_tokens + counted,
        0,
        counted - 5,
    )
    await assert_ledger_clean(api)


# ----------------------------------------------------------------------------- 2. fits


@pytest.mark.parametrize("app_asks_for_usage", [False, True], ids=["plain", "include_usage"])
async def test_a_stream_that_fits_is_charged_the_providers_usage(
    api: Stubs,
    tmp_path: Path,
    fake: FakeOpenAIServer,
    enc: tiktoken.Encoding,
    flavour: str,
    app_asks_for_usage: bool,
) -> None:
    budget_id = f"oai:fits-{flavour}-{app_asks_for_usage}"
    await create(api, budget_id, 10_000)
    extra: dict[str, Any] = (
        {"stream_options": {"include_usage": True}} if app_asks_for_usage else {}
    )

    outcome = await call_app(
        flavour,
        api,
        tmp_path,
        fake,
        budget_id,
        stream=True,
        tools=TOOLS,
        # Below the refill mark (192 of the 256 granted): no extension, so no race between
        # it and the end of a stream that arrives all at once.
        extra_headers={"x-fake-tokens": "150", "x-fake-rate": "0"},
        **extra,
    )

    assert outcome.error is None
    record = await finished_record(fake, outcome.chunks[0].id)
    assert record.completed
    assert record.include_usage
    provider_total = record.prompt_tokens + record.tokens_sent
    assert record.tokens_sent == 150
    # The client's estimate counted the tools; the provider's figure is what is charged.
    assert count_chat_prompt_tokens(MESSAGES, MODEL, TOOLS) != record.prompt_tokens

    usage_chunks = [c for c in outcome.chunks if not c.choices]
    if app_asks_for_usage:
        assert usage_chunks == [outcome.chunks[-1]]
        usage = outcome.chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            record.prompt_tokens,
            record.tokens_sent,
        )
    else:
        assert usage_chunks == []
        assert all(c.usage is None for c in outcome.chunks)
    text = "".join(c.choices[0].delta.content or "" for c in outcome.chunks if c.choices)
    assert text == record.text_sent

    entries = await reservation_entries(api, budget_id, outcome.reservation_id)
    assert [e.kind for e in entries] == [pb.ENTRY_KIND_RESERVE, pb.ENTRY_KIND_COMMIT]
    commit = entries[-1]
    assert commit.spent_delta == provider_total
    assert (commit.usage.input_tokens, commit.usage.output_tokens) == (
        record.prompt_tokens,
        record.tokens_sent,
    )
    assert commit.overage_delta == 0
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved) == (provider_total, 0)
    await assert_ledger_clean(api)


@pytest.mark.parametrize("backend", ["sqlite"])  # the client's own loop is under test
async def test_a_backlog_of_chunks_lets_the_event_loop_run_every_few_chunks(
    api: Stubs, tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    """A client reading behind its provider parses buffered chunks without a read that
    suspends; the meter's stream to budgetd (usage out, abort in) runs on the same loop,
    so the iteration must let it run. Counted in loop turns, not timed: a task that
    yields in a loop runs once for every turn the iteration gives up."""
    budget_id = "oai:backlog"
    await create(api, budget_id, 1_000_000)
    async with metered_stream(api, tmp_path, fake, budget_id, 3000, 0) as stream:
        await asyncio.sleep(0.5)  # the whole response waits in the socket: a backlog
        turns = 0
        iterating = True

        async def count_turns() -> None:
            nonlocal turns
            while iterating:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count_turns())
        turn_of_each_chunk = [turns async for _chunk in stream]
        iterating = False
        await counter
    assert len(turn_of_each_chunk) > 3000
    # Chunks handed over within one turn of the loop: never more than YIELD_EVERY_CHUNKS
    # in a row (the reads alone suspend once per socket buffer, a few hundred chunks).
    longest = max(len(list(run)) for _, run in itertools.groupby(turn_of_each_chunk))
    assert longest <= YIELD_EVERY_CHUNKS


# ----------------------------------------------------------------------------- 3. non-streamed


async def test_a_non_streamed_call_is_charged_its_usage(
    api: Stubs, tmp_path: Path, fake: FakeOpenAIServer, flavour: str
) -> None:
    budget_id = f"oai:whole-{flavour}"
    await create(api, budget_id, 10_000)

    outcome = await call_app(
        flavour,
        api,
        tmp_path,
        fake,
        budget_id,
        tools=TOOLS,
        extra_headers={"x-fake-tokens": "120", "x-fake-rate": "0"},
    )

    completion = outcome.completion
    assert completion is not None
    assert completion.usage is not None
    usage = completion.usage
    assert usage.completion_tokens == 120
    total = usage.prompt_tokens + usage.completion_tokens
    assert count_chat_prompt_tokens(MESSAGES, MODEL, TOOLS) + 120 != total
    entries = await all_entries(api, budget_id)
    assert [e.kind for e in entries] == [
        pb.ENTRY_KIND_LIMIT,
        pb.ENTRY_KIND_RESERVE,
        pb.ENTRY_KIND_COMMIT,
    ]
    assert entries[-1].spent_delta == total
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved) == (total, 0)
    await assert_ledger_clean(api)


# ----------------------------------------------------------------------------- 4. pre-flight


async def test_a_budget_without_room_for_the_prompt_refuses_before_sending(
    api: Stubs, tmp_path: Path, fake: FakeOpenAIServer, flavour: str
) -> None:
    budget_id = f"oai:broke-{flavour}"
    await create(api, budget_id, 1000)
    earlier = await api.budget.Reserve(pb.ReserveRequest(budget_id=budget_id, amount=995))
    await api.budget.Commit(pb.CommitRequest(reservation_id=earlier.reservation.id, amount=995))
    assert count_chat_prompt_tokens(MESSAGES, MODEL) > 5
    before = len(fake.records)

    outcome = await call_app(flavour, api, tmp_path, fake, budget_id, stream=True)

    error = outcome.error
    assert error is not None
    assert (error.budget_id, error.available) == (budget_id, 5)
    assert outcome.chunks == []
    assert len(fake.records) == before, "the request reached the provider"
    entries = await all_entries(api, budget_id)
    assert [e.kind for e in entries] == [
        pb.ENTRY_KIND_LIMIT,
        pb.ENTRY_KIND_RESERVE,
        pb.ENTRY_KIND_COMMIT,
    ]
    figures = await spent(api, budget_id)
    assert (figures.spent, figures.reserved) == (995, 0)
    await assert_ledger_clean(api)


async def test_a_unary_charge_spends_the_budget(api: Stubs) -> None:
    await create(api, "oai:charged", 1000)
    charged = await api.budget.Charge(
        pb.ChargeRequest(budget_id="oai:charged", amount=995, idempotency_key="earlier")
    )
    assert charged.charged == 995
    assert (charged.budget.spent, charged.budget.reserved) == (995, 0)
    await assert_ledger_clean(api)


# ----------------------------------------------------------------------------- 5. tool calls


def _chunk(
    choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
) -> ChatCompletionChunk:
    """A chunk parsed by the SDK from the wire shape the API streams."""
    return ChatCompletionChunk.model_validate(
        {
            "id": "chatcmpl-tools",
            "object": "chat.completion.chunk",
            "created": 1_750_000_000,
            "model": MODEL,
            "choices": choices,
            "usage": usage,
        }
    )


def _tool_delta(
    index: int, *, name: str | None = None, arguments: str = "", choice: int = 0
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if name is not None:
        call.update(id=f"call_{index}", type="function")
        call["function"]["name"] = name
    return {"index": choice, "delta": {"tool_calls": [call]}, "finish_reason": None}


WEATHER_ARGS = '{"city": "Paris", "unit": "celsius", "days": [1, 2, 3]}'
TIME_ARGS = '{"zone": "Europe/Paris"}'
OTHER_CHOICE_TEXT = "Let me check both."


def tool_call_chunks(with_usage: bool) -> list[ChatCompletionChunk]:
    """Two parallel tool calls in choice 0, arguments split at awkward places, and text in
    choice 1; optionally the provider's usage chunk at the end."""
    chunks = [
        _chunk([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]),
        _chunk([_tool_delta(0, name="get_weather")]),
        _chunk([{"index": 1, "delta": {"content": OTHER_CHOICE_TEXT[:7]}, "finish_reason": None}]),
    ]
    for start in range(0, len(WEATHER_ARGS), 5):
        chunks.append(_chunk([_tool_delta(0, arguments=WEATHER_ARGS[start : start + 5])]))
    chunks.append(_chunk([_tool_delta(1, name="get_time", arguments=TIME_ARGS[:3])]))
    chunks.append(
        _chunk([{"index": 1, "delta": {"content": OTHER_CHOICE_TEXT[7:]}, "finish_reason": None}])
    )
    chunks.append(_chunk([_tool_delta(1, arguments=TIME_ARGS[3:])]))
    chunks.append(_chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    if with_usage:
        chunks.append(
            _chunk([], {"prompt_tokens": 40, "completion_tokens": 33, "total_tokens": 73})
        )
    return chunks


def expected_output_tokens(enc: tiktoken.Encoding) -> int:
    return sum(
        len(enc.encode(text))
        for text in ("get_weather", WEATHER_ARGS, "get_time", TIME_ARGS, OTHER_CHOICE_TEXT)
    )


async def test_count_chunk_counts_tool_call_names_and_arguments_as_output(
    tmp_path: Path, enc: tiktoken.Encoding
) -> None:
    async with BudgetClient("127.0.0.1:9", spool_dir=tmp_path / "spool") as budgets:
        meter = budgets.meter("oai:tools", model=MODEL, prompt_tokens=40)  # never opened
        for chunk in tool_call_chunks(with_usage=False):
            count_chunk(meter, chunk)
        assert meter.usage.output_tokens == expected_output_tokens(enc)
        assert meter.usage.input_tokens == 40

        count_chunk(meter, tool_call_chunks(with_usage=True)[-1])
        assert (meter.usage.input_tokens, meter.usage.output_tokens) == (40, 33)


class _Upstream:
    """An SDK-like stream of ready-made chunks, for output the fake server cannot produce."""

    def __init__(self, chunks: list[ChatCompletionChunk]) -> None:
        self._chunks = chunks
        self.closed = False

    async def __aiter__(self) -> Any:
        for chunk in self._chunks:
            yield chunk

    async def close(self) -> None:
        self.closed = True


async def test_tool_call_tokens_are_charged_when_the_provider_reports_no_usage(
    api: Stubs, tmp_path: Path, enc: tiktoken.Encoding
) -> None:
    await create(api, "oai:tools", 10_000)
    async with BudgetClient(api.address, spool_dir=tmp_path / "spool") as budgets:
        meter = budgets.meter("oai:tools", model=MODEL, prompt_tokens=40)
        await meter.open()
        upstream = _Upstream(tool_call_chunks(with_usage=False))
        seen = [chunk async for chunk in MeteredAsyncStream(upstream, meter, True)]
    assert len(seen) == len(upstream._chunks)
    assert upstream.closed
    output = expected_output_tokens(enc)
    assert meter.committed is not None
    assert meter.committed.charged == 40 + output
    commit = (await all_entries(api, "oai:tools"))[-1]
    assert (commit.kind, commit.usage.output_tokens) == (pb.ENTRY_KIND_COMMIT, output)
    await assert_ledger_clean(api)
