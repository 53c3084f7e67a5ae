"""This process's snapshot of the registered webhooks, so that matching an event costs a
set lookup and no SQL.

The ledger asks `matching(event)` inside its write transactions, for every event; with no
webhook that wants the event's kind the answer is an empty list after one set lookup. The
snapshot is re-read from the database every `refresh_interval_s` (registrations made on
another budgetd process show up within that time) and at once after a registration is
created or deleted on this one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select

from budget_server.db.engine import Database
from budget_server.db.schema import webhooks
from budget_server.events.model import BudgetEvent
from budget_server.webhooks.store import WEBHOOKS_MAX, parse_kinds

log = logging.getLogger("budgetd.webhooks")

REFRESH_INTERVAL_DEFAULT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """What matching needs of a registration; the secret is read only when sending."""

    id: str
    url: str
    budget_prefix: str
    kinds: frozenset[str]

    def wants(self, event: BudgetEvent) -> bool:
        return event.kind in self.kinds and event.budget_id.startswith(self.budget_prefix)


class WebhookDirectory:
    """The registered webhooks as last read; `matching` never touches the database."""

    def __init__(
        self, db: Database, refresh_interval_s: float = REFRESH_INTERVAL_DEFAULT_S
    ) -> None:
        self._db = db
        self.refresh_interval_s = refresh_interval_s
        self._targets: tuple[WebhookTarget, ...] = ()
        self._kinds: frozenset[str] = frozenset()  # union of the targets' kinds: the fast "no"
        # Reads that started later saw at least as much as earlier ones (they began after
        # the earlier ones' commits), so a slow old read must not overwrite a newer snapshot.
        self._reads_started = 0
        self._read_applied = 0

    @property
    def targets(self) -> tuple[WebhookTarget, ...]:
        return self._targets

    def matching(self, event: BudgetEvent) -> list[WebhookTarget]:
        """The webhooks that want this event (its kind, and its budget under their prefix)."""
        if event.kind not in self._kinds:
            return []
        return [target for target in self._targets if target.wants(event)]

    async def refresh(self) -> None:
        """Re-read the registrations now."""
        self._reads_started += 1
        read = self._reads_started
        query = (
            select(webhooks.c.id, webhooks.c.url, webhooks.c.budget_prefix, webhooks.c.kinds)
            .order_by(webhooks.c.id)
            .limit(WEBHOOKS_MAX * 2)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        if read < self._read_applied:
            return
        self._read_applied = read
        self._targets = tuple(
            WebhookTarget(
                id=row.id,
                url=row.url,
                budget_prefix=row.budget_prefix,
                kinds=frozenset(parse_kinds(row.kinds)),
            )
            for row in rows
        )
        self._kinds = frozenset(kind for target in self._targets for kind in target.kinds)

    async def run(self) -> None:
        """Refresh forever; a failed read keeps the previous snapshot and is retried."""
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "reading the webhook registrations failed; retrying in %.1f s",
                    self.refresh_interval_s,
                )
