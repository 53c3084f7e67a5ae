"""Execute prebuilt SQLAlchemy Core statements straight on an asyncpg connection.

With many budgets on PostgreSQL a profile showed the event loop ~95 % busy, mostly in
SQLAlchemy's async execution pipeline (greenlet hop, context setup, parameter and result
processing) around each of a batch's statements. The ledger's hot statements are few and
built once (`ledger/statements.py`), so each is compiled once here by SQLAlchemy's own
PostgreSQL compiler; executing it is then one asyncpg call, with asyncpg's own cache of
prepared statements. Expanding IN lists become `= ANY($n)` with an array, so one
prepared statement serves every list length.

What SQLAlchemy did and must still happen here: driver errors become SQLAlchemy's
exceptions (the asyncpg dialect's translation: IntegrityError, OperationalError,
InterfaceError...), which the actors and `db.errors.is_unavailable` classify; a
disconnect invalidates the connection and every older one in the pool, as SQLAlchemy
does, so a PostgreSQL restart costs one failed (UNAVAILABLE) batch per process, not one
per pooled connection.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement

from budget_server.db.compiled import CompileCache, Layout
from budget_server.db.sqlite_raw import RawResult

T = TypeVar("T")

_EXPANDING_IN = re.compile(r"IN \(__\[POSTCOMPILE_\w+\]\)")
_STATUS_COUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")
# Compiled with `?` placeholders, renumbered to asyncpg's `$n` after the IN rewrite.
_DIALECT = PGDialect_asyncpg(paramstyle="qmark")  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # bind names in placeholder order
    literals: dict[str, Any]  # values compiled into the statement (e.g. `deleted_at_us = 0`)
    row_type: Any  # a namedtuple class for SELECTs, else None


def _finish(layout: Layout) -> _Compiled:
    sql = _EXPANDING_IN.sub("= ANY(?)", layout.compiled.string)
    numbers = iter(range(1, len(layout.names) + 1))
    sql = re.sub(r"\?", lambda _m: f"${next(numbers)}", sql)
    return _Compiled(sql, layout.names, layout.literals, layout.row_type)


_compiled = CompileCache(_DIALECT, _finish)


def _compile(statement: ClauseElement, keys: tuple[str, ...]) -> _Compiled:
    return _compiled.get(statement, keys)


class RawPg:
    """An asyncpg connection that runs prebuilt Core statements, inside one transaction
    opened by `raw_transaction`."""

    dialect: Dialect = _DIALECT

    def __init__(self, driver: Any, adapted: Any) -> None:
        self._driver = driver  # asyncpg.Connection
        self._adapted = adapted  # SQLAlchemy's adapter, for its error translation

    async def execute(self, statement: Any, params: Any = None) -> RawResult:
        if isinstance(params, list):
            return await self._executemany(statement, params)
        compiled = _compile(statement, ())
        values = params or {}
        args = [values[n] if n in values else compiled.literals[n] for n in compiled.names]
        if compiled.row_type is None:
            status = await self._run(self._driver.execute, compiled.sql, args)
            match = _STATUS_COUNT.match(status or "")
            return RawResult([], int(match.group(1)) if match else -1)
        records = await self._run(self._driver.fetch, compiled.sql, args)
        make = compiled.row_type._make
        return RawResult([make(record) for record in records], len(records))

    async def _executemany(self, statement: Any, rows: Sequence[dict[str, Any]]) -> RawResult:
        if not rows:
            return RawResult([], 0)
        compiled = _compile(statement, tuple(rows[0]))
        names, literals = compiled.names, compiled.literals
        args = [[row[n] if n in row else literals[n] for n in names] for row in rows]
        await self._run(self._driver.executemany, compiled.sql, args, many=True)
        return RawResult([], -1)  # asyncpg reports no row count for executemany

    async def fetch_text(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """A statement written for PostgreSQL itself (`ledger.pg_writes`): asyncpg records."""
        return await self._run(self._driver.fetch, sql, args)

    async def exec_plain(self, sql: str) -> None:
        """BEGIN / COMMIT / ROLLBACK, with the driver's errors translated."""
        await self._run(self._driver.execute, sql, [])

    async def _run(
        self, call: Callable[..., Awaitable[T]], sql: str, args: Any, many: bool = False
    ) -> T:
        try:
            if many:
                return await call(sql, args)
            return await call(sql, *args)
        except Exception as error:
            self._translate(error, sql, args)

    def _translate(self, error: Exception, sql: str, args: Any) -> NoReturn:
        """Raise the SQLAlchemy exception SQLAlchemy itself would have raised."""
        try:
            self._adapted._handle_exception(error)
        except self._adapted.dbapi.Error as translated:
            disconnect = bool(_DIALECT.is_disconnect(translated, self._adapted, None))  # type: ignore[no-untyped-call]
            raise sa_exc.DBAPIError.instance(
                sql,
                args,
                translated,
                self._adapted.dbapi.Error,
                connection_invalidated=disconnect,
                dialect=_DIALECT,
            ) from error
        raise error  # pragma: no cover - _handle_exception always raises


# Every statement on this path looks rows up by key (`= ANY` of ids, `unnest` joined on a
# primary key), so a sequential scan is never the right plan for it, but PostgreSQL's
# planner picks one while the tables are small, and asyncpg's prepared statements keep the
# generic plan made then, each transaction reading the whole of `reservations` and
# `reservation_holds`. `python -m bench.ledger_groups --db postgres --rounds 6 --seconds 6`:
# 1,000 budgets fell from 1,363 to 768 reserve+commit/s over six rounds (now 1,662 to
# 1,426), and one hot budget after them ran at 511-555/s (now 1,446-2,723/s). Sequential
# scans are disabled for these transactions only (SET LOCAL; the admin and report queries
# keep them); a table without a usable index would still be scanned, the setting only
# prices the scan out.
BEGIN = "BEGIN; SET LOCAL enable_seqscan = off"


@contextlib.asynccontextmanager
async def raw_transaction(engine: AsyncEngine) -> AsyncIterator[RawPg]:
    """A pooled connection in one transaction: committed on success, rolled back on error.

    A connection whose state is unknown afterwards (disconnect, failed ROLLBACK,
    cancellation mid-statement) is invalidated rather than returned to the pool; a
    disconnect also retires every connection older than now, as SQLAlchemy does.
    """
    async with engine.connect() as conn:
        fairy = await conn.get_raw_connection()
        raw = RawPg(fairy.driver_connection, fairy.dbapi_connection)
        try:
            await raw.exec_plain(BEGIN)
            yield raw
            await raw.exec_plain("COMMIT")
        except Exception as error:
            disconnect = isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated
            if disconnect or isinstance(error, OSError):
                engine.sync_engine.pool._invalidate(fairy, error)
                raise
            try:
                await raw.exec_plain("ROLLBACK")
            except Exception:
                await conn.invalidate()
            raise
        except BaseException:  # cancelled mid-statement: the protocol state is unknown
            fairy.invalidate()
            raise
