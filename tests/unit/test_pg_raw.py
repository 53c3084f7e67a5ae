"""The raw asyncpg executor: reads what SQLAlchemy reads for the ledger's statements,
commits only on success, and raises SQLAlchemy's exceptions (IntegrityError for the
duplicate-key retry, a disconnect as connection_invalidated for UNAVAILABLE)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from budget_server.clock import SystemClock
from budget_server.db.engine import Database, open_database
from budget_server.db.errors import is_unavailable
from budget_server.db.migrate import upgrade_to_head
from budget_server.db.pg_raw import raw_transaction
from budget_server.db.schema import budgets, ledger_entries
from budget_server.ledger import statements as SQL
from budget_server.ledger.admin import BudgetSpec, create_budget
from budget_server.ledger.ledger import Ledger
from budget_server.ledger.pg_writes import write_all_postgres
from budget_server.ledger.writes import ConcurrentWrite, WriteSet
from tests.support.databases import fresh_postgres
from tests.support.ledger import commit_op, reserve_op
from tests.unit.test_sqlite_writer import _budget


async def _insert_then_fail(db: Database) -> None:
    async with raw_transaction(db.engine) as conn:
        await conn.execute(insert(budgets), [_budget("c")])
        raise RuntimeError("undo")


async def _read_chain(db: Database) -> None:
    async with raw_transaction(db.engine) as conn:
        await conn.execute(SQL.SELECT_CHAIN, {"ids": ["a"]})


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    async with fresh_postgres() as url:
        database = open_database(url)
        await upgrade_to_head(database)
        try:
            yield database
        finally:
            await database.close()


async def test_reads_match_sqlalchemy_and_commit_only_on_success(db: Database) -> None:
    async with raw_transaction(db.engine) as conn:
        await conn.execute(insert(budgets), [_budget("a"), _budget("b", frozen=True)])
    with pytest.raises(RuntimeError):
        await _insert_then_fail(db)
    ids = {"ids": ["b", "a", "c"]}
    async with raw_transaction(db.engine) as conn:
        raw = (await conn.execute(SQL.SELECT_CHAIN_FOR_UPDATE, ids)).all()
        empty = (await conn.execute(SQL.SELECT_CHAIN, {"ids": []})).all()
    async with db.read() as sa_conn:
        expected = (await sa_conn.execute(SQL.SELECT_CHAIN, ids)).all()
    assert [tuple(r) for r in raw] == [tuple(r) for r in expected]
    assert [r.id for r in raw] == ["a", "b"]
    assert raw[1].frozen is True
    assert empty == []


async def test_update_reports_rows_matched(db: Database) -> None:
    async with raw_transaction(db.engine) as conn:
        await conn.execute(insert(budgets), [_budget("a")])
    figures = {
        "b_id": "a",
        "b_spent0": 0,
        "b_reserved0": 0,
        "b_overage0": 0,
        "b_window0": 0,
        "b_alerted0": 0,
        "b_spent": 5,
        "b_reserved": 0,
        "b_overage": 0,
        "b_window": 0,
        "b_alerted": 0,
        "b_now": 2,
    }
    async with raw_transaction(db.engine) as conn:
        assert (await conn.execute(SQL.UPDATE_BUDGET_FIGURES, figures)).rowcount == 1
        assert (await conn.execute(SQL.UPDATE_BUDGET_FIGURES, figures)).rowcount == 0
    async with db.read() as sa_conn:
        assert (await sa_conn.execute(select(budgets.c.spent))).scalar_one() == 5


async def test_driver_errors_are_sqlalchemys(db: Database) -> None:
    async with raw_transaction(db.engine) as conn:
        await conn.execute(insert(budgets), [_budget("a")])
    with pytest.raises(IntegrityError):
        async with raw_transaction(db.engine) as conn:
            await conn.execute(insert(budgets), [_budget("a")])
    # The connection that failed was rolled back and is usable again.
    async with raw_transaction(db.engine) as conn:
        assert len((await conn.execute(SQL.SELECT_CHAIN, {"ids": ["a"]})).all()) == 1


async def test_a_dropped_connection_is_unavailable_then_replaced(db: Database) -> None:
    async with raw_transaction(db.engine) as conn:
        pid = (await conn.execute(select(budgets.c.id).where(budgets.c.id == "x"))).all()
        assert pid == []
    async with db.read() as sa_conn:
        raw = await sa_conn.get_raw_connection()
        backend = raw.driver_connection.get_server_pid()  # type: ignore[union-attr]
    url = db.engine.url
    admin = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        await admin.execute(f"SELECT pg_terminate_backend({backend})")
    finally:
        await admin.close()
    with pytest.raises(DBAPIError) as caught:  # the pool's only connection was killed
        await _read_chain(db)
    assert is_unavailable(caught.value)
    async with raw_transaction(db.engine) as conn:
        assert (await conn.execute(SQL.SELECT_CHAIN, {"ids": ["a"]})).all() == []


async def _write_stale_figures(db: Database) -> None:
    stale = {
        "b_id": "a",
        "b_spent0": 7,  # not what the row holds
        "b_reserved0": 0,
        "b_overage0": 0,
        "b_window0": 0,
        "b_alerted0": 0,
        "b_spent": 9,
        "b_reserved": 0,
        "b_overage": 0,
        "b_window": 0,
        "b_alerted": 0,
        "b_now": 2,
    }
    entry = {
        "budget_id": "a",
        "kind": "ADJUST",
        "amount": 9,
        "spent_delta": 9,
        "reserved_delta": 0,
        "overage_delta": 0,
        "reservation_id": None,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "model": "",
        "labels": "{}",
        "created_at_us": 2,
        "actor": "test",
    }
    async with raw_transaction(db.engine) as conn:
        await write_all_postgres(conn, WriteSet(budgets=[stale], entries=[entry]))


async def test_one_statement_write_checks_compare_and_set(db: Database) -> None:
    async with raw_transaction(db.engine) as conn:
        await conn.execute(insert(budgets), [_budget("a")])
    with pytest.raises(ConcurrentWrite):
        await _write_stale_figures(db)
    async with db.read() as sa_conn:  # the whole statement was undone, entry included
        assert (await sa_conn.execute(select(budgets.c.spent))).scalar_one() == 0
        entries = select(func.count()).select_from(ledger_entries)
        assert (await sa_conn.execute(entries)).scalar_one() == 0


async def _scans(db: Database) -> dict[str, tuple[int, int]]:
    """(sequential, index) scans per ledger table, as this backend has counted them.

    The pool holds one connection, so the ledger's transactions ran on this backend; its
    counts reach the statistics views once it flushes them, which it is told to do first.
    """
    async with db.engine.connect() as conn:
        await conn.execute(text("SELECT pg_stat_force_next_flush()"))
        await conn.commit()  # idle now: the backend flushes before the next query
        rows = await conn.execute(
            text(
                "SELECT relname, seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables "
                "WHERE relname IN ('budgets', 'reservations', 'reservation_holds')"
            )
        )
        return {name: (seq, idx) for name, seq, idx in rows.all()}


async def test_the_ledger_reads_rows_by_index_while_its_tables_are_small() -> None:
    """On small tables PostgreSQL plans sequential scans, and a prepared statement keeps
    its generic plan as the tables grow (`pg_raw.BEGIN`): the ledger's own statements
    must look rows up by index from the first transaction."""
    async with fresh_postgres() as url:
        db = open_database(url, pool_size=1)
        try:
            await upgrade_to_head(db)
            clock = SystemClock()
            spec = BudgetSpec("hot", None, "TOKENS", 10**9, "NONE", "UTC", "HARD", ())
            await create_budget(db, spec, clock.now_us())
            ledger = Ledger(db, clock)
            before = await _scans(db)
            # More than the five executions after which a generic plan may be kept.
            for _ in range(8):
                held = await ledger.reserve(reserve_op("hot", 10))
                await ledger.commit(commit_op(held, 7))
            after = await _scans(db)
        finally:
            await db.close()
    for table, (seq, idx) in after.items():
        assert seq == before[table][0], f"{table} was scanned sequentially"
        assert idx > before[table][1], f"{table} was not read by index"
    assert set(after) == {"budgets", "reservations", "reservation_holds"}
