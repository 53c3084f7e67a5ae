"""BudgetService: what apps call to reserve, extend, commit and release."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_server import validation
from budget_server.api.convert import budget_to_pb, reservation_to_pb, usage_from_pb
from budget_server.api.handlers import MalformedRequest
from budget_server.api.meter_stream import MeterStreams
from budget_server.api.status import unary
from budget_server.errors import InvalidArgument
from budget_server.ledger import admin
from budget_server.ledger.ledger import Ledger
from budget_server.ledger.model import ChargeOp, CommitOp, ExtendOp, ReleaseOp, ReserveOp
from budget_server.ledger.usage import Usage

Context = grpc.aio.ServicerContext[Any, Any]


def amount_or_estimate(
    amount: int, estimate: pb.Usage | None, what: str
) -> tuple[int, Usage | None]:
    """Exactly one of an amount in the budget's unit or a token estimate."""
    if estimate is not None:
        if amount:
            raise InvalidArgument(f"give either amount or estimate for the {what}, not both")
        usage = usage_from_pb(estimate, "estimate")
        if usage.is_zero:
            raise InvalidArgument(f"the {what} estimate must count at least one token")
        return 0, usage
    return validation.amount(amount), None


class BudgetService(pb_grpc.BudgetServiceServicer):
    def __init__(self, ledger: Ledger, meter: MeterStreams) -> None:
        self.ledger = ledger
        self._meter = meter

    async def Meter(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.MeterRequest | MalformedRequest],
        context: Context,
    ) -> None:
        """A coroutine, so grpc.aio serves it with the reader-writer API: MeterStreams
        reads with `context.read` and writes with `context.write`."""
        await self._meter.serve(context)

    @unary
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        budget_id = validation.budget_id(request.budget_id)
        amount, estimate = amount_or_estimate(
            request.amount,
            request.estimate if request.HasField("estimate") else None,
            "reservation",
        )
        result = await self.ledger.reserve(
            ReserveOp(
                budget_id=budget_id,
                amount=amount,
                estimate=estimate,
                model=validation.model(request.model),
                ttl_ms=validation.ttl_ms(request.ttl_ms),
                idempotency_key=validation.idempotency_key(request.idempotency_key),
                labels=validation.labels(request.labels),
            )
        )
        return pb.ReserveResponse(
            reservation=reservation_to_pb(result.reservation),
            budget=budget_to_pb(result.budget),
            replayed=result.replayed,
        )

    @unary
    async def Extend(self, request: pb.ExtendRequest, context: Context) -> pb.ExtendResponse:
        reservation_id = validation.reservation_id(request.reservation_id)
        amount, estimate = amount_or_estimate(
            request.amount, request.estimate if request.HasField("estimate") else None, "extension"
        )
        result = await self.ledger.extend(
            ExtendOp(
                reservation_id=reservation_id,
                amount=amount,
                estimate=estimate,
                ttl_ms=validation.ttl_ms(request.ttl_ms) if request.ttl_ms else 0,
            )
        )
        return pb.ExtendResponse(
            reservation=reservation_to_pb(result.reservation), budget=budget_to_pb(result.budget)
        )

    @unary
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        reservation_id = validation.reservation_id(request.reservation_id)
        usage = usage_from_pb(request.usage) if request.HasField("usage") else None
        if usage is not None and request.amount:
            raise InvalidArgument("give either usage or amount to commit, not both")
        amount = validation.amount(request.amount, allow_zero=True) if usage is None else 0
        result = await self.ledger.commit(
            CommitOp(reservation_id=reservation_id, usage=usage, amount=amount)
        )
        return pb.CommitResponse(
            reservation=reservation_to_pb(result.reservation),
            budget=budget_to_pb(result.budget),
            charged=result.charged,
            overage=result.overage,
            replayed=result.replayed,
        )

    @unary
    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        result = await self.ledger.release(
            ReleaseOp(reservation_id=validation.reservation_id(request.reservation_id))
        )
        return pb.ReleaseResponse(
            reservation=reservation_to_pb(result.reservation),
            budget=budget_to_pb(result.budget),
            replayed=result.replayed,
        )

    @unary
    async def Charge(self, request: pb.ChargeRequest, context: Context) -> pb.ChargeResponse:
        budget_id = validation.budget_id(request.budget_id)
        key = validation.idempotency_key(request.idempotency_key)
        if key is None:
            raise InvalidArgument(
                "idempotency_key is required: a replayed charge must not count twice"
            )
        usage = usage_from_pb(request.usage) if request.HasField("usage") else None
        if usage is not None and request.amount:
            raise InvalidArgument("give either usage or amount to charge, not both")
        if usage is not None and usage.is_zero:  # as an amount of 0 is refused
            raise InvalidArgument("the usage to charge must count at least one token")
        amount = validation.amount(request.amount) if usage is None else 0
        result = await self.ledger.charge(
            ChargeOp(
                budget_id=budget_id,
                usage=usage,
                amount=amount,
                model=validation.model(request.model),
                idempotency_key=key,
                labels=validation.labels(request.labels),
            )
        )
        return pb.ChargeResponse(
            reservation=reservation_to_pb(result.reservation),
            budget=budget_to_pb(result.budget),
            charged=result.charged,
            replayed=result.replayed,
        )

    @unary
    async def GetBudget(
        self, request: pb.GetBudgetRequest, context: Context
    ) -> pb.GetBudgetResponse:
        chain = await admin.get_budget_chain(
            self.ledger.db, request.budget_id, self.ledger.clock.now_us()
        )
        return pb.GetBudgetResponse(
            budget=budget_to_pb(chain[0]), ancestors=[budget_to_pb(b) for b in chain[1:]]
        )
