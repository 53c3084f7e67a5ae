"""Batches of many budgets share one transaction (`ledger.group`), on SQLite and PostgreSQL.

The operations go straight to the server's ledger, all in one turn of the event loop, so
that their batches are waiting together when the writer (SQLite) or the grouper
(PostgreSQL) next looks: that is what makes a group, and it keeps the test deterministic.
Figures, refusals and the ledger must come out exactly as one batch at a time gives them;
a group that cannot commit as one (here: it fires alerts) must fall back to its batches
one by one, and chains that share a budget must never share a group.
"""

from __future__ import annotations

import asyncio
from typing import Any

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.errors import BudgetExhausted
from budget_server.ledger.group import BatchJob, disjoint_groups
from budget_server.ledger.model import OpResult
from tests.support.ledger import assert_ledger_clean, commit_op, create, reserve_op
from tests.support.servers import Stubs

BUDGETS = 24


async def _figures(api: Stubs, budget_id: str) -> pb.Budget:
    return (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id=budget_id))).budget


async def _ready(server: BudgetServer, ids: list[str]) -> None:
    """Chains are read once and cached; read them now so every operation below reaches its
    actor in the same turn of the event loop."""
    for budget_id in ids:
        await server.ledger.chain_of(budget_id)


async def test_many_budgets_commit_in_groups_with_exact_figures(
    server: BudgetServer, api: Stubs
) -> None:
    ids = [f"g:{i}" for i in range(BUDGETS)]
    for budget_id in ids:
        await create(api, budget_id, 1_000)
    await create(api, "g:tight", 150)  # takes one reservation of 100, refuses the next two
    await create(api, "g:team", 10_000)
    members = [f"g:team/{i}" for i in range(4)]  # share a parent: never in one group
    for budget_id in members:
        await create(api, budget_id, 1_000, parent="g:team")
    everyone = [*ids, "g:tight", *members]
    await _ready(server, everyone)
    counts = server.ledger.groups
    assert counts is not None
    groups_before, batches_before = counts.groups, counts.batches

    reserves = [reserve_op(budget_id, 100) for budget_id in everyone for _ in range(3)]
    outcomes: list[Any] = await asyncio.gather(
        *(server.ledger.reserve(op) for op in reserves), return_exceptions=True
    )
    granted = [r for r in outcomes if isinstance(r, OpResult)]
    refused = [r for r in outcomes if not isinstance(r, OpResult)]
    assert [type(e) for e in refused] == [BudgetExhausted, BudgetExhausted]
    assert len(granted) == 3 * len(everyone) - 2

    committed = await asyncio.gather(*(server.ledger.commit(commit_op(r, 70)) for r in granted))
    assert [c.charged for c in committed] == [70] * len(granted)
    assert counts.gave_up == 0
    # Both rounds formed groups of several batches (the budgets of one chain cannot).
    assert counts.groups >= groups_before + 2
    assert counts.batches - batches_before >= 2 * len(ids)

    for budget_id in ids:
        budget = await _figures(api, budget_id)
        assert (budget.spent, budget.reserved, budget.overage) == (210, 0, 0)
    tight = await _figures(api, "g:tight")
    assert (tight.spent, tight.reserved) == (70, 0)
    team = await _figures(api, "g:team")
    assert (team.spent, team.reserved) == (4 * 210, 0)
    await assert_ledger_clean(api)


async def test_a_group_that_fires_alerts_falls_back_to_its_batches_one_by_one(
    server: BudgetServer, api: Stubs
) -> None:
    ids = [f"alerting:{i}" for i in range(BUDGETS)]
    for budget_id in ids:
        await create(api, budget_id, 100)  # default thresholds: 50, 70, 90, 100 %
    await _ready(server, ids)
    counts = server.ledger.groups
    assert counts is not None

    reserved = await asyncio.gather(*(server.ledger.reserve(reserve_op(b, 60)) for b in ids))
    gave_up = counts.gave_up
    committed = await asyncio.gather(*(server.ledger.commit(commit_op(r, 60)) for r in reserved))
    assert counts.gave_up > gave_up  # crossing 50 % fires alerts, which a group does not write

    assert [c.charged for c in committed] == [60] * len(ids)
    for budget_id in ids:
        alerts = await api.admin.ListAlerts(pb.ListAlertsRequest(budget_id=budget_id))
        assert [a.threshold_pct for a in alerts.alerts] == [50]
        budget = await _figures(api, budget_id)
        assert (budget.spent, budget.reserved) == (60, 0)
    await assert_ledger_clean(api)


def _job(*chain: str) -> BatchJob:
    return BatchJob(chain_ids=chain, ops=(), now_us=0, publisher=None)


def test_chains_that_share_a_budget_never_share_a_group() -> None:
    jobs = [_job("a"), _job("p", "x"), _job("b"), _job("p", "y"), _job("a"), _job("p", "z")]
    groups = list(disjoint_groups(jobs))
    assert groups == [[0, 1, 2], [3, 4], [5]]
    for group in groups:
        budgets = [b for i in group for b in jobs[i].chain_ids]
        assert len(budgets) == len(set(budgets))
