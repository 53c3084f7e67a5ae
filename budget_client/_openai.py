"""`wrap_openai`: meter `chat.completions.create` of openai.AsyncOpenAI / openai.OpenAI.

    client = wrap_openai(openai.AsyncOpenAI(), budgets)
    stream = await client.chat.completions.create(model=..., messages=..., stream=True,
                                                  budget="team:search")

The prompt is counted and reserved before the request is sent (a refused budget raises
BudgetExceeded and nothing is sent). Streamed output is counted chunk by chunk; on abort
the upstream HTTP stream is closed explicitly — a `break` alone would leave the provider
generating, and billing, to the end — and BudgetExceeded is raised with the partial text.
`stream_options.include_usage` is requested so the provider's own final usage is what gets
committed; its extra usage-only chunk is hidden from apps that did not ask for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar

from budget_client._client import BudgetClient
from budget_client._errors import BudgetExceeded
from budget_client._meter import Meter
from budget_client._sync import SyncBudgetClient, SyncMeter
from budget_client._tokenizer import count_chat_prompt_tokens
from budget_client._types import Usage

log = logging.getLogger("budget_client.openai")

ClientT = TypeVar("ClientT")
MeterT = TypeVar("MeterT", Meter, SyncMeter)


class _Counts(Protocol):
    def add_output_text(self, text: str, choice: int = 0) -> None: ...
    def add_tool_call(
        self, index: int, name: str | None, arguments: str | None, choice: int = 0
    ) -> None: ...
    def set_provider_usage(self, usage: Usage) -> None: ...


def _given(value: object) -> bool:
    """The SDK marks absent arguments with NOT_GIVEN / omit sentinels."""
    return value is not None and type(value).__name__ not in ("NotGiven", "Omit")


def provider_usage(usage: Any) -> Usage:
    """The SDK's CompletionUsage as budgetd Usage (cached and reasoning details included)."""
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return Usage(
        input_tokens=usage.prompt_tokens or 0,
        cached_input_tokens=getattr(prompt_details, "cached_tokens", 0) or 0,
        output_tokens=usage.completion_tokens or 0,
        reasoning_tokens=getattr(completion_details, "reasoning_tokens", 0) or 0,
    )


def count_chunk(meter: _Counts, chunk: Any) -> None:
    """Count one ChatCompletionChunk: content, refusals and tool calls are all output."""
    for choice in chunk.choices or ():
        delta = choice.delta
        if delta is None:
            continue
        if delta.content:
            meter.add_output_text(delta.content, choice.index)
        refusal = getattr(delta, "refusal", None)
        if refusal:
            meter.add_output_text(refusal, choice.index)
        for call in getattr(delta, "tool_calls", None) or ():
            function = call.function
            if function is not None:
                meter.add_tool_call(call.index, function.name, function.arguments, choice.index)
    if getattr(chunk, "usage", None) is not None:
        meter.set_provider_usage(provider_usage(chunk.usage))


def count_completion(meter: _Counts, completion: Any) -> None:
    """A non-streamed ChatCompletion: its usage when present, else count its output."""
    if completion.usage is not None:
        meter.set_provider_usage(provider_usage(completion.usage))
        return
    for choice in completion.choices:
        message = choice.message
        if message.content:
            meter.add_output_text(message.content, choice.index)
        for call in message.tool_calls or ():
            function = getattr(call, "function", None)
            if function is not None:
                meter.add_tool_call(0, function.name, function.arguments, choice.index)


