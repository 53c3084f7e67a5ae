"""What every part of AdminService shares: the ledger, the event bus, the clock."""

from __future__ import annotations

from budget_server.auth.store import KeyStore
from budget_server.events.bus import EventBus
from budget_server.ledger.ledger import Ledger
from budget_server.webhooks.directory import WebhookDirectory


class AdminBase:
    """Base of the AdminService mixins (one module per area keeps each file about one job)."""

    def __init__(
        self,
        ledger: Ledger,
        events: EventBus,
        keys: KeyStore,
        webhooks: WebhookDirectory | None = None,
        report_entries_max: int = 1_000_000,
    ) -> None:
        self.ledger = ledger
        self.events = events
        self.keys = keys
        self.webhooks = webhooks
        """This process's snapshot of webhook registrations, refreshed after changes here."""
        self.report_entries_max = report_entries_max
        """Ledger entries one usage report may read (ServerConfig.report_entries_max)."""

    def _now_us(self) -> int:
        return self.ledger.clock.now_us()
