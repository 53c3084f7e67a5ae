"""One metered response on the client side: a Meter stream to budgetd, kept alive across
server restarts, and the abort signal delivered to whoever must close the upstream.

    async with client.meter("team:search", model="gpt-4o", prompt_tokens=812) as meter:
        meter.on_abort(close_upstream)
        async for delta in upstream:
            meter.add_output_text(delta)
        meter.set_provider_usage(final_usage)        # when the provider reports one

Usage is sent cumulative and only the latest value matters, so a writer task sends the
newest totals whenever they change and never queues stale ones. If the stream to budgetd
breaks, the response keeps going (fail-open) while the meter resumes on any replica with
its reservation id and current totals; nothing is lost or charged twice. The final commit
falls back to a unary Commit, which is idempotent and reconciles an expired reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import grpc

from budget_client._counting import OutputCounter
from budget_client._errors import BudgetError, BudgetExceeded, BudgetUnavailable, ReservationError
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._rpc import UNREACHABLE, translate
from budget_client._spool import SpoolEntry
from budget_client._types import Budget, Committed, Reservation, Usage

if TYPE_CHECKING:
    from budget_client._client import BudgetClient

log = logging.getLogger("budget_client.meter")

AbortCallback = Callable[[BudgetExceeded], Awaitable[None] | None]
MeterState = Literal["unopened", "open", "unmetered", "finished"]


class _ConnectionLost(Exception):
    """The stream to budgetd ended without a committed event."""


class Meter:
    """Meters one streamed LLM response against a budget. Use as an async context manager."""

    def __init__(
        self,
        client: BudgetClient,
        budget_id: str,
        *,
        model: str,
        prompt_tokens: int = 0,
        max_output_tokens: int = 0,
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self._client = client
        self.budget_id = budget_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_output_tokens = max_output_tokens
        self.labels = dict(labels or {})
        self.idempotency_key = idempotency_key or f"meter-{uuid.uuid4().hex}"
        self.counter = OutputCounter(model)
        self.state: MeterState = "unopened"
        self.reservation_id = ""
        self.granted_output_tokens = 0
        self.aborted: BudgetExceeded | None = None
        self.committed: Committed | None = None
        self._usage = Usage(input_tokens=prompt_tokens)
        self._provider_usage: Usage | None = None
        self._sent = Usage()
        self._dirty = asyncio.Event()
        self._abort_callbacks: list[AbortCallback] = []
        self._callback_tasks: set[asyncio.Future[None]] = set()
        self._call: grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent] | None = None
        self._committed_event: asyncio.Future[pb.MeterCommitted] | None = None
        self._finishing = False
        self._supervisor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ usage in

    @property
    def usage(self) -> Usage:
        """Cumulative usage as counted so far (the provider's, once it has reported)."""
        return self._provider_usage or self._usage

    def add_output_text(self, text: str, choice: int = 0) -> None:
        """Count streamed text and report the new total (memory work; sent in the background)."""
        self._set_output(self.counter.add_text(text, choice))

    def add_tool_call(
        self, index: int, name: str | None, arguments: str | None, choice: int = 0
    ) -> None:
        """Tool-call names and arguments are output tokens too."""
        self._set_output(self.counter.add_tool_call(index, name, arguments, choice))

    def add_output_tokens(self, tokens: int) -> None:
        self._set_output(self.counter.add_tokens(tokens))

    def _set_output(self, output_tokens: int) -> None:
        if output_tokens != self._usage.output_tokens:
            self.set_usage(
                Usage(input_tokens=self._usage.input_tokens, output_tokens=output_tokens)
            )

    def set_usage(self, usage: Usage) -> None:
        """Report cumulative usage counted elsewhere (e.g. Anthropic's message_delta)."""
        self._usage = usage
        self._dirty.set()

    def set_provider_usage(self, usage: Usage) -> None:
        """The provider's own final usage: what is committed, when it arrives."""
        self._provider_usage = usage

    # ------------------------------------------------------------------ abort out

    def on_abort(self, callback: AbortCallback) -> None:
        """Call `callback(exc)` the moment budgetd aborts this response (at once if it has)."""
        self._abort_callbacks.append(callback)
        if self.aborted is not None:
            self._run_callback(callback, self.aborted)

    def raise_if_aborted(self) -> None:
        if self.aborted is not None:
            raise self.aborted

    def _run_callback(self, callback: AbortCallback, error: BudgetExceeded) -> None:
        try:
            outcome = callback(error)
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(outcome)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_tasks.discard)
        except Exception:
            log.exception("abort callback failed")

    def _abort(self, event: pb.MeterAbort) -> None:
        if self.aborted is not None:
            return
        self.aborted = BudgetExceeded(
            event.message or f"budget {event.budget_id!r} is exhausted",
            budget_id=event.budget_id,
            available=0,
        )
        for callback in list(self._abort_callbacks):
            self._run_callback(callback, self.aborted)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Meter:
        await self.open()
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, _tb: object) -> None:
        await self.finish()

    async def open(self) -> None:
        """Reserve before the request is sent: refused budgets raise here, not mid-stream."""
        if self.state != "unopened":
            raise RuntimeError("a Meter opens once")
        config = self._client.config
        try:
            call = await asyncio.wait_for(self._open_call(resume=False), config.connect_timeout_s)
        except BudgetUnavailable as error:
            self._go_unmetered(error)
            return
        except TimeoutError:
            self._go_unmetered(BudgetUnavailable("budgetd did not answer in time"))
            return
        self.state = "open"
        self._supervisor = asyncio.create_task(self._supervise(call), name="budgetd-meter")

    def _go_unmetered(self, error: BudgetUnavailable) -> None:
        if self._client.config.fail_policy == "closed":
            raise error
        log.warning("%s; metering %s locally (fail-open)", error, self.budget_id)
        self.state = "unmetered"

    async def _open_call(
        self, *, resume: bool
    ) -> grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent]:
        stub = await self._client._budget_stub()
        call = stub.Meter(None, metadata=self._client._metadata())
        opening = pb.MeterOpen(
            budget_id=self.budget_id,
            model=self.model,
            prompt_tokens_estimate=self.prompt_tokens,
            max_output_tokens=self.max_output_tokens,
            idempotency_key=self.idempotency_key,
            labels=self.labels,
            resume_reservation_id=self.reservation_id if resume else "",
        )
        try:
            await call.write(pb.MeterRequest(open=opening))
            event = await call.read()
        except grpc.aio.AioRpcError as error:
            raise translate(error) from None
        if not isinstance(event, pb.MeterEvent):  # grpc.aio.EOF
            raise BudgetUnavailable("budgetd closed the meter stream before opening it")
        opened = event.opened
        self.reservation_id = opened.reservation_id
        self.granted_output_tokens = opened.granted_output_tokens
        self._sent = Usage.from_pb(opened.usage) if resume else Usage()
        self._call = call
        if resume:
            self._dirty.set()  # send the totals counted while away
        return call

    async def _supervise(
        self, call: grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent]
    ) -> None:
        """Pump the stream; when it breaks, resume it with backoff until finished."""
        first, largest = self._client.config.reconnect_backoff_s
        while True:
            try:
                await self._pump(call)
                return
            except (_ConnectionLost, grpc.aio.AioRpcError) as lost:
                if isinstance(lost, grpc.aio.AioRpcError) and lost.code() not in UNREACHABLE:
                    log.warning("meter stream failed: %s", lost.details())
                    return
            self._call = None
            pause = first
            while True:
                if self._finishing:
                    return  # finish() settles by unary Commit
                await asyncio.sleep(pause)
                try:
                    call = await self._open_call(resume=True)
                    log.info("meter stream resumed for %s", self.reservation_id)
                    break
                except BudgetUnavailable:
                    pause = min(pause * 2, largest)
                except BudgetError as error:
                    # Finished or expired while we were away; the final commit reconciles.
                    log.warning("cannot resume meter stream: %s", error)
                    return

    async def _pump(self, call: grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent]) -> None:
        writer = asyncio.create_task(self._write(call))
        try:
            while True:
                event = await call.read()
                if not isinstance(event, pb.MeterEvent):  # grpc.aio.EOF
                    raise _ConnectionLost()
                kind = event.WhichOneof("event")
                if kind == "granted":
                    self.granted_output_tokens = event.granted.granted_output_tokens
                elif kind == "abort":
                    self._abort(event.abort)
                elif kind == "alert":
                    log.info(
                        "budget %s crossed %s%%", event.alert.budget_id, event.alert.threshold_pct
                    )
                elif kind == "committed":
                    if self._committed_event is not None and not self._committed_event.done():
                        self._committed_event.set_result(event.committed)
                    return
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, Exception):
                await writer

    async def _write(self, call: grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent]) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            usage = self._usage
            if usage != self._sent:
                await call.write(pb.MeterRequest(usage=pb.MeterUsage(usage=usage.to_pb())))
                self._sent = usage
            if self._finishing and self._committed_event is not None:
                final = self._provider_usage
                await call.write(
                    pb.MeterRequest(
                        finish=pb.MeterFinish(
                            usage=(final or self._usage).to_pb(),
                            has_provider_usage=final is not None,
                        )
                    )
                )
                await call.done_writing()
                return

    async def finish(self) -> Committed:
        """Commit the response's usage: the provider's when it reported one, else our count."""
        if self.committed is not None:
            return self.committed
        if self.state == "unopened":
            raise RuntimeError("finish() before open()")
        self._finishing = True
        try:
            if self.state == "unmetered":
                self.committed = self._spool()
            else:
                self.committed = await self._settle()
        finally:
            self.state = "finished"
            if self._supervisor is not None:
                self._supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._supervisor
        if self.aborted is not None:
            self.aborted.usage = self.usage
            self.aborted.charged = self.committed.charged
            self.aborted.partial_text = self.counter.text
        return self.committed

    async def _settle(self) -> Committed:
        loop = asyncio.get_running_loop()
        self._committed_event = loop.create_future()
        timeout_s = self._client.config.finish_timeout_s
        if self._call is not None:
            self._dirty.set()
            try:
                committed = await asyncio.wait_for(asyncio.shield(self._committed_event), 2.0)
                return _committed_from_pb(committed)
            except TimeoutError:
                pass  # the stream broke on the way; settle by unary Commit instead
        deadline = loop.time() + timeout_s
        pause = self._client.config.reconnect_backoff_s[0]
        while True:
            try:
                return await self._client.commit(self.reservation_id, usage=self.usage)
            except BudgetUnavailable:
                if loop.time() + pause > deadline:
                    return self._spool()
                await asyncio.sleep(pause)
                pause = min(pause * 2, self._client.config.reconnect_backoff_s[1])
            except ReservationError:
                raise

    def _spool(self) -> Committed:
        entry = SpoolEntry(
            idempotency_key=self.idempotency_key,
            budget_id=self.budget_id,
            model=self.model,
            usage=self.usage,
            reservation_id=self.reservation_id,
            labels=self.labels or None,
        )
        self._client._spool_entry(entry)
        reservation = Reservation(
            id=self.reservation_id,
            budget_id=self.budget_id,
            state="PENDING",
            granted=0,
            charged=0,
            overage=0,
            usage=self.usage,
            expires_at_us=0,
        )
        return Committed(reservation=reservation, charged=0, overage=0, budget=None, spooled=True)


def _committed_from_pb(message: pb.MeterCommitted) -> Committed:
    return Committed(
        reservation=Reservation.from_pb(message.reservation),
        charged=message.charged,
        overage=message.overage,
        budget=Budget.from_pb(message.budget),
    )
