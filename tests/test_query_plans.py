"""Queries that must stay cheap as the ledger's history grows read the small index of open
reservations (`schema.PENDING`), on SQLite and PostgreSQL. A partial index serves only
queries whose condition implies its own, and a generic PostgreSQL plan cannot see a bound
parameter's value: the state compared as a parameter instead of a literal fell back to
reading every reservation ever made (this test fails so)."""

from __future__ import annotations

from typing import Any

from budget_server.db.engine import open_database
from budget_server.db.migrate import upgrade_to_head
from budget_server.ledger.sweeper import due_reservations


def _explain(connection: Any, query: Any) -> str:
    """The plan of `query` as it runs: its values bound as parameters, and on PostgreSQL
    the generic plan a prepared statement settles on (which cannot see them)."""
    compiled = query.compile(dialect=connection.dialect)
    values = [compiled.params[name] for name in compiled.positiontup]
    if connection.dialect.name == "sqlite":
        rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", tuple(values))
        return " | ".join(str(row[-1]) for row in rows)
    connection.exec_driver_sql(f"PREPARE planned AS {compiled}")
    connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    # Tables this small would be read whole whatever the indexes; what matters here is
    # whether the partial index can serve the query at all.
    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    literals = ", ".join(f"'{v}'" if isinstance(v, str) else str(v) for v in values)
    rows = connection.exec_driver_sql(f"EXPLAIN EXECUTE planned({literals})")
    return " | ".join(str(row[0]) for row in rows)


async def test_the_sweeper_reads_only_the_index_of_open_reservations(db_url: str) -> None:
    db = open_database(db_url)
    try:
        await upgrade_to_head(db)
        async with db.engine.begin() as conn:
            plan = await conn.run_sync(_explain, due_reservations(1_000))
    finally:
        await db.close()
    assert "ix_reservations_pending_expires_at_us" in plan, plan
