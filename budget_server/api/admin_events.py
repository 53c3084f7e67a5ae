"""AdminService, events: watch budgets live, and list the alerts that fired."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from sqlalchemy import select, tuple_

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server import validation
from budget_server.api.admin_base import AdminBase
from budget_server.api.status import abort, unary
from budget_server.db.schema import alerts
from budget_server.errors import InvalidArgument, Overloaded
from budget_server.events.bus import SubscriberLagged
from budget_server.ledger.admin import (
    decode_page_token,
    encode_page_token,
    page_size,
    require_budget,
)
from budget_server.limits import ID_LENGTH_MAX

Context = grpc.aio.ServicerContext[Any, Any]


class EventAdmin(AdminBase):
    """AdminService methods about events."""

    async def WatchBudgets(
        self, request: pb.WatchBudgetsRequest, context: Context
    ) -> AsyncIterator[pb.BudgetEvent]:
        """Every event of budgets under the prefix, as it happens, until the caller leaves.

        Alerts, freezes and limit changes come from every replica; reservations and commits
        from the replica this call reached (they are too many to relay between processes).
        """
        if len(request.prefix) > ID_LENGTH_MAX:
            await abort(context, InvalidArgument(f"prefix is over {ID_LENGTH_MAX} characters"))
        subscription = self.events.subscribe(request.prefix)
        try:
            async for event in subscription:
                yield event.to_pb()
        except SubscriberLagged as lagged:
            await abort(context, Overloaded(str(lagged)))
        finally:
            subscription.close()

    @unary
    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: Context
    ) -> pb.ListAlertsResponse:
        size = page_size(request.page_size)
        order = (alerts.c.fired_at_us, alerts.c.budget_id, alerts.c.threshold_pct)
        query = select(alerts).order_by(*order).limit(size + 1)
        if request.budget_id:
            query = query.where(alerts.c.budget_id == validation.budget_id(request.budget_id))
        if request.page_token:
            try:
                fired, budget_id, threshold = json.loads(decode_page_token(request.page_token))
                fired, threshold = int(fired), int(threshold)
            except (ValueError, TypeError) as exc:
                raise InvalidArgument("page_token is not one this server issued") from exc
            if not (0 <= fired < 2**63 and 0 <= threshold < 2**31):  # what SQL can compare
                raise InvalidArgument("page_token is not one this server issued")
            query = query.where(tuple_(*order) > tuple_(fired, str(budget_id), threshold))
        async with self.ledger.db.read() as conn:
            if request.budget_id:  # an unknown budget is NOT_FOUND, not an empty page
                await require_budget(conn, request.budget_id)
            rows = (await conn.execute(query)).all()
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_page_token(
                json.dumps([last.fired_at_us, last.budget_id, last.threshold_pct])
            )
        return pb.ListAlertsResponse(
            alerts=[
                pb.Alert(
                    event_id=row.event_id,
                    budget_id=row.budget_id,
                    threshold_pct=row.threshold_pct,
                    window_start_us=row.window_start_us,
                    spent=row.spent,
                    limit=row.limit_amount,
                    fired_at_us=row.fired_at_us,
                )
                for row in rows[:size]
            ],
            next_page_token=token,
        )