class _RequestPlan:
    """What budgetd needs from the request's arguments, and the arguments to send."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.model = str(kwargs.get("model", ""))
        self.stream = bool(kwargs.get("stream")) and _given(kwargs.get("stream"))
        tools = kwargs.get("tools")
        self.prompt_tokens = count_chat_prompt_tokens(
            kwargs.get("messages") or [], self.model, tools if _given(tools) else None
        )
        self.max_output_tokens = 0
        for name in ("max_completion_tokens", "max_tokens"):
            value = kwargs.get(name)
            if _given(value) and isinstance(value, int):
                self.max_output_tokens = value
                break
        self.kwargs = dict(kwargs)
        self.hide_usage_chunk = False
        if self.stream:
            options = kwargs.get("stream_options")
            options = dict(options) if _given(options) and options else {}
            self.hide_usage_chunk = not options.get("include_usage", False)
            options["include_usage"] = True
            self.kwargs["stream_options"] = options


# After a cut-off, how long the stream is still read for what the provider sent before it
# saw the close. Those tokens are billed, so they are counted (as overage) but never handed
# to the app. The cut closes our sending side, so the provider ends the response within a
# round trip; this bounds one that does not, after which the connection is shut for good.
COUNT_AFTER_CUT_S = 1.0


# A backlog of chunks (a client reading behind its provider) parses without a single
# await that suspends, so the meter's stream to budgetd (usage out, abort in) would wait
# for the whole backlog; every this many chunks the iteration lets it run. Not every chunk:
# a loop turn costs ~5 % of what the SDK spends on a chunk, and the read suspends by itself
# whenever it is not behind.
YIELD_EVERY_CHUNKS = 8


def _shutdown_socket(response: Any, how: int) -> None:
    """Shut the connection's socket (`how` as in socket.shutdown), synchronously.

    This is the cut-off itself, done in the abort callback. Closing the httpx response
    instead takes its reader's turn (on an event loop, after whatever runs before it) and,
    from another thread, does not wake a blocked read until the next byte arrives (seconds,
    on a slow model). SHUT_WR sends the provider our FIN at once while what it already
    sent can still be read and counted; SHUT_RDWR also ends a read blocked on a provider
    that keeps going. It goes through a duplicate of the descriptor because event loops
    hand out socket stand-ins (uvloop's refuses shutdown); both name one connection.
    """
    stream = getattr(response, "extensions", {}).get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is None:
        return
    with (
        contextlib.suppress(OSError, ValueError),
        socket.socket(fileno=os.dup(sock.fileno())) as duplicate,
    ):
        duplicate.shutdown(how)


class _CutOff(Generic[MeterT]):
    """The cut-off both stream flavours share: half-close the connection in the abort
    callback, then shut it for good if the provider is still sending COUNT_AFTER_CUT_S later.

    The read is never interrupted otherwise: after the half-close the provider ends the
    response, the read returns what it sent meanwhile (counted, never handed on), and the
    iteration ends by itself. So a chunk costs one read, with no task or race against the
    abort: on a client short of CPU that was the difference between keeping up with the
    provider and reading behind it (docs/design.md), and what a client reads behind is
    overage when the cut comes.
    """

    def __init__(self, stream: Any, meter: MeterT, hide_usage_chunk: bool) -> None:
        self._stream = stream
        self.meter: MeterT = meter
        self._hide_usage_chunk = hide_usage_chunk
        self._reading = True  # the connection is still ours: not yet ended, pooled or closed
        # Held weakly: the meter lives as long as its stream to budgetd (its heartbeats keep
        # the reservation open), so a strong reference from it would keep a stream the app
        # dropped unread alive too, never closed or charged (`_abandoned` ends it instead).
        cut_off = weakref.WeakMethod(self._cut_off)

        def on_abort(error: BudgetExceeded) -> None:
            if (method := cut_off()) is not None:
                method(error)

        meter.on_abort(on_abort)

    def _count_and_hand_on(self, chunk: Any) -> bool:
        """Count `chunk`; whether the app gets it. Not after the cut: the provider sent it
        before it saw the close, so it is counted (and billed) but not handed on; nor the
        usage-only chunk the app did not ask for."""
        count_chunk(self.meter, chunk)
        if self.meter.aborted is not None:
            return False
        return not (self._hide_usage_chunk and not chunk.choices)

    def _cut_off(self, _error: BudgetExceeded) -> None:
        """On the client's event loop (in the sync flavour, the app's thread may be blocked
        reading meanwhile)."""
        if self._reading:
            _shutdown_socket(self._stream.response, socket.SHUT_WR)
            asyncio.get_running_loop().call_later(COUNT_AFTER_CUT_S, self._stop_reading)

    def _stop_reading(self) -> None:
        if self._reading:  # the provider kept sending: end the read blocked on it
            _shutdown_socket(self._stream.response, socket.SHUT_RDWR)
            if self.meter.aborted is not None:
                self.meter.aborted.uncounted_tail = True

    def _leaving_early(self) -> bool:
        """Whether the app leaves a response before its end (it stopped reading, or never
        started). If so, half-close it now: the provider bills what it sends until it sees
        the close, so the caller reads on, counting, as the cut-off does."""
        if self._reading:
            _shutdown_socket(self._stream.response, socket.SHUT_WR)
        return self._reading

    @property
    def response(self) -> Any:
        return self._stream.response


# ----------------------------------------------------------------------------- async


class MeteredAsyncStream(_CutOff[Meter]):
    """An openai AsyncStream that is counted, and cut off when the budget is gone."""

    # One iterator over the SDK's stream, which the app's iteration and `close`'s reading
    # on both continue (each `async for` over an AsyncStream makes a generator of its own).
    _upstream: AsyncIterator[Any] | None = None
    # `close` runs once at a time: an app that breaks out of its `async for` inside
    # `async with` closes the stream while asyncio finalises the abandoned iteration,
    # whose `finally` closes it too; two readings-on of one response lose chunks.
    _closing: asyncio.Lock | None = None

    def __init__(self, stream: Any, meter: Meter, hide_usage_chunk: bool) -> None:
        super().__init__(stream, meter, hide_usage_chunk)
        loop = asyncio.get_running_loop()
        self._abandoned = weakref.finalize(self, _end_abandoned, loop, stream, meter)
        self._abandoned.atexit = False  # at exit the loop is gone; the reservation expires

    def _chunks(self) -> AsyncIterator[Any]:
        if self._upstream is None:
            self._upstream = aiter(self._stream)
        return self._upstream

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def __aenter__(self) -> MeteredAsyncStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the upstream connection and commit what was used: left before its end,
        what the provider sent until it saw the close too (`_leaving_early`), except when
        the app's task is being cancelled, which wants out at once."""
        if self._closing is None:
            self._closing = asyncio.Lock()
        async with self._closing:
            await self._close_once()

    async def _close_once(self) -> None:
        self._abandoned.detach()
        task = asyncio.current_task()
        if self._leaving_early() and not (task is not None and task.cancelling()):
            await _read_on(self._chunks(), self.meter, self._stop_reading)
        self._reading = False
        await self._stream.close()
        await self.meter.finish()

    async def _iterate(self) -> AsyncIterator[Any]:
        unyielded = 0
        try:
            try:
                async for chunk in self._chunks():
                    handed_on = self._count_and_hand_on(chunk)
                    unyielded += 1
                    if unyielded == YIELD_EVERY_CHUNKS:
                        unyielded = 0
                        await asyncio.sleep(0)
                    if handed_on:
                        yield chunk
            except Exception:
                self._reading = False  # the connection failed, or we shut it
                if self.meter.aborted is None:
                    raise  # a real upstream failure, not our shutdown of the socket
            else:
                self._reading = False  # the provider ended the response
        finally:
            await self.close()  # also when the app stops reading early
        self.meter.raise_if_aborted()


async def _read_on(
    chunks: AsyncIterator[Any], meter: Meter, stop_reading: Callable[[], None]
) -> None:
    """Read a half-closed response to its end, counting what the provider sent; call
    `stop_reading` (which shuts the socket) if it is still sending COUNT_AFTER_CUT_S on."""
    bound = asyncio.get_running_loop().call_later(COUNT_AFTER_CUT_S, stop_reading)
    try:
        with contextlib.suppress(Exception):  # the socket we shut, or the provider's end
            async for chunk in chunks:
                count_chunk(meter, chunk)
    finally:
        bound.cancel()


def _end_abandoned(loop: asyncio.AbstractEventLoop, stream: Any, meter: Meter) -> None:
    """A stream the app dropped without reading it to its end or closing it (the garbage
    collector took the wrapper): end it as `close` would, on its loop."""

    async def end() -> None:
        _shutdown_socket(stream.response, socket.SHUT_WR)
        await _read_on(
            aiter(stream),
            meter,
            functools.partial(_shutdown_socket, stream.response, socket.SHUT_RDWR),
        )
        await stream.close()
        await meter.finish()

    def start() -> None:
        task = loop.create_task(end(), name="budgetd-abandoned-stream")
        _ABANDONED.add(task)
        task.add_done_callback(_ABANDONED.discard)

    if not loop.is_closed():
        loop.call_soon_threadsafe(start)


# Tasks ending abandoned streams, held until done (the loop keeps only weak references).
_ABANDONED: set[asyncio.Task[None]] = set()


