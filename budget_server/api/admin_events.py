"""AdminService, events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase

Context = grpc.aio.ServicerContext[Any, Any]


class EventAdmin(AdminBase):
    """AdminService methods about events."""

    async def WatchBudgets(
        self, request: pb.WatchBudgetsRequest, context: Context
    ) -> AsyncIterator[pb.BudgetEvent]:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchBudgets is not implemented yet")
        yield pb.BudgetEvent()

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: Context
    ) -> pb.ListAlertsResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListAlerts is not implemented yet")
