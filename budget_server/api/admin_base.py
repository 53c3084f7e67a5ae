"""What every part of AdminService shares: the ledger, the event bus, the clock."""

from __future__ import annotations

from budget_server.auth.store import KeyStore
from budget_server.events.bus import EventBus
from budget_server.ledger.ledger import Ledger


class AdminBase:
    """Base of the AdminService mixins (one module per area keeps each file about one job)."""

    def __init__(self, ledger: Ledger, events: EventBus, keys: KeyStore) -> None:
        self.ledger = ledger
        self.events = events
        self.keys = keys

    def _now_us(self) -> int:
        return self.ledger.clock.now_us()
