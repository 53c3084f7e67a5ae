"""BudgetClient: what an app instance embeds to reserve, commit and meter against budgetd.

State: unopened -> open -> closed (httpx's ClientState). The gRPC channel is made on first
use, inside the running event loop, because grpc.aio channels belong to one loop; `close()`
waits for spool replay to stop and is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from typing import Literal, TypeVar

import grpc

from budget_client._config import ClientConfig, FailPolicy
from budget_client._errors import BudgetError, BudgetUnavailable, ReservationError
from budget_client._grpc_wakeup import drain_wakeups_on
from budget_client._meter import Meter
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_client._rpc import open_channel, translate
from budget_client._spool import Spool, SpoolEntry
from budget_client._types import Budget, Committed, Reservation, Usage

log = logging.getLogger("budget_client")

ClientState = Literal["unopened", "open", "closed"]
Request = TypeVar("Request")
Response = TypeVar("Response")


class BudgetClient:
    """Async client of budgetd. `async with BudgetClient("127.0.0.1:50051") as budgets: ...`"""

    def __init__(
        self,
        address: str | list[str] | tuple[str, ...] | None = None,
        *,
        fail_policy: FailPolicy | None = None,
        config: ClientConfig | None = None,
        **overrides: object,
    ) -> None:
        base = config or ClientConfig()
        changes: dict[str, object] = dict(overrides)
        if address is not None:
            changes["addresses"] = (address,) if isinstance(address, str) else tuple(address)
        if fail_policy is not None:
            changes["fail_policy"] = fail_policy
        if changes:
            from dataclasses import replace

            base = replace(base, **changes)  # type: ignore[arg-type]
        self.config = base
        self.state: ClientState = "unopened"
        self.spool = Spool(self.config.spool_dir)
        self._channel: grpc.aio.Channel | None = None
        self._budget: pb_grpc.BudgetServiceAsyncStub | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop its channel is bound to

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> BudgetClient:
        await self._budget_stub()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        if self._channel is not None:
            await self._channel.close(None)

    async def _budget_stub(self) -> pb_grpc.BudgetServiceAsyncStub:
        if self.state == "closed":
            raise RuntimeError("the BudgetClient is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            # grpc.aio binds a channel to the loop it was made in; on another loop its
            # calls fail with "Event loop is closed" or hang, far from the cause.
            raise RuntimeError(
                "this BudgetClient was first used in another event loop (each asyncio.run "
                "makes a new one); make a BudgetClient per loop"
            )
        if self._budget is None:
            self._loop = loop
            self._channel = open_channel(self.config)
            if self.config.drain_grpc_wakeups:
                # A busy app loop would otherwise hold back this process's gRPC
                # completions for seconds at a time (see _grpc_wakeup).
                drain_wakeups_on(loop)
            self._budget = pb_grpc.BudgetServiceStub(self._channel)
            self.state = "open"
            if self.spool.entries():
                self._start_replayer()
        return self._budget

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.config.api_key:
            return (("authorization", f"Bearer {self.config.api_key}"),)
        return ()

    # ------------------------------------------------------------------ unary calls

    async def reserve(
        self,
        budget_id: str,
        amount: int = 0,
        *,
        estimate: Usage | None = None,
        model: str = "",
        ttl_ms: int = 0,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Reservation:
        """Hold `amount` (in the budget's unit) or what `estimate` costs, on the budget and
        every ancestor; raises BudgetExceeded with the amount available when it cannot."""
        request = pb.ReserveRequest(
            budget_id=budget_id,
            amount=amount,
            model=model,
            ttl_ms=ttl_ms,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
            labels=dict(labels or {}),
        )
        if estimate is not None:
            request.estimate.CopyFrom(estimate.to_pb())
        stub = await self._budget_stub()
        response = await self._call(stub.Reserve, request)
        return Reservation.from_pb(response.reservation)

    async def extend(self, reservation_id: str, amount: int, *, ttl_ms: int = 0) -> Reservation:
        stub = await self._budget_stub()
        response = await self._call(
            stub.Extend,
            pb.ExtendRequest(reservation_id=reservation_id, amount=amount, ttl_ms=ttl_ms),
        )
        return Reservation.from_pb(response.reservation)

    async def commit(
        self, reservation_id: str, *, usage: Usage | None = None, amount: int = 0
    ) -> Committed:
        """Charge the actual usage (even above the grant: the tokens were spent)."""
        return await self._commit(reservation_id, usage, amount, self.config.timeout_s)

    async def _commit(
        self,
        reservation_id: str,
        usage: Usage | None,
        amount: int,
        timeout_s: float,
        *,
        wait_for_ready: bool = False,
    ) -> Committed:
        request = pb.CommitRequest(reservation_id=reservation_id, amount=amount)
        if usage is not None:
            request.usage.CopyFrom(usage.to_pb())
        stub = await self._budget_stub()
        response = await self._call(
            stub.Commit, request, timeout_s=timeout_s, wait_for_ready=wait_for_ready
        )
        return Committed(
            reservation=Reservation.from_pb(response.reservation),
            charged=response.charged,
            overage=response.overage,
            budget=Budget.from_pb(response.budget),
            replayed=response.replayed,
        )

    async def release(self, reservation_id: str) -> Reservation:
        stub = await self._budget_stub()
        response = await self._call(stub.Release, pb.ReleaseRequest(reservation_id=reservation_id))
        return Reservation.from_pb(response.reservation)

    async def charge(
        self,
        budget_id: str,
        usage: Usage,
        *,
        model: str = "",
        idempotency_key: str,
        labels: Mapping[str, str] | None = None,
    ) -> Committed:
        """Record usage that already happened without a reservation (spool replay)."""
        stub = await self._budget_stub()
        response = await self._call(
            stub.Charge,
            pb.ChargeRequest(
                budget_id=budget_id,
                usage=usage.to_pb(),
                model=model,
                idempotency_key=idempotency_key,
                labels=dict(labels or {}),
            ),
        )
        return Committed(
            reservation=Reservation.from_pb(response.reservation),
            charged=response.charged,
            overage=response.reservation.overage,
            budget=Budget.from_pb(response.budget),
            replayed=response.replayed,
        )

    async def get_budget(self, budget_id: str) -> Budget:
        stub = await self._budget_stub()
        response = await self._call(stub.GetBudget, pb.GetBudgetRequest(budget_id=budget_id))
        return Budget.from_pb(response.budget)

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        timeout_s: float | None = None,
        wait_for_ready: bool = False,
    ) -> Response:
        try:
            return await method(
                request,
                timeout=self.config.timeout_s if timeout_s is None else timeout_s,
                metadata=self._metadata(),
                wait_for_ready=wait_for_ready or None,
            )
        except grpc.aio.AioRpcError as error:
            raise translate(error) from None

    # ------------------------------------------------------------------ metering

    def meter(
        self,
        budget_id: str,
        *,
        model: str,
        prompt_tokens: int = 0,
        max_output_tokens: int = 0,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Meter:
        """A Meter for one streamed response; open it with `async with`."""
        return Meter(
            self,
            budget_id,
            model=model,
            prompt_tokens=prompt_tokens,
            max_output_tokens=max_output_tokens,
            labels=dict(labels or {}),
            idempotency_key=idempotency_key,
        )

    # ------------------------------------------------------------------ spool

    def _spool_entry(self, entry: SpoolEntry) -> None:
        self.spool.add(entry)
        self._start_replayer()

    def _start_replayer(self) -> None:
        if self.state == "closed":
            return  # the entry stays on disk; the next client on this spool replays it
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.create_task(self._replay_forever(), name="budgetd-spool")

    async def _replay_forever(self) -> None:
        """Retry the spool every replay_interval_s until it is empty; never dies of an
        error (a lost replayer would leave usage on disk until the next restart)."""
        while self.spool.entries():
            try:
                await self.replay_spool()
            except BudgetUnavailable:
                pass  # still away: try again later
            except Exception:
                log.exception(
                    "spool replay failed; retrying in %.1f s", self.config.replay_interval_s
                )
            if self.spool.entries():
                await asyncio.sleep(self.config.replay_interval_s)

    async def replay_spool(self) -> int:
        """Send spooled usage to budgetd; returns how many entries were settled.

        An entry with a reservation is committed (idempotent; an expired reservation is
        reconciled to the real usage); one without is charged by its idempotency key.
        """
        settled = 0
        for path, entry in self.spool.entries():
            try:
                if entry.reservation_id:
                    try:
                        await self.commit(entry.reservation_id, usage=entry.usage)
                    except ReservationError as error:
                        if error.code != grpc.StatusCode.NOT_FOUND:
                            raise
                        await self._charge_entry(entry)
                else:
                    await self._charge_entry(entry)
            except BudgetUnavailable:
                raise
            except BudgetError as error:
                log.error("spooled usage %s was refused, left in place: %s", path.name, error)
                continue
            self.spool.remove(path)
            settled += 1
        if settled:
            log.info("replayed %d spooled usage record(s) to budgetd", settled)
        return settled

    async def _charge_entry(self, entry: SpoolEntry) -> None:
        if entry.usage.total_tokens == 0:
            return  # nothing was used: budgetd refuses a charge of no tokens, and owes none
        await self.charge(
            entry.budget_id,
            entry.usage,
            model=entry.model,
            idempotency_key=f"{entry.idempotency_key}:spool",
            labels=entry.labels,
        )
