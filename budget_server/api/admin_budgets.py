"""AdminService, budgets and the ledger: create, update, list, verify."""

from __future__ import annotations

from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase
from budget_server.api.convert import (
    KIND_NAMES,
    MODE_NAMES,
    PERIOD_NAMES,
    STATE_NAMES,
    UNIT_NAMES,
    budget_to_pb,
    entry_row_to_pb,
    enum_name,
    reservation_row_to_pb,
)
from budget_server.api.status import unary
from budget_server.errors import InvalidArgument
from budget_server.ledger import admin

Context = grpc.aio.ServicerContext[Any, Any]

# On create, an unset mode means HARD; on update, setting MODE_UNSPECIFIED is a mistake.
UPDATE_MODE_NAMES = {k: v for k, v in MODE_NAMES.items() if k != pb.MODE_UNSPECIFIED}


class BudgetAdmin(AdminBase):
    @unary
    async def CreateBudget(
        self, request: pb.CreateBudgetRequest, context: Context
    ) -> pb.CreateBudgetResponse:
        if request.unit == pb.UNIT_UNSPECIFIED:
            raise InvalidArgument("unit is required: UNIT_TOKENS or UNIT_USD")
        spec = admin.BudgetSpec(
            id=request.id,
            parent_id=request.parent_id or None,
            unit=enum_name(UNIT_NAMES, request.unit, "unit"),
            limit=request.limit,
            period=enum_name(PERIOD_NAMES, request.period, "period"),
            time_zone=request.time_zone or "UTC",
            mode=enum_name(MODE_NAMES, request.mode, "mode"),
            thresholds_pct=tuple(request.alert_thresholds_pct),
        )
        view = await admin.create_budget(self.ledger.db, spec, self._now_us())
        return pb.CreateBudgetResponse(budget=budget_to_pb(view))

    @unary
    async def UpdateBudget(
        self, request: pb.UpdateBudgetRequest, context: Context
    ) -> pb.UpdateBudgetResponse:
        changes = admin.BudgetChanges(
            limit=request.limit if request.HasField("limit") else None,
            mode=enum_name(UPDATE_MODE_NAMES, request.mode, "mode")
            if request.HasField("mode")
            else None,
            thresholds_pct=tuple(request.alert_thresholds_pct)
            if request.set_alert_thresholds
            else None,
            frozen=request.frozen if request.HasField("frozen") else None,
        )
        if request.alert_thresholds_pct and not request.set_alert_thresholds:
            raise InvalidArgument("set set_alert_thresholds to change alert_thresholds_pct")
        _, after = await admin.update_budget(
            self.ledger.db, request.id, changes, self._now_us(), self.ledger.publisher
        )
        return pb.UpdateBudgetResponse(budget=budget_to_pb(after))

    @unary
    async def FreezeBudget(
        self, request: pb.FreezeBudgetRequest, context: Context
    ) -> pb.UpdateBudgetResponse:
        """Refuse new grants and abort the budget's open streams on every replica."""
        _, after = await admin.update_budget(
            self.ledger.db,
            request.id,
            admin.BudgetChanges(frozen=True),
            self._now_us(),
            self.ledger.publisher,
            reason=request.reason[:500],
        )
        return pb.UpdateBudgetResponse(budget=budget_to_pb(after))

    @unary
    async def UnfreezeBudget(
        self, request: pb.UnfreezeBudgetRequest, context: Context
    ) -> pb.UpdateBudgetResponse:
        _, after = await admin.update_budget(
            self.ledger.db,
            request.id,
            admin.BudgetChanges(frozen=False),
            self._now_us(),
            self.ledger.publisher,
        )
        return pb.UpdateBudgetResponse(budget=budget_to_pb(after))

    @unary
    async def DeleteBudget(
        self, request: pb.DeleteBudgetRequest, context: Context
    ) -> pb.DeleteBudgetResponse:
        await admin.delete_budget(self.ledger.db, request.id, self._now_us(), self.ledger.publisher)
        self.ledger.forget_budget(request.id)
        return pb.DeleteBudgetResponse()

    @unary
    async def GetBudget(
        self, request: pb.GetBudgetRequest, context: Context
    ) -> pb.GetBudgetResponse:
        chain = await admin.get_budget_chain(self.ledger.db, request.budget_id, self._now_us())
        return pb.GetBudgetResponse(
            budget=budget_to_pb(chain[0]), ancestors=[budget_to_pb(b) for b in chain[1:]]
        )

    @unary
    async def ListBudgets(
        self, request: pb.ListBudgetsRequest, context: Context
    ) -> pb.ListBudgetsResponse:
        views, token = await admin.list_budgets(
            self.ledger.db, request.prefix, request.page_size, request.page_token, self._now_us()
        )
        return pb.ListBudgetsResponse(
            budgets=[budget_to_pb(v) for v in views], next_page_token=token
        )

    @unary
    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Context
    ) -> pb.ListReservationsResponse:
        state = (
            None
            if request.state == pb.RESERVATION_STATE_UNSPECIFIED
            else enum_name(STATE_NAMES, request.state, "state")
        )
        rows, token = await admin.list_reservations(
            self.ledger.db, request.budget_id, state, request.page_size, request.page_token
        )
        return pb.ListReservationsResponse(
            reservations=[reservation_row_to_pb(r) for r in rows], next_page_token=token
        )

    @unary
    async def ListLedgerEntries(
        self, request: pb.ListLedgerEntriesRequest, context: Context
    ) -> pb.ListLedgerEntriesResponse:
        kind = (
            None
            if request.kind == pb.ENTRY_KIND_UNSPECIFIED
            else enum_name(KIND_NAMES, request.kind, "kind")
        )
        rows, token = await admin.list_entries(
            self.ledger.db,
            request.budget_id,
            kind,
            request.since_us,
            request.until_us,
            request.page_size,
            request.page_token,
        )
        return pb.ListLedgerEntriesResponse(
            entries=[entry_row_to_pb(r) for r in rows], next_page_token=token
        )

    @unary
    async def VerifyLedger(
        self, request: pb.VerifyLedgerRequest, context: Context
    ) -> pb.VerifyLedgerResponse:
        result = await admin.verify(self.ledger.db, request.budget_id)
        return pb.VerifyLedgerResponse(
            ok=result.ok,
            budgets_checked=result.budgets_checked,
            entries_checked=result.entries_checked,
            drifts=[
                pb.LedgerDrift(
                    budget_id=d.budget_id,
                    figure=d.figure,
                    recorded=d.recorded,
                    recomputed=d.recomputed,
                )
                for d in result.drifts
            ],
        )
