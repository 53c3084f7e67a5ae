"""Open the ledger database (SQLite or PostgreSQL) the way the ledger needs it.

SQLite: WAL, a busy timeout, and `BEGIN IMMEDIATE`, so a transaction takes the write
lock before it reads the figures it decides on (a deferred BEGIN would let two readers
both decide, then one fail to upgrade its lock). Writers in this process also queue on
an asyncio lock first, so waiting happens in the event loop rather than in SQLite's
sleeping busy handler, whose back-off adds tens of milliseconds under contention.
For a file database, the ledger's own batches go through `sqlite_writer.SqliteWriter`
(one thread, many budgets per transaction) rather than this engine.

PostgreSQL: rows are locked with SELECT ... FOR UPDATE, root-first, which is what lets
several budgetd processes share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from budget_server.db.sqlite_writer import SqliteWriter
from budget_server.errors import InvalidArgument

SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


@dataclass
class Database:
    """The engine plus what differs between the two backends."""

    engine: AsyncEngine
    url_for_display: str
    _write_gate: asyncio.Lock | None = field(default=None, repr=False)
    # SQLite file databases: the ledger's batches, group-committed on one thread.
    sqlite_writer: SqliteWriter | None = field(default=None, repr=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def raw_postgres(self) -> bool:
        """Whether the ledger's batches run on the asyncpg connection directly
        (`db.pg_raw`) rather than through SQLAlchemy's execution pipeline."""
        return self.engine.dialect.name == "postgresql"

    @property
    def locks_rows(self) -> bool:
        """Whether SELECT ... FOR UPDATE means something (SQLite locks the whole file)."""
        return not self.is_sqlite

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed on success, rolled back on error."""
        if self._write_gate is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_gate, self.engine.connect() as plain:
            # Marked before BEGIN, so the begin hook knows to take the write lock.
            conn = await plain.execution_options(budgetd_write=True)
            async with conn.begin():
                yield conn

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only connection (on SQLite's WAL, readers do not wait for the writer)."""
        async with self.engine.connect() as conn:
            yield conn

    async def close(self) -> None:
        if self.sqlite_writer is not None:
            await self.sqlite_writer.close()
        await self.engine.dispose()


def open_database(url: str, *, pool_size: int = 20, echo: bool = False) -> Database:
    """Create the engine for a `sqlite+aiosqlite://` or `postgresql+asyncpg://` URL."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidArgument(f"cannot parse database URL {url!r}: {exc}") from exc
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise InvalidArgument(
            f"unsupported database URL scheme {parsed.drivername!r}; "
            f"use one of: {', '.join(d + '://' for d in SUPPORTED_DRIVERS)}"
        )
    display = parsed.render_as_string(hide_password=True)
    if parsed.drivername.startswith("sqlite"):
        engine = create_async_engine(
            parsed, echo=echo, pool_size=4, max_overflow=0, connect_args={"timeout": 30}
        )
        _configure_sqlite(engine.sync_engine)
        gate = asyncio.Lock()
        writer = None
        if _is_file(parsed):
            assert parsed.database is not None
            writer = SqliteWriter(parsed.database, gate)
        return Database(engine, display, gate, writer)
    # No pool_pre_ping: it cost BEGIN + SELECT + ROLLBACK per checkout, i.e. per batch. A
    # connection left stale by a PostgreSQL restart fails once instead; the error retires
    # the pool's older connections and maps to UNAVAILABLE (db.errors.is_unavailable), and
    # the client's retry succeeds. No overflow either: with many budgets the pool is always
    # full, and each overflow connection was closed on return, so every batch beyond the
    # pool paid a new backend (fork, authentication, SSL attempt, asyncpg's type lookups).
    # So `pool_size` is the cap, and every connection is kept open.
    engine = create_async_engine(parsed, echo=echo, pool_size=pool_size, max_overflow=0)
    return Database(engine, display)


def _is_file(url: URL) -> bool:
    """A second (sync) connection sees the same database only if it is a plain file."""
    return bool(url.database) and url.database != ":memory:" and not url.query


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over BEGIN from the driver so it can be BEGIN IMMEDIATE (SQLAlchemy's recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front; readers must not (on WAL they never wait).
        write = conn.get_execution_options().get("budgetd_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
