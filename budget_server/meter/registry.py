"""The meter streams open in this process, by budget, so that a freeze or a lowered limit
can abort them, and alerts reach them, wherever in the hierarchy the event happened."""

from __future__ import annotations

from collections import defaultdict

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.errors import Overloaded
from budget_server.events.model import BudgetEvent
from budget_server.meter.session import MeterSession


class SessionRegistry:
    def __init__(self, streams_max: int = 20_000, streams_per_key_max: int = 2_000) -> None:
        self._by_budget: defaultdict[str, set[MeterSession]] = defaultdict(set)
        self._streams_max = streams_max
        self._streams_per_key_max = streams_per_key_max
        self._admitted = 0
        self._admitted_by_key: defaultdict[str, int] = defaultdict(int)

    def admit(self, key_id: str) -> None:
        """Take a stream slot before anything is reserved, or refuse naming the limit."""
        if self._admitted >= self._streams_max:
            raise Overloaded(
                f"this budgetd process has {self._streams_max} meter streams open "
                "(streams_max); retry on another replica or later"
            )
        if key_id and self._admitted_by_key[key_id] >= self._streams_per_key_max:
            raise Overloaded(
                f"API key {key_id} has {self._streams_per_key_max} meter streams open here "
                "(streams_per_key_max)"
            )
        self._admitted += 1
        if key_id:
            self._admitted_by_key[key_id] += 1

    def release(self, key_id: str) -> None:
        self._admitted -= 1
        if key_id:
            self._admitted_by_key[key_id] -= 1
            if not self._admitted_by_key[key_id]:
                del self._admitted_by_key[key_id]

    def add(self, session: MeterSession) -> None:
        self._by_budget[session.budget_id].add(session)

    def remove(self, session: MeterSession) -> None:
        sessions = self._by_budget.get(session.budget_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_budget[session.budget_id]

    def sessions_of(self, budget_ids: set[str]) -> list[MeterSession]:
        return [s for b in budget_ids for s in self._by_budget.get(b, ())]

    @property
    def open_streams(self) -> int:
        return sum(len(s) for s in self._by_budget.values())

    @property
    def budget_ids(self) -> list[str]:
        return list(self._by_budget)

    def under(self, budget_id: str) -> list[MeterSession]:
        """Open sessions whose budget is `budget_id` or one of its descendants."""
        return [
            session
            for sessions in self._by_budget.values()
            for session in sessions
            if budget_id in session.chain_ids
        ]

    def on_event(self, event: BudgetEvent) -> None:
        """Bus listener: alerts go to the streams below the budget; freezes, deletions and
        limits lowered below what is spent and held abort them."""
        if event.kind not in ("ALERT", "FROZEN", "LIMIT_CHANGED", "DELETED"):
            return
        for session in self.under(event.budget_id):
            if event.kind == "ALERT":
                session.alert(event.budget_id, event.threshold_pct, event.spent, event.limit)
            elif event.kind == "FROZEN":
                session.abort_externally(pb.ABORT_REASON_FROZEN, event.budget_id, event.message)
            elif event.kind == "DELETED":
                session.abort_externally(
                    pb.ABORT_REASON_FROZEN,
                    event.budget_id,
                    f"budget {event.budget_id!r} was deleted",
                )
            elif event.message:  # LIMIT_CHANGED below what is spent and held
                session.abort_externally(
                    pb.ABORT_REASON_LIMIT_LOWERED, event.budget_id, event.message
                )
