"""AdminService, reports."""

from __future__ import annotations

from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase

Context = grpc.aio.ServicerContext[Any, Any]


class ReportAdmin(AdminBase):
    """AdminService methods about reports."""

    async def UsageReport(
        self, request: pb.UsageReportRequest, context: Context
    ) -> pb.UsageReportResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "UsageReport is not implemented yet")
