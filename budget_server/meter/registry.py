"""The meter streams open in this process, by budget, so that a freeze or a lowered limit
can abort them."""

from __future__ import annotations

from collections import defaultdict

from budget_server.meter.session import MeterSession


class SessionRegistry:
    def __init__(self) -> None:
        self._by_budget: defaultdict[str, set[MeterSession]] = defaultdict(set)

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
