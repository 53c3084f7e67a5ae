"""AdminService, reports: spend and tokens from the ledger, grouped."""

from __future__ import annotations

from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase
from budget_server.api.convert import UNIT_VALUES, enum_name, usage_to_pb
from budget_server.api.status import unary
from budget_server.ledger import report

Context = grpc.aio.ServicerContext[Any, Any]

GROUP_NAMES = {
    pb.REPORT_GROUP_BUDGET: "BUDGET",
    pb.REPORT_GROUP_MODEL: "MODEL",
    pb.REPORT_GROUP_LABEL: "LABEL",
    pb.REPORT_GROUP_DAY: "DAY",
}


def row_to_pb(row: report.ReportRow) -> pb.UsageReportRow:
    return pb.UsageReportRow(
        budget_id=row.budget_id,
        model=row.model,
        label_value=row.label_value,
        day=row.day,
        unit=UNIT_VALUES[row.unit],
        charged=row.charged,
        overage=row.overage,
        usage=usage_to_pb(row.usage),
        calls=row.calls,
    )


class ReportAdmin(AdminBase):
    """AdminService methods about reports."""

    @unary
    async def UsageReport(
        self, request: pb.UsageReportRequest, context: Context
    ) -> pb.UsageReportResponse:
        query = report.ReportQuery(
            budget_prefix=request.budget_prefix,
            since_us=request.since_us,
            until_us=request.until_us,
            group_by=tuple(enum_name(GROUP_NAMES, g, "group_by") for g in request.group_by),
            label_key=request.label_key,
        )
        rows = await report.usage_report(self.ledger.db, query, entries_max=self.report_entries_max)
        return pb.UsageReportResponse(rows=[row_to_pb(row) for row in rows])
