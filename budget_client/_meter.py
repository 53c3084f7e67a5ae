"""One metered response on the client side: a Meter stream to budgetd, kept alive across
server restarts, and the abort signal delivered to whoever must close the upstream.

    async with client.meter("team:search", model="gpt-4o", prompt_tokens=812) as meter:
        meter.on_abort(close_upstream)
        async for delta in upstream:
            meter.add_output_text(delta)
        meter.set_provider_usage(final_usage)        # when the provider reports one

Usage is sent cumulative and only the latest value matters, so a writer task sends the
newest totals and never queues stale ones: at once from budgetd's report mark on (where it
extends or aborts), once per `usage_report_interval_s` below it. If the stream to budgetd
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
from budget_client._errors import BudgetError, BudgetExceeded, BudgetUnavailable
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._rpc import STREAM_BROKEN, ended_call_error, translate
from budget_client._spool import SpoolEntry
from budget_client._types import Budget, Committed, Reservation, Usage

if TYPE_CHECKING:
    from budget_client._client import BudgetClient

log = logging.getLogger("budget_client.meter")

MeterCall = grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent]

# How long finish() waits for `committed` on a live stream before it settles by unary Commit
# instead. The stream is watched too: if it breaks, the unary Commit starts at once.
STREAM_FINISH_WAIT_S = 2.0

# Least time between two usage messages of one stream: at most 1,000 a second, half of
# budgetd's default usage_messages_per_s_max. Counts are cumulative, so a provider (or a
# drained buffer) producing tokens faster only has its totals sent less often, nothing lost.
# This is the pace from budgetd's report mark on; below it, usage goes every
# `ClientConfig.usage_report_interval_s`.
USAGE_INTERVAL_S = 0.001

# Resumes of one stream, at most: a replica that keeps breaking streams must not keep the
# client reconnecting for the whole response. Past it, finish() commits by unary call.
RESUMES_MAX = 50

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
        self.grant_final = False
        """budgetd will not grow the grant: reaching it aborts, here, with no round trip."""
        self._capped_by = ""
        self.report_at_output_tokens = 0
        """From this output count on, budgetd acts on our usage (it extends the grant, or
        aborts at it), so every change is sent at once; below it, every
        `usage_report_interval_s`. 0 (a server that names no mark): every change at once."""
        self._report_timer: asyncio.TimerHandle | None = None
        self.aborted: BudgetExceeded | None = None
        self.committed: Committed | None = None
        self._usage = Usage(input_tokens=prompt_tokens)
        self._provider_usage: Usage | None = None
        self._sent = Usage()
        self._dirty = asyncio.Event()
        self._abort_callbacks: list[AbortCallback] = []
        self._callback_tasks: set[asyncio.Future[None]] = set()
        self._call: MeterCall | None = None
        self._committed_event: asyncio.Future[pb.MeterCommitted] | None = None
        self._finishing = False
        self._finished: asyncio.Future[Committed] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.resumes = 0
        """How many times the stream to budgetd broke and was resumed (on any replica)."""

    @property
    def connected(self) -> bool:
        """Whether a meter stream to budgetd is up right now (False while resuming)."""
        return self._call is not None

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
        if (
            usage.output_tokens < self.report_at_output_tokens
            and usage.input_tokens <= self.prompt_tokens  # within what the grant holds
        ):
            self._report_later()
        else:
            self._dirty.set()  # sent all the same: budgetd settles its side of an abort on it
        self._cut_at_final_grant()

    def _report_later(self) -> None:
        """Below the report mark budgetd only keeps our count (for a crash, and its
        heartbeat persists it every few seconds): one message per interval is enough."""
        if self._report_timer is None:
            self._report_timer = asyncio.get_running_loop().call_later(
                self._client.config.usage_report_interval_s, self._report_due
            )

    def _report_due(self) -> None:
        self._report_timer = None
        self._dirty.set()

    def _cut_at_final_grant(self) -> None:
        """Abort here when the count reaches a final grant, by budgetd's own rule for it
        (meter/session.py): the next token would be past the grant, unless the grant
        already reaches max_output_tokens. budgetd decides the same on the same totals;
        deciding it here saves the round trip, the tokens streamed meanwhile included."""
        if not self.grant_final or self.aborted is not None:
            return
        output, granted = self._usage.output_tokens, self.granted_output_tokens
        complete = bool(self.max_output_tokens) and granted >= self.max_output_tokens
        if output > granted or (output == granted and not complete):
            self._abort(pb.MeterAbort(reason=pb.ABORT_REASON_EXHAUSTED, budget_id=self._capped_by))

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
        except BudgetError as error:
            if error.code not in STREAM_BROKEN:
                raise  # budgetd's answer: exhausted, unknown budget, bad key...
            # budgetd is there but cannot serve (its own failure): the same as away.
            self._go_unmetered(BudgetUnavailable(error.message, code=error.code))
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

    async def _open_call(self, *, resume: bool) -> MeterCall:
        stub = await self._client._budget_stub()
        # A resume waits for the channel to reconnect rather than failing fast, so that it
        # goes through the moment a replica is back; finish() cancels it if it is too late.
        call: MeterCall = stub.Meter(
            None, metadata=self._client._metadata(), wait_for_ready=resume or None
        )
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
        except asyncio.InvalidStateError:
            # The call ended before our first write (no replica reachable, say); grpc.aio
            # reports that as a state error, the call's status says why.
            raise await ended_call_error(call) from None
        except BaseException:
            call.cancel()  # e.g. open()'s connect timeout: leave no stream behind
            raise
        if not isinstance(event, pb.MeterEvent) or event.WhichOneof("event") != "opened":
            call.cancel()
            raise BudgetUnavailable("budgetd closed the meter stream before opening it")
        opened = event.opened
        self.reservation_id = opened.reservation_id
        self._set_grant(
            opened.granted_output_tokens,
            opened.grant_final,
            opened.capped_by,
            opened.report_at_output_tokens,
        )
        # The server's last record of our usage: what was lost with the old stream is
        # re-sent (cumulative totals, so nothing counts twice).
        self._sent = Usage.from_pb(opened.usage) if resume else Usage()
        self._call = call
        if resume:
            self._dirty.set()  # send the totals counted while away
        return call

    def _set_grant(
        self, granted_output_tokens: int, final: bool, capped_by: str, report_at: int
    ) -> None:
        self.granted_output_tokens = granted_output_tokens
        self.grant_final, self._capped_by = final, capped_by
        self.report_at_output_tokens = report_at
        # Counted past the new mark, or the final grant, while the notice was on its way.
        if self._usage.output_tokens >= report_at > 0:
            self._dirty.set()  # rather than at the end of a quiet interval
        self._cut_at_final_grant()

    async def _supervise(self, call: MeterCall) -> None:
        """Pump the stream; when it breaks, resume it with backoff until finished."""
        try:
            while True:
                try:
                    await self._pump(call)
                    return  # committed
                except (_ConnectionLost, grpc.aio.AioRpcError) as lost:
                    if isinstance(lost, grpc.aio.AioRpcError) and lost.code() not in STREAM_BROKEN:
                        log.warning("meter stream failed: %s", lost.details())
                        return  # finish() settles by unary Commit
                self._call = None
                resumed = await self._resume()
                if resumed is None:
                    return
                call = resumed
        finally:
            self._call = None

    async def _resume(self) -> MeterCall | None:
        """A new stream carrying on the reservation, or None once finishing or refused."""
        first, largest = self._client.config.reconnect_backoff_s
        pause = first
        if self.resumes >= RESUMES_MAX:
            log.warning(
                "meter stream %s broke %d times; not resuming", self.reservation_id, RESUMES_MAX
            )
            return None
        while not self._finishing:
            await asyncio.sleep(pause)
            if self._finishing:
                break  # finish() settles by unary Commit
            try:
                call = await self._open_call(resume=True)
            except BudgetError as error:
                if error.code in STREAM_BROKEN:  # away still, or broke again on the way
                    pause = min(pause * 2, largest)
                    continue
                # Finished or expired while we were away; the final commit reconciles.
                log.warning("cannot resume meter stream %s: %s", self.reservation_id, error)
                return None
            self.resumes += 1
            log.info("meter stream resumed for %s", self.reservation_id)
            return call
        return None

    async def _pump(self, call: MeterCall) -> None:
        writer = asyncio.create_task(self._write(call))
        try:
            while True:
                event = await call.read()
                if not isinstance(event, pb.MeterEvent):  # grpc.aio.EOF
                    raise _ConnectionLost()
                kind = event.WhichOneof("event")
                if kind == "granted":
                    granted = event.granted
                    self._set_grant(
                        granted.granted_output_tokens,
                        granted.final,
                        granted.capped_by,
                        granted.report_at_output_tokens,
                    )
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

    async def _write(self, call: MeterCall) -> None:
        loop = asyncio.get_running_loop()
        sent_at = float("-inf")
        while True:
            await self._dirty.wait()
            pause_s = sent_at + USAGE_INTERVAL_S - loop.time()
            if pause_s > 0 and not self._finishing:
                await asyncio.sleep(pause_s)  # totals counted meanwhile go in this message
            self._dirty.clear()
            usage = self._usage
            if usage != self._sent:
                await call.write(pb.MeterRequest(usage=pb.MeterUsage(usage=usage.to_pb())))
                self._sent = usage
                sent_at = loop.time()
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
        """Commit the response's usage: the provider's when it reported one, else our count.

        Idempotent, also when called again while the first call is still settling (an app's
        `close()` racing the stream's own end): every caller gets the one outcome.
        """
        if self.committed is not None:
            return self.committed
        if self.state == "unopened":
            raise RuntimeError("finish() before open()")
        if self._finished is not None:
            return await asyncio.shield(self._finished)
        finished = self._finished = asyncio.get_running_loop().create_future()
        self._finishing = True
        try:
            if self.state == "unmetered":
                committed = self._spool()
            else:
                committed = await self._settle()
        except BaseException as error:
            self._finished = None  # a later finish() tries again (by unary Commit)
            if isinstance(error, asyncio.CancelledError):
                finished.cancel()
            else:
                finished.set_exception(error)
                finished.exception()  # retrieved: a lone caller must not log it as lost
            raise
        finally:
            await self._stop_supervisor()
        self.committed = committed
        self.state = "finished"
        finished.set_result(committed)
        if self.aborted is not None:
            self.aborted.usage = self.usage
            self.aborted.charged = self.committed.charged
            self.aborted.partial_text = self.counter.text
        return self.committed

    async def _stop_supervisor(self) -> None:
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await supervisor
        self._call = None

    async def _settle(self) -> Committed:
        loop = asyncio.get_running_loop()
        self._committed_event = committed = loop.create_future()
        supervisor = self._supervisor
        if self._call is not None and supervisor is not None and not supervisor.done():
            self._dirty.set()  # the writer sends the last totals, then finish
            await asyncio.wait(
                (committed, supervisor),
                timeout=STREAM_FINISH_WAIT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if committed.done():
                return _committed_from_pb(committed.result())
        # No live stream, or it broke while finishing. Stop resuming first, so that no
        # stream can finish behind our back, then commit by unary call: Commit is
        # idempotent, so a finish that did reach budgetd is not charged twice.
        await self._stop_supervisor()
        if self._client.state == "closed":  # its channel is gone: keep the usage on disk
            log.warning(
                "the BudgetClient was closed under a live meter; reservation %s's usage is "
                "spooled for the next client on %s to replay",
                self.reservation_id,
                self._client.config.spool_dir,
            )
            return self._spool()
        config = self._client.config
        deadline = loop.time() + config.finish_timeout_s
        pause = config.reconnect_backoff_s[0]
        while (remaining_s := deadline - loop.time()) > 0:
            try:
                # Waits for the channel to reconnect, so the commit goes through the moment
                # a replica is back rather than at the next retry.
                return await self._client._commit(
                    self.reservation_id, self.usage, 0, remaining_s, wait_for_ready=True
                )
            except BudgetUnavailable:
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(pause * 2, config.reconnect_backoff_s[1])
        return self._spool()

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
