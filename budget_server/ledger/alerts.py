"""Tiered alerts: which thresholds a budget's spend has crossed that have not fired yet.

Each budget keeps `alerted_pct`, the highest threshold already fired in the current window,
in its own row. Deciding under the row lock that also applies the charge, and writing it
back with the same compare-and-set, makes each threshold fire once per window however
many server processes share the database; the `alerts` table's unique constraint is the
backstop.
"""

from __future__ import annotations

from budget_server.events.model import BudgetEvent, new_event_id
from budget_server.ledger.model import BudgetState


def crossed_thresholds(budget: BudgetState) -> list[int]:
    """Thresholds now reached by `spent` and above the last one fired, lowest first."""
    if budget.spent <= 0:
        return []
    return [
        pct
        for pct in budget.thresholds_pct
        if pct > budget.alerted_pct and budget.spent * 100 >= pct * budget.limit
    ]


def fire_alerts(budget: BudgetState, now_us: int) -> list[BudgetEvent]:
    """Mark the crossed thresholds as fired and return one ALERT event for each."""
    crossed = crossed_thresholds(budget)
    if not crossed:
        return []
    budget.alerted_pct = crossed[-1]
    return [
        BudgetEvent(
            id=new_event_id(),
            kind="ALERT",
            budget_id=budget.id,
            at_us=now_us,
            threshold_pct=pct,
            spent=budget.spent,
            limit=budget.limit,
            message=f"budget {budget.id!r} has spent {pct}% of its limit",
        )
        for pct in crossed
    ]
