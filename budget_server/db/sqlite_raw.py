"""Execute prebuilt SQLAlchemy Core statements straight on a sqlite3 connection.

On the SQLite writer thread, a profile showed SQLAlchemy's execution pipeline (context
setup, parameter processing, result metadata) taking ~55 % of the thread against ~22 %
running SQL, and that thread is what caps metered requests on many budgets. The ledger's
hot statements are few and built once (`ledger/statements.py`), so each is compiled once
here by SQLAlchemy's own SQLite compiler; executing it is then one sqlite3 call.

What SQLAlchemy did per execution and must still happen here: expanding IN lists are
rendered as `?, ?, ...` (cached per list length), literal binds keep their compiled
values, result values go through the column types' result processors (Boolean), and
driver errors become SQLAlchemy's exceptions (OperationalError, IntegrityError), which
the actors and `db.errors.is_unavailable` classify.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Select

from budget_server.db.compiled import CompileCache, Layout

_POSTCOMPILE = re.compile(r"__\[POSTCOMPILE_(\w+)\]")
Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # bind names in placeholder order
    literals: dict[str, Any]  # values compiled into the statement (e.g. `deleted_at_us = 0`)
    expanding: frozenset[str]
    row_type: Any  # a namedtuple class for SELECTs, else None
    processors: tuple[Processor, ...]


class RawResult:
    """The parts of a SQLAlchemy result the ledger uses: `.all()` and `.rowcount`."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self._rows


class RawSqlite:
    """A sqlite3 connection that runs prebuilt Core statements (one thread only)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.dialect: Dialect = SQLiteDialect_pysqlite(paramstyle="qmark")
        self._compiled = CompileCache(self.dialect, self._finish)
        self._expanded: dict[tuple[str, tuple[int, ...]], str] = {}

    def execute(self, statement: Any, params: Any = None) -> RawResult:
        if isinstance(params, list):
            return self._executemany(statement, params)
        compiled = self._compile(statement, ())
        values = params or {}
        sql = compiled.sql
        if compiled.expanding:
            lengths = tuple(len(values[n]) for n in compiled.names if n in compiled.expanding)
            sql = self._expand(compiled, lengths)
        args: list[Any] = []
        for name in compiled.names:
            value = values[name] if name in values else compiled.literals[name]
            if name in compiled.expanding:
                args.extend(value)
            else:
                args.append(value)
        cursor = self._run(lambda: self.connection.execute(sql, args), sql, args)
        if compiled.row_type is None:
            return RawResult([], cursor.rowcount)
        rows = cursor.fetchall()
        processors = compiled.processors
        if any(p is not None for p in processors):
            rows = [
                tuple(v if p is None else p(v) for p, v in zip(processors, row, strict=True))
                for row in rows
            ]
        make = compiled.row_type._make
        return RawResult([make(row) for row in rows], cursor.rowcount)

    def _executemany(self, statement: Any, rows: Sequence[dict[str, Any]]) -> RawResult:
        if not rows:
            return RawResult([], 0)
        compiled = self._compile(statement, tuple(rows[0]))
        names = compiled.names
        args = [[row[n] if n in row else compiled.literals[n] for n in names] for row in rows]
        sql = compiled.sql
        cursor = self._run(lambda: self.connection.executemany(sql, args), sql, args)
        return RawResult([], cursor.rowcount)

    def exec_plain(self, sql: str) -> None:
        """BEGIN / SAVEPOINT / COMMIT and the like, with the driver's errors translated."""
        self._run(lambda: self.connection.execute(sql), sql, ())

    # ------------------------------------------------------------------ internals

    def _compile(self, statement: ClauseElement, keys: tuple[str, ...]) -> _Compiled:
        return self._compiled.get(statement, keys)

    def _finish(self, layout: Layout) -> _Compiled:
        binds = layout.compiled.binds
        expanding = frozenset(n for n in layout.names if n in binds and binds[n].expanding)
        processors: tuple[Processor, ...] = ()
        if isinstance(layout.statement, Select):
            processors = tuple(
                self.dialect.type_descriptor(c.type).result_processor(self.dialect, None)
                for c in layout.statement.selected_columns
            )
        return _Compiled(
            layout.compiled.string,
            layout.names,
            layout.literals,
            expanding,
            layout.row_type,
            processors,
        )

    def _expand(self, compiled: _Compiled, lengths: tuple[int, ...]) -> str:
        key = (compiled.sql, lengths)
        if (sql := self._expanded.get(key)) is None:
            counts = iter(lengths)
            sql = _POSTCOMPILE.sub(lambda _m: ", ".join("?" * next(counts)), compiled.sql)
            self._expanded[key] = sql
        return sql

    def _run(self, call: Callable[[], sqlite3.Cursor], sql: str, args: Any) -> sqlite3.Cursor:
        try:
            return call()
        except sqlite3.Error as error:
            _translate(error, sql, args)

    def close(self) -> None:
        self.connection.close()


def _translate(error: sqlite3.Error, sql: str, args: Any) -> NoReturn:
    """Raise the SQLAlchemy exception SQLAlchemy itself would have raised."""
    raise sa_exc.DBAPIError.instance(
        sql, args, error, sqlite3.Error, dialect=SQLiteDialect_pysqlite()
    ) from error
