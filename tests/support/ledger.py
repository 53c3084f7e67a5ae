"""Small helpers for ledger tests: make budgets, read status details, check the ledger."""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ledger.model import CommitOp, OpResult, ReserveOp
from tests.support.servers import Stubs


def reserve_op(budget_id: str, amount: int) -> ReserveOp:
    """A plain reservation of `amount`, for tests that drive the ledger in-process."""
    return ReserveOp(
        budget_id=budget_id,
        amount=amount,
        estimate=None,
        model="",
        ttl_ms=60_000,
        idempotency_key=None,
        labels={},
    )


def commit_op(result: OpResult, amount: int) -> CommitOp:
    """Commit the reservation `result` holds, charging `amount`."""
    return CommitOp(reservation_id=result.reservation.id, usage=None, amount=amount)


async def create(
    api: Stubs,
    budget_id: str,
    limit: int,
    *,
    parent: str = "",
    unit: int = pb.UNIT_TOKENS,
    mode: int = pb.MODE_HARD,
    period: int = pb.PERIOD_NONE,
    time_zone: str = "UTC",
) -> pb.Budget:
    response = await api.admin.CreateBudget(
        pb.CreateBudgetRequest(
            id=budget_id,
            parent_id=parent,
            unit=unit,
            limit=limit,
            mode=mode,
            period=period,
            time_zone=time_zone,
        )
    )
    return response.budget


def exhausted_detail(error: grpc.aio.AioRpcError) -> pb.BudgetExhaustedDetail:
    """The BudgetExhaustedDetail packed in the standard status-details trailer."""
    trailer = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
    detail = pb.BudgetExhaustedDetail()
    assert status.details[0].Unpack(detail)
    return detail


async def assert_ledger_clean(api: Stubs) -> pb.VerifyLedgerResponse:
    result = await api.admin.VerifyLedger(pb.VerifyLedgerRequest())
    assert result.ok, f"ledger drift: {list(result.drifts)}"
    assert not result.drifts
    return result


async def all_entries(api: Stubs, budget_id: str = "") -> list[pb.LedgerEntry]:
    entries: list[pb.LedgerEntry] = []
    token = ""
    while True:
        page = await api.admin.ListLedgerEntries(
            pb.ListLedgerEntriesRequest(budget_id=budget_id, page_size=1000, page_token=token)
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries
