"""Compiling the ledger's prebuilt statements once, for the raw sqlite3 and asyncpg paths.

Both raw paths (`db.sqlite_raw`, `db.pg_raw`) run statements built once in
`ledger/statements.py`; compiling one by SQLAlchemy per execution would give back what
skipping its pipeline saved. So each (statement, parameter keys) pair is compiled once
per dialect, and what both paths need from it is worked out here: the bind names in
placeholder order, the values compiled into the statement, and a row type for SELECTs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Select
from sqlalchemy.sql.compiler import SQLCompiler

T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """A statement compiled for one dialect, as a raw driver call needs it."""

    statement: ClauseElement
    compiled: SQLCompiler
    names: tuple[str, ...]  # bind names in placeholder order
    literals: dict[str, Any]  # values compiled into the statement (e.g. `deleted_at_us = 0`)
    row_type: Any  # a namedtuple class for SELECTs, else None


class CompileCache(Generic[T]):
    """Compiles each statement once and keeps what `finish` makes of it."""

    def __init__(self, dialect: Dialect, finish: Callable[[Layout], T]) -> None:
        self.dialect = dialect
        self._finish = finish
        self._entries: dict[tuple[int, tuple[str, ...]], tuple[ClauseElement, T]] = {}

    def get(self, statement: ClauseElement, keys: tuple[str, ...]) -> T:
        cache_key = (id(statement), keys)
        if (hit := self._entries.get(cache_key)) is not None and hit[0] is statement:
            return hit[1]
        compiled = cast(
            SQLCompiler, statement.compile(dialect=self.dialect, column_keys=list(keys) or None)
        )
        names = tuple(compiled.positiontup or ())
        binds = compiled.binds
        literals = {n: binds[n].value for n in names if n in binds and n not in keys}
        row_type: Any = None
        if isinstance(statement, Select):
            fields = [str(c.key) for c in statement.selected_columns]
            row_type = collections.namedtuple("Row", fields)  # type: ignore[misc, no-redef]
        result = self._finish(Layout(statement, compiled, names, literals, row_type))
        # The statement is kept in the cache so its id() cannot be reused by another object.
        self._entries[cache_key] = (statement, result)
        return result
