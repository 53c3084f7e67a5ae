"""In-process fan-out of budget events to subscribers (WatchBudgets streams, meter sessions).

Every subscriber has a bounded queue: a watcher that cannot keep up is cut off with a
clear error rather than letting memory grow or slowing the ledger down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from budget_server.events.model import KIND_VALUES, BudgetEvent

log = logging.getLogger("budgetd.events")

SUBSCRIBER_QUEUE_MAX = 10_000


class SubscriberLagged(Exception):
    """The subscriber fell more than SUBSCRIBER_QUEUE_MAX events behind."""


class Subscription:
    def __init__(self, bus: EventBus, prefix: str) -> None:
        self._bus = bus
        self.prefix = prefix
        self._queue: asyncio.Queue[BudgetEvent | None] = asyncio.Queue(SUBSCRIBER_QUEUE_MAX)
        self.lagged = False
        self.ended = False

    def offer(self, event: BudgetEvent) -> None:
        if event.kind not in KIND_VALUES or self.lagged:
            return  # internal events (e.g. KEY_REVOKED) are for this process only
        if not event.budget_id.startswith(self.prefix):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    def end(self) -> None:
        """Finish the watcher's stream (shutdown): it ends normally, not as an error."""
        self.ended = True
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[BudgetEvent]:
        while True:
            event = await self._queue.get()
            if event is None and self.ended:
                return
            if event is None:
                raise SubscriberLagged(
                    f"the watcher fell {SUBSCRIBER_QUEUE_MAX} events behind (SUBSCRIBER_QUEUE_MAX)"
                )
            yield event

    def close(self) -> None:
        self._bus._subscriptions.discard(self)


class EventBus:
    """Publish events to this process's subscribers and listeners."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._listeners: list[Callable[[BudgetEvent], None]] = []

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscriptions)

    def subscribe(self, prefix: str = "") -> Subscription:
        subscription = Subscription(self, prefix)
        self._subscriptions.add(subscription)
        return subscription

    def end_subscriptions(self) -> None:
        """At shutdown: watchers' streams end now instead of idling through the grace."""
        for subscription in list(self._subscriptions):
            subscription.end()

    def add_listener(self, listener: Callable[[BudgetEvent], None]) -> None:
        """Called for every event, synchronously (keep it cheap)."""
        self._listeners.append(listener)

    def publish(self, event: BudgetEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", event.kind)
        for subscription in list(self._subscriptions):
            subscription.offer(event)
