"""The SQLite writer: many jobs per transaction, each undone alone when it fails, results
only after COMMIT, driver errors as SQLAlchemy's; and the raw executor matching what
SQLAlchemy reads and writes for the ledger's statements."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from budget_server.db.engine import open_database
from budget_server.db.migrate import upgrade_to_head
from budget_server.db.schema import budgets
from budget_server.db.sqlite_raw import RawSqlite
from budget_server.db.sqlite_writer import SqliteWriter
from budget_server.ledger import statements as SQL


def _budget(budget_id: str, frozen: bool = False) -> dict[str, object]:
    return {
        "id": budget_id,
        "parent_id": None,
        "depth": 0,
        "unit": "TOKENS",
        "limit_amount": 1000,
        "period": "NONE",
        "time_zone": "UTC",
        "mode": "HARD",
        "alert_thresholds": "",
        "frozen": frozen,
        "spent": 0,
        "reserved": 0,
        "overage": 0,
        "window_start_us": 0,
        "created_at_us": 1,
        "updated_at_us": 1,
    }


@pytest.fixture
async def db_path(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "w.db"
    db = open_database(f"sqlite+aiosqlite:///{path}")
    await upgrade_to_head(db)
    await db.close()
    return str(path)


def _insert(budget_id: str, *, fail: bool = False):  # type: ignore[no-untyped-def]
    def job(conn: RawSqlite) -> str:
        conn.execute(insert(budgets), [_budget(budget_id)])
        if fail:
            raise RuntimeError(f"job {budget_id} failed")
        return budget_id

    return job


def _ids(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM budgets ORDER BY id")]


async def test_jobs_queued_together_share_a_transaction_and_fail_alone(db_path: str) -> None:
    writer = SqliteWriter(db_path, asyncio.Lock())
    try:
        results = await asyncio.gather(
            writer.run(_insert("a")),
            writer.run(_insert("b", fail=True)),
            writer.run(_insert("c")),
            return_exceptions=True,
        )
        assert results[0] == "a"
        assert results[2] == "c"
        assert isinstance(results[1], RuntimeError)
        assert _ids(db_path) == ["a", "c"]  # b's insert was undone, a's and c's kept
        assert (writer.transactions, writer.jobs) == (1, 3)
    finally:
        await writer.close()


async def test_a_job_failing_alone_leaves_nothing(db_path: str) -> None:
    writer = SqliteWriter(db_path, asyncio.Lock())
    try:
        with pytest.raises(RuntimeError):
            await writer.run(_insert("x", fail=True))
        assert _ids(db_path) == []
    finally:
        await writer.close()


async def test_driver_errors_become_sqlalchemy_errors(db_path: str) -> None:
    writer = SqliteWriter(db_path, asyncio.Lock())
    try:
        await writer.run(_insert("dup"))
        with pytest.raises(IntegrityError):
            await writer.run(_insert("dup"))
        with pytest.raises(OperationalError):
            await writer.run(lambda conn: conn.exec_plain("SELECT * FROM no_such_table"))
        assert await writer.run(lambda conn: "still works") == "still works"
    finally:
        await writer.close()


async def test_results_wait_for_the_gate_other_writers_hold(db_path: str) -> None:
    gate = asyncio.Lock()
    writer = SqliteWriter(db_path, gate)
    try:
        await gate.acquire()
        pending = asyncio.ensure_future(writer.run(_insert("late")))
        await asyncio.sleep(0.01)
        assert not pending.done()
        gate.release()
        assert await pending == "late"
    finally:
        await writer.close()


async def test_raw_reads_match_sqlalchemy(db_path: str) -> None:
    db = open_database(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with db.write() as conn:
            await conn.execute(insert(budgets), [_budget("p", frozen=True), _budget("q")])
        async with db.read() as conn:
            expected = (await conn.execute(SQL.SELECT_CHAIN, {"ids": ["p", "q"]})).all()
            gone = (await conn.execute(select(budgets).where(budgets.c.id == "none"))).all()
    finally:
        await db.close()
    raw = RawSqlite(sqlite3.connect(db_path))
    try:
        rows = raw.execute(SQL.SELECT_CHAIN, {"ids": ["p", "q"]}).all()
        assert [tuple(r) for r in rows] == [tuple(r) for r in expected]
        assert rows[0].frozen is True
        assert rows[1].frozen is False
        assert raw.execute(SQL.SELECT_CHAIN, {"ids": ["p"]}).all()[0].id == "p"
        assert raw.execute(SQL.SELECT_CHAIN, {"ids": []}).all() == gone == []
    finally:
        raw.close()
