"""Run a ledger transaction's statements on either a sync or an async connection.

`ChainBatch` writes its reads and writes as a generator that yields statements and is sent
their results ("sans I/O"). The same decision code then runs through SQLAlchemy's async
engine (PostgreSQL, and SQLite when no sync writer is available) or, on SQLite, as one
plain function on the writer thread (`db.sqlite_writer`), where each statement costs a
direct sqlite3 call instead of a hop between the event loop and aiosqlite's thread.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any, Protocol, TypeVar

from sqlalchemy import CursorResult, Executable
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from budget_server.ledger.prices import price_candidates, resolve_prices
from budget_server.ledger.statements import SELECT_PRICES
from budget_server.ledger.usage import Price

T = TypeVar("T")

# A statement and its parameters (None, one dict, or a list of dicts for executemany).
Step = tuple[Executable, Any]
Steps = Generator[Step, CursorResult[Any], T]


class SyncConnection(Protocol):
    """What the sync path needs: `db.sqlite_raw.RawSqlite` (or a SQLAlchemy Connection)."""

    @property
    def dialect(self) -> Dialect: ...

    def execute(self, statement: Any, params: Any = None) -> Any: ...


class AsyncExecutor(Protocol):
    """What the async path needs: SQLAlchemy's AsyncConnection or `db.pg_raw.RawPg`."""

    @property
    def dialect(self) -> Dialect: ...

    async def execute(self, statement: Any, params: Any = None) -> Any: ...


async def run_async(conn: AsyncConnection | AsyncExecutor, steps: Steps[T]) -> T:
    """Drive `steps` on an async connection, one awaited statement at a time."""
    try:
        statement, params = next(steps)
        while True:
            result = await conn.execute(statement, params)
            statement, params = steps.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        steps.close()


def run_sync(conn: SyncConnection, steps: Steps[T]) -> T:
    """Drive `steps` on a sync connection (the SQLite writer thread)."""
    try:
        statement, params = next(steps)
        while True:
            statement, params = steps.send(conn.execute(statement, params))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        steps.close()


def price_steps(models: Iterable[str]) -> Steps[dict[str, Price]]:
    """Each model's price, read in one statement: exact name first, then family, then the
    default (`prices.price_candidates`)."""
    wanted = price_candidates(models)
    names = {name for candidates in wanted.values() for name in candidates}
    if not names:
        return {}
    rows = (yield SELECT_PRICES, {"names": sorted(names)}).all()
    return resolve_prices(wanted, rows)