class _AsyncCompletions:
    def __init__(
        self, completions: Any, budgets: BudgetClient, budget: str | None, labels: Mapping[str, str]
    ) -> None:
        self._completions = completions
        self._budgets = budgets
        self._budget = budget
        self._labels = dict(labels)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)

    async def create(
        self,
        *args: Any,
        budget: str | None = None,
        budget_labels: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        budget_id = budget or self._budget
        if budget_id is None:
            return await self._completions.create(*args, **kwargs)
        plan = _RequestPlan(kwargs)
        meter = self._budgets.meter(
            budget_id,
            model=plan.model,
            prompt_tokens=plan.prompt_tokens,
            max_output_tokens=plan.max_output_tokens,
            labels={**self._labels, **(budget_labels or {})},
        )
        await meter.open()
        try:
            result = await self._completions.create(*args, **plan.kwargs)
        except BaseException:
            meter.set_provider_usage(Usage())  # the provider refused: nothing was generated
            await meter.finish()
            raise
        if plan.stream:
            return MeteredAsyncStream(result, meter, plan.hide_usage_chunk)
        count_completion(meter, result)
        await meter.finish()
        return result


# ----------------------------------------------------------------------------- sync


class MeteredStream(_CutOff[SyncMeter]):
    """An openai Stream (sync) that is counted, and cut off when the budget is gone."""

    def __init__(self, stream: Any, meter: SyncMeter, hide_usage_chunk: bool) -> None:
        super().__init__(stream, meter, hide_usage_chunk)
        self._abandoned = weakref.finalize(self, _end_abandoned_sync, stream, meter)
        self._abandoned.atexit = False  # at exit the loop is gone; the reservation expires

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the upstream connection and commit what was used: left before its end,
        what the provider sent until it saw the close too (`_leaving_early`)."""
        self._abandoned.detach()
        if self._leaving_early():
            bound = threading.Timer(COUNT_AFTER_CUT_S, self._stop_reading)
            bound.daemon = True
            bound.start()
            try:
                for chunk in self._stream:
                    count_chunk(self.meter, chunk)
            except Exception:
                pass  # the socket we shut, or the provider's own end of the response
            finally:
                bound.cancel()
        self._reading = False
        self._stream.close()
        self.meter.finish()

    def _iterate(self) -> Iterator[Any]:
        try:
            try:
                for chunk in self._stream:
                    if self._count_and_hand_on(chunk):
                        yield chunk
            except Exception:
                self._reading = False  # the connection failed, or we shut it
                if self.meter.aborted is None:
                    raise  # a real upstream failure, not our shutdown of the socket
            else:
                self._reading = False  # the provider ended the response
        finally:
            self.close()  # also when the app stops reading early
        self.meter.raise_if_aborted()


def _end_abandoned_sync(stream: Any, meter: SyncMeter) -> None:
    """A sync stream the app dropped unread and unclosed: shut its connection and commit
    what was counted. Not read on, unlike `close`: the collector runs in whatever thread
    drops the last reference, which must not wait on the network."""
    _shutdown_socket(stream.response, socket.SHUT_RDWR)
    meter.finish_soon()


class _Completions:
    def __init__(
        self,
        completions: Any,
        budgets: SyncBudgetClient,
        budget: str | None,
        labels: Mapping[str, str],
    ) -> None:
        self._completions = completions
        self._budgets = budgets
        self._budget = budget
        self._labels = dict(labels)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)

    def create(
        self,
        *args: Any,
        budget: str | None = None,
        budget_labels: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        budget_id = budget or self._budget
        if budget_id is None:
            return self._completions.create(*args, **kwargs)
        plan = _RequestPlan(kwargs)
        meter = self._budgets.meter(
            budget_id,
            model=plan.model,
            prompt_tokens=plan.prompt_tokens,
            max_output_tokens=plan.max_output_tokens,
            labels={**self._labels, **(budget_labels or {})},
        )
        meter.open()
        try:
            result = self._completions.create(*args, **plan.kwargs)
        except BaseException:
            meter.set_provider_usage(Usage())
            meter.finish()
            raise
        if plan.stream:
            return MeteredStream(result, meter, plan.hide_usage_chunk)
        count_completion(meter, result)
        meter.finish()
        return result


# ----------------------------------------------------------------------------- proxies


class _Proxy:
    """Delegates everything to the wrapped object except the attributes it overrides."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        self._target = target
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._target, name)


def wrap_openai(
    client: ClientT,
    budgets: BudgetClient | SyncBudgetClient | None = None,
    *,
    budget: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> ClientT:
    """Meter `chat.completions.create` of an openai client.

    `budget` is the default budget id; a call's own `budget=` argument overrides it, and a
    call with neither is passed through unmetered. `budgets` defaults to a client
    configured from BUDGETD_* environment variables.
    """
    import openai

    chat_resource: Any = getattr(client, "chat", None)
    if isinstance(client, openai.AsyncOpenAI):
        async_budgets = budgets if isinstance(budgets, BudgetClient) else None
        if budgets is not None and async_budgets is None:
            raise TypeError("an AsyncOpenAI client needs an async BudgetClient")
        completions: Any = _AsyncCompletions(
            chat_resource.completions, async_budgets or BudgetClient(), budget, labels or {}
        )
    elif isinstance(client, openai.OpenAI):
        sync_budgets = budgets if isinstance(budgets, SyncBudgetClient) else None
        if budgets is not None and sync_budgets is None:
            raise TypeError("an OpenAI (sync) client needs a SyncBudgetClient")
        completions = _Completions(
            chat_resource.completions, sync_budgets or SyncBudgetClient(), budget, labels or {}
        )
    else:
        raise TypeError(
            f"wrap_openai expects openai.OpenAI or openai.AsyncOpenAI, not {type(client)!r}"
        )
    chat = _Proxy(chat_resource, completions=completions)
    proxy: Any = _Proxy(client, chat=chat)
    return proxy  # type: ignore[no-any-return]
