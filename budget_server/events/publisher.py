"""Getting events out of a transaction: durable and cross-process parts inside it, the
local fan-out after it commits.

Inside the transaction: webhook outbox rows (so a restart loses no event) and, on
PostgreSQL, `pg_notify` (delivered to the other budgetd processes only if, and when, the
transaction commits). After commit: this process's own subscribers.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from budget_server.events.bus import EventBus
from budget_server.events.model import BudgetEvent

NOTIFY_CHANNEL = "budgetd_events"

log = logging.getLogger("budgetd.alerts")

# (conn, events, now_us) -> rows written; webhooks' outbox.enqueue with its directory bound.
OutboxWriter = Callable[[AsyncConnection, Sequence[BudgetEvent], int], Awaitable[int]]


class EventPublisher:
    def __init__(self, bus: EventBus, *, cross_process: bool) -> None:
        self.bus = bus
        self.cross_process = cross_process
        self.origin = secrets.token_hex(8)  # this process, to skip our own notifications
        self.outbox: OutboxWriter | None = None

    async def in_transaction(
        self, conn: AsyncConnection, events: Sequence[BudgetEvent], now_us: int
    ) -> None:
        if not events:
            return
        if self.outbox is not None:
            await self.outbox(conn, events, now_us)
        if self.cross_process:
            for event in events:
                payload = json.dumps({"origin": self.origin, "event": event.to_json()})
                await conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": NOTIFY_CHANNEL, "payload": payload},
                )

    def after_commit(self, events: Sequence[BudgetEvent]) -> None:
        for event in events:
            if event.kind == "ALERT":  # logged once, by the process whose write fired it
                _log_alert(event)
            self.bus.publish(event)


def _log_alert(event: BudgetEvent) -> None:
    log.warning(
        "budget %s crossed %d %% of its limit",
        event.budget_id,
        event.threshold_pct,
        extra={
            "budget_id": event.budget_id,
            "threshold_pct": event.threshold_pct,
            "spent": event.spent,
            "limit": event.limit,
        },
    )
