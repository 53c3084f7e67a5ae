"""One meter stream's state machine: unopened -> open -> (aborted) -> finished | broken.

Usage messages are cumulative and handled in memory: inside the grant nothing is written
and nothing is sent. As usage nears the grant, an extension goes through the budget's
actor in the background (grants grow geometrically, shrinking to exactly what is left
near the limit). When usage reaches a grant that could not grow, the stream is aborted
at once, from memory, which is what keeps abort latency at one message hop. Such a grant
is sent marked final, so that the client can cut the upstream there itself, with no hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server import validation
from budget_server.api.convert import budget_to_pb, reservation_to_pb, usage_to_pb
from budget_server.errors import (
    BudgetExhausted,
    BudgetFrozen,
    FailedPrecondition,
    InvalidArgument,
    LedgerError,
    NotFound,
    Overloaded,
)
from budget_server.events.model import BudgetEvent, new_event_id
from budget_server.ledger.ledger import Ledger
from budget_server.ledger.model import (
    CommitOp,
    ExtendOp,
    OpResult,
    RecordUsageOp,
    ReserveOp,
)
from budget_server.ledger.usage import ZERO_USAGE, Usage
from budget_server.limits import AMOUNT_MAX
from budget_server.meter.policy import GrantPolicy

log = logging.getLogger("budgetd.meter")

State = Literal["unopened", "open", "aborted", "finished", "broken"]


class MeterSession:
    """The server side of one Meter stream.

    Slotted: a process holds one per open stream (tens of thousands), and a slotted object
    is a fraction of the size of one with an instance dict."""

    __slots__ = (
        "_allowance",
        "_allowance_at",
        "_capped_by",
        "_extension",
        "_ledger",
        "_persisted_usage",
        "_policy",
        "_send",
        "beat_tick",
        "budget_id",
        "chain_ids",
        "grant",
        "max_output_tokens",
        "reservation_id",
        "state",
        "usage",
    )

    def __init__(
        self, ledger: Ledger, policy: GrantPolicy, send: Callable[[pb.MeterEvent], None]
    ) -> None:
        self._ledger = ledger
        self._policy = policy
        self._send = send
        self.state: State = "unopened"
        self.reservation_id = ""
        self.budget_id = ""
        self.chain_ids: tuple[str, ...] = ()  # root-first; events on any of them concern us
        self.max_output_tokens = 0
        self.grant = ZERO_USAGE
        self.usage = ZERO_USAGE
        self._persisted_usage = ZERO_USAGE
        self._capped_by = ""  # the budget that could not give more at the last extension
        self._extension: asyncio.Task[None] | None = None
        # Token bucket for usage messages: full at start, refilled at the policy's rate.
        self._allowance = float(2 * policy.usage_messages_per_s_max)
        self._allowance_at = time.monotonic()
        self.beat_tick = -1  # where the shared Heartbeat keeps it (heartbeat.py)

    # ------------------------------------------------------------------ open

    async def open(self, message: pb.MeterOpen) -> pb.MeterOpened:
        if message.resume_reservation_id:
            result = await self._resume(message)
            resumed = True
        else:
            result = await self._reserve(message)
            resumed = False
            wanted = self._policy.initial_output_tokens
            if self.max_output_tokens:
                wanted = min(wanted, self.max_output_tokens)
            if result.reservation.grant.output_tokens < wanted:
                # Already shrunk to what is left: an extension could only be refused, so
                # reaching this grant aborts at once, from memory.
                self._capped_by = self._tightest(result)
        reservation = result.reservation
        self.reservation_id = reservation.id
        self.budget_id = reservation.budget_id
        self.chain_ids = await self._ledger.chain_of(self.budget_id)
        self.grant = reservation.grant
        self.usage = self._persisted_usage = reservation.usage
        self.state = "open"
        log.debug("meter stream open", extra={"reservation_id": self.reservation_id})
        return pb.MeterOpened(
            reservation_id=reservation.id,
            granted_output_tokens=self.grant.output_tokens,
            resumed=resumed,
            usage=usage_to_pb(reservation.usage),
            grant_final=bool(self._capped_by),
            capped_by=self._capped_by,
            report_at_output_tokens=self._report_at(),
        )

    async def _reserve(self, message: pb.MeterOpen) -> OpResult:
        budget_id = validation.budget_id(message.budget_id)
        prompt = validation.amount(
            message.prompt_tokens_estimate, "prompt_tokens_estimate", allow_zero=True
        )
        max_output = validation.amount(
            message.max_output_tokens, "max_output_tokens", allow_zero=True
        )
        self.max_output_tokens = max_output
        initial = self._policy.initial_output_tokens
        high = min(initial, max_output) if max_output else initial
        return await self._ledger.reserve(
            ReserveOp(
                budget_id=budget_id,
                amount=0,
                estimate=Usage(input_tokens=prompt),
                model=validation.model(message.model),
                ttl_ms=self._policy.ttl_ms,
                idempotency_key=validation.idempotency_key(message.idempotency_key),
                labels=validation.labels(message.labels),
                output_range=(min(1, high), high),
                actor="meter",
            )
        )

    async def _resume(self, message: pb.MeterOpen) -> OpResult:
        reservation_id = validation.reservation_id(message.resume_reservation_id)
        self.max_output_tokens = validation.amount(
            message.max_output_tokens, "max_output_tokens", allow_zero=True
        )
        owner = await self._ledger.owner_of(reservation_id)
        if message.budget_id and message.budget_id != owner:  # checked before anything changes
            raise InvalidArgument(
                f"reservation {reservation_id!r} belongs to budget {owner!r}, "
                f"not {message.budget_id!r}"
            )
        return await self._ledger.record_usage(
            RecordUsageOp(
                reservation_id=reservation_id, usage=None, ttl_ms=self._policy.ttl_ms, actor="meter"
            )
        )

    # ------------------------------------------------------------------ usage

    def on_usage(self, usage: Usage) -> None:
        """Take a cumulative usage report; memory only, unless the grant must grow."""
        if self.state not in ("open", "aborted"):
            raise FailedPrecondition("usage sent after the stream finished")
        self._take_allowance()
        if not usage.covers(self.usage):
            raise InvalidArgument(
                "usage went backwards (counts are cumulative): "
                f"got input {usage.input_tokens}, output {usage.output_tokens} after "
                f"input {self.usage.input_tokens}, output {self.usage.output_tokens}"
            )
        self.usage = usage
        if self.state == "open":
            self._check_grant()

    def _take_allowance(self) -> None:
        rate = self._policy.usage_messages_per_s_max
        now = time.monotonic()
        self._allowance = min(2.0 * rate, self._allowance + (now - self._allowance_at) * rate)
        self._allowance_at = now
        if self._allowance < 1:
            raise Overloaded(
                f"usage messages arrive faster than {rate}/s on this stream "
                "(usage_messages_per_s_max); counts are cumulative, so send them less often"
            )
        self._allowance -= 1

    def _at_edge(self) -> bool:
        """Whether the next token would be beyond the grant."""
        return (
            self.usage.output_tokens >= self.grant.output_tokens
            or self.usage.input_tokens > self.grant.input_tokens
        )

    def _check_grant(self) -> None:
        if self._extension is not None:
            return  # its completion re-checks with the latest usage
        if self._at_edge():
            within = (
                self.usage.output_tokens <= self.grant.output_tokens
                and self.usage.input_tokens <= self.grant.input_tokens
            )
            if within and self._output_complete():
                return  # the grant reaches max_output_tokens: the provider stops here
            if self._capped_by:
                self._abort(pb.ABORT_REASON_EXHAUSTED, self._capped_by)
            else:
                self._extension = asyncio.create_task(self._extend())
            return
        near = self.usage.output_tokens >= self._report_at()
        if near and not self._capped_by and not self._output_complete():
            self._extension = asyncio.create_task(self._extend())

    def _report_at(self) -> int:
        """The output count from which `_check_grant` can decide anything: the refill mark,
        or the grant itself when it cannot grow. Told to the client, which then sends usage
        below it seldom: at provider speeds most tokens fall below it, and a usage message
        costs the client (and this process) more than counting the token did."""
        grant = self.grant.output_tokens
        if self._capped_by or self._output_complete():
            return grant
        return min(grant, -(-grant * self._policy.refill_at_pct // 100))

    def _output_complete(self) -> bool:
        return bool(self.max_output_tokens) and self.grant.output_tokens >= self.max_output_tokens

    async def _extend(self) -> None:
        policy = self._policy
        target = max(
            self.grant.output_tokens * policy.growth,
            self.usage.output_tokens + policy.step_min_output_tokens,
        )
        if self.max_output_tokens:
            target = min(target, max(self.max_output_tokens, self.usage.output_tokens))
        target = min(target, AMOUNT_MAX)
        usage = self.usage
        announced = False
        try:
            result = await self._ledger.extend(
                ExtendOp(
                    reservation_id=self.reservation_id,
                    amount=0,
                    estimate=None,
                    ttl_ms=policy.ttl_ms,
                    usage=usage,
                    grant_target=Usage(
                        input_tokens=max(usage.input_tokens, self.grant.input_tokens),
                        output_tokens=target,
                    ),
                    output_floor=max(usage.output_tokens, self.grant.output_tokens),
                    actor="meter",
                )
            )
        except BudgetExhausted as refused:
            self._capped_by = refused.budget_id
        except BudgetFrozen as frozen:
            self._extension = None
            self._abort(pb.ABORT_REASON_FROZEN, frozen.budget_id, str(frozen))
            return
        except FailedPrecondition as refused:  # finished or expired under us
            self._extension = None
            self._abort(pb.ABORT_REASON_EXPIRED, self.budget_id, str(refused))
            return
        except LedgerError as error:
            log.warning("meter extension failed: %s", error)
            self._capped_by = self.budget_id
        else:
            self._persisted_usage = usage
            grown = result.reservation.grant.output_tokens > self.grant.output_tokens
            self.grant = result.reservation.grant
            if self.grant.output_tokens < target:
                self._capped_by = self._tightest(result)
            if grown and self.state == "open":
                self._send_grant()
                announced = True
        self._extension = None
        if self.state == "open":
            self._check_grant()
        if self.state == "open" and self._capped_by and not announced:
            # Refused before the stream reached its grant: say the grant is final, so the
            # client cuts the upstream at it without waiting for our abort.
            self._send_grant()

    def _send_grant(self) -> None:
        self._send(
            pb.MeterEvent(
                granted=pb.MeterGranted(
                    granted_output_tokens=self.grant.output_tokens,
                    final=bool(self._capped_by),
                    capped_by=self._capped_by,
                    report_at_output_tokens=self._report_at(),
                )
            )
        )

    @staticmethod
    def _tightest(result: OpResult) -> str:
        """The budget with the least left, root-first on ties: the one that capped a grant."""
        hard = [b for b in result.chain if b.mode == "HARD"] or list(result.chain)
        return min(hard, key=lambda b: b.available).id

    def _abort(self, reason: pb.AbortReason.ValueType, budget_id: str, message: str = "") -> None:
        self.state = "aborted"
        self._ledger.metrics.aborts.labels(pb.AbortReason.Name(reason)).inc()
        text = message or f"budget {budget_id!r} is exhausted"
        log.info(
            "meter stream aborted",
            extra={
                "reservation_id": self.reservation_id,
                "budget_id": budget_id,
                "reason": pb.AbortReason.Name(reason),
                "output_tokens": self.usage.output_tokens,
                "granted_output_tokens": self.grant.output_tokens,
            },
        )
        self._send(
            pb.MeterEvent(abort=pb.MeterAbort(reason=reason, budget_id=budget_id, message=text))
        )
        if self._ledger.events.has_subscribers:
            self._ledger.events.publish(
                BudgetEvent(
                    id=new_event_id(),
                    kind="ABORTED",
                    budget_id=budget_id,
                    at_us=self._ledger.clock.now_us(),
                    reservation_id=self.reservation_id,
                    amount=self.usage.output_tokens,
                    message=f"{pb.AbortReason.Name(reason)}: {text}",
                )
            )

    def alert(self, budget_id: str, threshold_pct: int, spent: int, limit: int) -> None:
        """A budget of this stream's chain crossed an alert threshold."""
        if self.state == "open":
            self._send(
                pb.MeterEvent(
                    alert=pb.MeterAlert(
                        budget_id=budget_id, threshold_pct=threshold_pct, spent=spent, limit=limit
                    )
                )
            )

    def abort_externally(
        self, reason: pb.AbortReason.ValueType, budget_id: str, message: str
    ) -> None:
        """Freeze or a lowered limit: abort a live stream from outside its own messages."""
        if self.state == "open":
            self._abort(reason, budget_id, message)

    # ------------------------------------------------------------------ finish

    async def finish(self, message: pb.MeterFinish, final_usage: Usage) -> pb.MeterCommitted:
        """Commit the provider's usage when it has one, else the client's own count."""
        if self.state not in ("open", "aborted"):
            raise FailedPrecondition("the stream is not open")
        if not message.has_provider_usage:
            if not final_usage.is_zero:
                self.on_usage(final_usage)
            final_usage = self.usage
        if self._extension is not None:
            with contextlib.suppress(Exception):
                await self._extension
        result = await self._ledger.commit(
            CommitOp(reservation_id=self.reservation_id, usage=final_usage, amount=0, actor="meter")
        )
        self.state = "finished"
        return pb.MeterCommitted(
            reservation=reservation_to_pb(result.reservation),
            charged=result.charged,
            overage=result.overage,
            budget=budget_to_pb(result.budget),
        )

    def close_at_once(self) -> bool:
        """The stream ended: stop its extension, and say whether that is all (it finished,
        or never opened). False: `close` must run, to keep the reservation for a resume.
        Most streams finish, and then need no task to close."""
        if self._extension is not None:
            self._extension.cancel()
        return self.state not in ("open", "aborted")

    async def close(self) -> None:
        """The stream ended. Unless it finished, keep the reservation for a resume window,
        with its last usage persisted, after which the sweeper charges that usage."""
        if self.close_at_once():
            return
        self.state = "broken"
        try:
            await self._ledger.record_usage(
                RecordUsageOp(
                    reservation_id=self.reservation_id,
                    usage=self.usage,
                    ttl_ms=self._policy.resume_window_ms,
                    actor="meter",
                )
            )
        except (FailedPrecondition, NotFound):
            pass  # finished meanwhile, e.g. resumed and committed through another stream
        except LedgerError as error:
            log.warning(
                "could not persist usage of broken stream %s: %s", self.reservation_id, error
            )

    # ------------------------------------------------------------------ heartbeat

    async def beat(self) -> None:
        """Persist usage and push the expiry while the stream lives, so a live stream's
        reservation never expires and a crash loses at most one beat of usage. Called every
        heartbeat_ms by the process's one Heartbeat (heartbeat.py), not by a task per stream.
        An extension in flight persists usage and pushes the expiry itself."""
        if self.state != "open" or self._extension is not None:
            return
        usage = self.usage
        try:
            await self._ledger.record_usage(
                RecordUsageOp(
                    reservation_id=self.reservation_id,
                    usage=usage,
                    ttl_ms=self._policy.ttl_ms,
                    actor="meter",
                )
            )
            self._persisted_usage = usage
        except LedgerError as error:
            if self.state == "open":  # else it finished or broke meanwhile: nothing lost
                log.warning("meter heartbeat failed for %s: %s", self.reservation_id, error)
