"""Budget chains are read in batches on first contact (`ledger.chains`), SQLite and
PostgreSQL: whatever is asked for while a read is in flight goes into one query per level
of the hierarchy, and the answers are the same as one budget at a time would give."""

from __future__ import annotations

import asyncio

import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.errors import NotFound
from budget_server.ledger.chains import ChainCache
from tests.support.ledger import create
from tests.support.meter import background_tasks, sql_statements
from tests.support.servers import Stubs

CHILDREN = 20


def chain_reads(statements: list[str]) -> list[str]:
    """The statements that read budgets' parents."""
    return [s for s in statements if "parent_id" in s and "FROM budgets" in s]


async def test_first_contacts_are_read_together(server: BudgetServer, api: Stubs) -> None:
    await create(api, "ch:root", 1_000_000)
    children = [f"ch:k{i}" for i in range(CHILDREN)]
    for child in children:
        await create(api, child, 1_000, parent="ch:root")
    await create(api, "ch:g", 100, parent="ch:k0")
    assert server.db is not None
    chains = ChainCache(server.db)

    with sql_statements(server, background_tasks()) as seen:
        found = await asyncio.gather(
            *(chains.chain_of(i) for i in [*children, "ch:g", "ch:none", "ch:k3"]),
            return_exceptions=True,
        )
    # One query for the 23 ids asked for (which finds every child and the grandchild),
    # one for the root; nothing per budget.
    assert len(chain_reads(seen)) == 2, seen
    assert found[:CHILDREN] == [("ch:root", child) for child in children]
    assert found[CHILDREN] == ("ch:root", "ch:k0", "ch:g")
    missing = found[CHILDREN + 1]
    assert isinstance(missing, NotFound)
    assert str(missing) == "budget 'ch:none' does not exist"
    assert found[CHILDREN + 2] == ("ch:root", "ch:k3")

    # Known now: no query. A new child of a known budget: one query, for itself only.
    await create(api, "ch:k1:x", 10, parent="ch:k1")
    with sql_statements(server, background_tasks()) as seen:
        assert await chains.chain_of("ch:k5") == ("ch:root", "ch:k5")
        assert await chains.chain_of("ch:k1:x") == ("ch:root", "ch:k1", "ch:k1:x")
    assert len(chain_reads(seen)) == 1, seen


async def test_a_caller_giving_up_leaves_the_answer_to_the_others(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "ch:solo", 1_000)
    assert server.db is not None
    chains = ChainCache(server.db)
    impatient = asyncio.ensure_future(chains.chain_of("ch:solo"))
    patient = asyncio.ensure_future(chains.chain_of("ch:solo"))
    await asyncio.sleep(0)  # both are waiting on the one read
    impatient.cancel()
    assert await patient == ("ch:solo",)
    with pytest.raises(asyncio.CancelledError):
        await impatient
    # The read completed for everyone: the next caller finds it cached.
    with sql_statements(server, background_tasks()) as seen:
        assert await chains.chain_of("ch:solo") == ("ch:solo",)
    assert chain_reads(seen) == []


async def test_a_deleted_budget_is_forgotten_and_then_unknown(
    server: BudgetServer, api: Stubs
) -> None:
    """Through the server's own ledger: deleting a budget drops its cached chain, so the
    next operation on it is refused as unknown rather than run on a stale chain."""
    await create(api, "ch:gone", 1_000)
    assert await server.ledger.chain_of("ch:gone") == ("ch:gone",)
    await api.admin.DeleteBudget(pb.DeleteBudgetRequest(id="ch:gone"))
    with (
        sql_statements(server, background_tasks()) as seen,
        pytest.raises(NotFound, match="'ch:gone' does not"),
    ):
        await server.ledger.chain_of("ch:gone")
    assert len(chain_reads(seen)) == 1, seen
