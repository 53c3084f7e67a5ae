"""Many processes reserving at once never over-grant a HARD budget (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from tests.support.ledger import assert_ledger_clean, create
from tests.support.processes import run_module_json
from tests.support.servers import Stubs, server_processes, stubs

PROCESSES = 4
CALLS_PER_PROCESS = 50
SIZE_MAX = 100

pytestmark = pytest.mark.slow


async def _storm(addresses: list[str], budget_ids: list[str]) -> tuple[list[Any], list[Any]]:
    results = await asyncio.gather(
        *(
            run_module_json(
                "tests.support.reserve_storm",
                "--address",
                ",".join(addresses),
                "--budgets",
                ",".join(budget_ids),
                "--count",
                str(CALLS_PER_PROCESS),
                "--size-max",
                str(SIZE_MAX),
                "--seed",
                str(seed),
            )
            for seed in range(PROCESSES)
        )
    )
    granted = [g for r in results for g in r["granted"]]
    refused = [f for r in results for f in r["refused"]]
    assert len(granted) + len(refused) == PROCESSES * CALLS_PER_PROCESS
    return granted, refused


async def _figures(api: Stubs, budget_id: str) -> pb.Budget:
    return (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id=budget_id))).budget


def _check_refusals(refused: list[Any], final_available: int) -> None:
    assert refused, "the storm must exhaust the budget for this test to mean anything"
    assert {f["code"] for f in refused} == {"RESOURCE_EXHAUSTED"}
    # Available only shrinks while nothing commits, so each refusal saw at least what is left now.
    assert final_available < min(f["amount"] for f in refused)


async def test_one_hard_budget_is_never_over_granted(api: Stubs) -> None:
    limit = 5_000  # about half of what 200 calls of 1..100 ask for
    await create(api, "storm:one", limit)
    granted, refused = await _storm([api.address], ["storm:one"])
    total = sum(g["amount"] for g in granted)
    budget = await _figures(api, "storm:one")
    assert total <= limit
    assert budget.reserved == total
    _check_refusals(refused, budget.available)
    await assert_ledger_clean(api)


async def test_three_level_hierarchy_is_never_over_granted(api: Stubs) -> None:
    await create(api, "h:root", 6_000)
    await create(api, "h:root/a", 4_000, parent="h:root")
    await create(api, "h:root/b", 4_000, parent="h:root")
    leaves = ["h:root/a/x", "h:root/a/y", "h:root/b/z"]
    await create(api, leaves[0], 2_500, parent="h:root/a")
    await create(api, leaves[1], 2_500, parent="h:root/a")
    await create(api, leaves[2], 5_000, parent="h:root/b")
    granted, refused = await _storm([api.address], leaves)

    per_leaf: dict[str, int] = defaultdict(int)
    for g in granted:
        per_leaf[g["budget"]] += g["amount"]
    expected = {
        "h:root": sum(per_leaf.values()),
        "h:root/a": per_leaf[leaves[0]] + per_leaf[leaves[1]],
        "h:root/b": per_leaf[leaves[2]],
        **per_leaf,
    }
    for budget_id, total in expected.items():
        budget = await _figures(api, budget_id)
        assert budget.reserved == total, budget_id
        assert budget.spent + budget.reserved <= budget.limit, budget_id
    assert {f["code"] for f in refused} == {"RESOURCE_EXHAUSTED"}
    assert refused
    await assert_ledger_clean(api)


@pytest.mark.postgres
async def test_two_server_processes_on_one_postgres(postgres_url: str) -> None:
    async with server_processes(postgres_url, 2) as servers:
        addresses = [s.address for s in servers]
        async with stubs(addresses[0]) as api:
            await create(api, "multi:root", 6_000)
            await create(api, "multi:root/team", 5_000, parent="multi:root")
            granted, refused = await _storm(addresses, ["multi:root/team"])
            total = sum(g["amount"] for g in granted)
            team = await _figures(api, "multi:root/team")
            root = await _figures(api, "multi:root")
            assert total <= 5_000
            assert team.reserved == root.reserved == total
            _check_refusals(refused, team.available)
            await assert_ledger_clean(api)
