"""Writing webhook deliveries into the outbox, inside the transaction that caused the events.

The event and its `webhook_deliveries` rows commit together or not at all, so a crash
between "the alert fired" and "the webhook was sent" loses nothing: the delivery worker
finds the row after the restart. A row per (webhook, event) is unique, so writing the
same event twice (a retried batch) queues it once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from budget_server.db.schema import webhook_deliveries
from budget_server.events.model import BudgetEvent
from budget_server.webhooks.directory import WebhookDirectory

INSERT_ROWS_MAX: Final = 500
"""Rows per INSERT statement: 10 columns each stays far below SQLite's bound-parameter cap."""

OutboxWriter = Callable[[AsyncConnection, Sequence[BudgetEvent], int], Awaitable[int]]


async def enqueue(
    conn: AsyncConnection,
    events: Sequence[BudgetEvent],
    directory: WebhookDirectory,
    now_us: int,
) -> int:
    """Queue each event for every webhook that wants it, in the caller's transaction.

    Returns the rows written (repeats of an already queued (webhook, event) are skipped).
    When no webhook wants any of the events, no statement is issued at all.
    """
    rows = [
        {
            "webhook_id": target.id,
            "event_id": event.id,
            "payload": payload,
            "attempts": 0,
            "next_attempt_us": now_us,
            "delivered_at_us": 0,
            "failed": False,
            "last_error": "",
            "created_at_us": now_us,
        }
        for event in events
        if (targets := directory.matching(event))
        for payload in (event.to_json(),)  # serialised once: every webhook gets the same bytes
        for target in targets
    ]
    if not rows:
        return 0
    # One row per (webhook, event) even if the caller passed an event twice.
    rows = list({(row["webhook_id"], row["event_id"]): row for row in rows}.values())
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    written = 0
    for start in range(0, len(rows), INSERT_ROWS_MAX):
        statement: Any = (
            dialect.insert(webhook_deliveries)
            .values(rows[start : start + INSERT_ROWS_MAX])
            .on_conflict_do_nothing(index_elements=["webhook_id", "event_id"])
        )
        result = await conn.execute(statement)
        written += max(0, result.rowcount)
    return written


def outbox_writer(directory: WebhookDirectory) -> OutboxWriter:
    """`enqueue` with the directory bound: the ledger's event publisher calls this."""

    async def write(conn: AsyncConnection, events: Sequence[BudgetEvent], now_us: int) -> int:
        return await enqueue(conn, events, directory, now_us)

    return write
