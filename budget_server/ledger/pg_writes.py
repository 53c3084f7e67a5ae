"""A batch's writes on PostgreSQL as one statement: one round trip instead of four or five.

Each table's rows go in as arrays, one per column, expanded by `unnest` inside a
data-modifying CTE (`UPDATE ... FROM unnest(...)`, `INSERT ... SELECT * FROM unnest(...)`);
all the CTEs run whether or not the final SELECT reads them, and the SELECT returns the
rows the two compare-and-set updates matched. The checks are those of
`writes.write_steps`: every budget row must still hold the figures that were read, and
every changed reservation its read state (here checked on PostgreSQL too, where an
executemany reports no row count). A foreign key from a hold to a reservation inserted
by a sibling CTE holds: PostgreSQL checks it at the end of the statement.

The statement's text depends only on which tables the batch writes, so there are at
most a few dozen variants, each prepared once per connection by asyncpg.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql

from budget_server.db.pg_raw import RawPg
from budget_server.db.schema import budgets, ledger_entries, reservation_holds, reservations
from budget_server.ledger.statements import (
    BUDGET_MATCH,
    BUDGET_SETS,
    HOLD_MATCH,
    HOLD_SETS,
    RESERVATION_MATCH,
    RESERVATION_SETS,
)
from budget_server.ledger.writes import ConcurrentWrite, Rows, WriteSet

_PG = postgresql.dialect()  # type: ignore[no-untyped-call]

_INSERT_TABLES = {
    "new_reservations": reservations,
    "new_holds": reservation_holds,
    "entries": ledger_entries,
}


class _Builder:
    """Numbers the array parameters as the statement's text is written."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []  # (part, bind key) per parameter

    def unnest(self, part: str, table: Table, columns: tuple[tuple[str, str], ...]) -> str:
        arrays = []
        for column, key in columns:
            self.keys.append((part, key))
            sql_type = table.c[column].type.compile(dialect=_PG)
            arrays.append(f"${len(self.keys)}::{sql_type}[]")
        names = ", ".join(f"c{i}" for i in range(len(columns)))
        return f"unnest({', '.join(arrays)}) AS v({names})"


def _update(
    builder: _Builder,
    part: str,
    table: Table,
    keys: tuple[tuple[str, str], ...],
    sets: tuple[tuple[str, str], ...],
) -> str:
    source = builder.unnest(part, table, keys + sets)
    where = " AND ".join(f"t.{column} = v.c{i}" for i, (column, _) in enumerate(keys))
    assign = ", ".join(f"{column} = v.c{i + len(keys)}" for i, (column, _) in enumerate(sets))
    return f"UPDATE {table.name} AS t SET {assign} FROM {source} WHERE {where} RETURNING 1"


@cache
def _statement(
    parts: frozenset[str], inserts: tuple[tuple[str, tuple[str, ...]], ...]
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The statement for a batch writing `parts` (and `inserts`, with their columns), and
    which part and key each numbered parameter takes its array from."""
    builder = _Builder()
    ctes = []
    if "budgets" in parts:
        sql = _update(builder, "budgets", budgets, BUDGET_MATCH, BUDGET_SETS)
        ctes.append(f"ub AS ({sql})")
    for part, columns in inserts:
        table = _INSERT_TABLES[part]
        source = builder.unnest(part, table, tuple((c, c) for c in columns))
        ctes.append(
            f"{part} AS (INSERT INTO {table.name} ({', '.join(columns)}) SELECT * FROM {source})"
        )
    if "reservations" in parts:
        sql = _update(builder, "reservations", reservations, RESERVATION_MATCH, RESERVATION_SETS)
        ctes.append(f"ur AS ({sql})")
    if "holds" in parts:
        sql = _update(builder, "holds", reservation_holds, HOLD_MATCH, HOLD_SETS)
        ctes.append(f"uh AS ({sql})")
    matched_budgets = "(SELECT count(*) FROM ub)" if "budgets" in parts else "0"
    matched_reservations = "(SELECT count(*) FROM ur)" if "reservations" in parts else "0"
    sql = f"WITH {', '.join(ctes)} SELECT {matched_budgets}, {matched_reservations}"
    return sql, tuple(builder.keys)


async def write_all_postgres(conn: RawPg, writes: WriteSet) -> None:
    """Send every write of the batch in one statement; raise ConcurrentWrite if a
    compare-and-set matched fewer rows than it should (the transaction is then undone)."""
    rows: dict[str, Rows] = {
        "budgets": writes.budgets,
        "new_reservations": writes.new_reservations,
        "new_holds": writes.new_holds,
        "reservations": writes.reservations,
        "holds": writes.holds,
        "entries": writes.entries,
    }
    parts = frozenset(part for part, part_rows in rows.items() if part_rows)
    if not parts:
        return
    inserts = tuple((p, tuple(rows[p][0])) for p in _INSERT_TABLES if p in parts)
    sql, keys = _statement(parts, inserts)
    args = [[row[key] for row in rows[part]] for part, key in keys]
    budgets_matched, reservations_matched = (await conn.fetch_text(sql, args))[0]
    if budgets_matched != len(writes.budgets):
        raise ConcurrentWrite("budgets")
    if reservations_matched != len(writes.reservations):
        raise ConcurrentWrite("reservations")
