"""Usage reports: what was charged, and for which tokens, grouped by budget, model, label or day.

A report reads the ledger entries that charge: COMMIT and EXPIRE. Their `spent_delta` is the
charge and `overage_delta` its part beyond the grant, in the unit of the entry's budget;
their token columns are the reservation's usage. Every row of a report is in one unit, so
a grouping that spans TOKENS and USD budgets yields a row per unit.

Hierarchies. A charge writes one entry on the reservation's budget and one on each ancestor,
each in that budget's unit. Grouped by budget, every entry counts: each budget's own
charges. Grouped otherwise, the copies are one call, counted once, on the deepest budget of
the chain that the prefix selects (the reservation's own budget when the prefix takes the
whole chain), so totals by model, label or day do not multiply with the depth of the tree.

Late commits. An expired reservation was charged at the last usage the server knew; a commit
that arrives later adds an entry for the rest. Its token columns hold the whole final usage,
so tokens are counted as the increase over the earlier entry, and the call is not counted
twice.

Bounds. The entries in range are counted first (at most `entries_max + 1` are looked at);
a report over more is refused with a message naming the limit. The rows are then streamed
and summed in Python (labels are JSON text, and the hierarchy and late-commit rules above
need per-entry decisions); memory grows with the number of groups, not of entries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.sql.elements import ColumnElement

from budget_server.db.engine import Database
from budget_server.db.schema import budgets, ledger_entries, reservations
from budget_server.errors import InvalidArgument, Overloaded
from budget_server.ledger.usage import Usage
from budget_server.limits import ID_LENGTH_MAX, LABEL_KEY_LENGTH_MAX

GROUPS: Final = ("BUDGET", "MODEL", "LABEL", "DAY")
CHARGE_KINDS: Final = ("COMMIT", "EXPIRE")
DAY_US: Final = 86_400 * 1_000_000
PARTITION_ROWS: Final = 2_000
"""Rows fetched from the database at a time while summing."""
IDS_PER_QUERY_MAX: Final = 500
"""Reservation ids per `IN (...)` when looking up earlier charges of late commits."""

_PREFIX = re.compile(r"[A-Za-z0-9:/._@+=-]*")


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """What UsageReport asks for, with enums mapped to names."""

    budget_prefix: str = ""
    since_us: int = 0
    """Inclusive; 0 = from the beginning."""
    until_us: int = 0
    """Exclusive; 0 = no upper bound."""
    group_by: tuple[str, ...] = ()
    """Names from GROUPS, in the order rows are sorted by; empty = by budget."""
    label_key: str = ""
    """The label whose value LABEL groups by."""


@dataclass(slots=True)
class ReportRow:
    """One group's sums; the group columns not grouped by are empty."""

    budget_id: str
    model: str
    label_value: str
    day: str
    unit: str
    charged: int = 0
    overage: int = 0
    usage: Usage = field(default_factory=Usage)
    calls: int = 0


@dataclass(frozen=True, slots=True)
class ChargeEntry:
    """The columns of a COMMIT or EXPIRE entry that a report reads."""

    id: int
    budget_id: str
    reservation_id: str
    kind: str
    unit: str
    spent_delta: int
    overage_delta: int
    reserved_delta: int
    usage: Usage
    model: str
    labels: str
    created_at_us: int

    @property
    def may_follow_an_expiry(self) -> bool:
        """A COMMIT that released no hold: a late commit (or a Charge, which is first)."""
        return self.kind == "COMMIT" and self.reserved_delta == 0


def check_query(query: ReportQuery) -> ReportQuery:
    prefix = query.budget_prefix
    if len(prefix) > ID_LENGTH_MAX or not _PREFIX.fullmatch(prefix):
        raise InvalidArgument(
            f"budget_prefix {prefix[:ID_LENGTH_MAX]!r} must be at most {ID_LENGTH_MAX} of the "
            "characters of budget ids: letters, digits and : / . _ @ + = -"
        )
    if query.since_us < 0 or query.until_us < 0:
        raise InvalidArgument("since_us and until_us must not be negative")
    if query.since_us and query.until_us and query.since_us >= query.until_us:
        raise InvalidArgument(
            f"since_us ({query.since_us}) must be before until_us ({query.until_us})"
        )
    unknown = [group for group in query.group_by if group not in GROUPS]
    if unknown:
        raise InvalidArgument(f"group_by has an unknown group {unknown[0]!r}")
    group_by = tuple(dict.fromkeys(query.group_by)) or ("BUDGET",)
    if "LABEL" in group_by:
        if not query.label_key:
            raise InvalidArgument("label_key is required to group by label")
        if len(query.label_key) > LABEL_KEY_LENGTH_MAX:
            raise InvalidArgument(
                f"label_key is {len(query.label_key)} characters; the maximum is "
                f"{LABEL_KEY_LENGTH_MAX}"
            )
    elif query.label_key:
        raise InvalidArgument("label_key is only used when grouping by label")
    return replace(query, group_by=group_by)


def utc_day(at_us: int) -> str:
    return _day_of_index(at_us // DAY_US)


@lru_cache(maxsize=4096)
def _day_of_index(index: int) -> str:
    return datetime.fromtimestamp(index * 86_400, UTC).date().isoformat()


@lru_cache(maxsize=4096)
def _label_value(labels: str, key: str) -> str:
    value = json.loads(labels).get(key, "")
    return value if isinstance(value, str) else str(value)


def _increase(usage: Usage, before: Usage) -> Usage:
    return Usage(
        input_tokens=max(0, usage.input_tokens - before.input_tokens),
        cached_input_tokens=max(0, usage.cached_input_tokens - before.cached_input_tokens),
        output_tokens=max(0, usage.output_tokens - before.output_tokens),
        reasoning_tokens=max(0, usage.reasoning_tokens - before.reasoning_tokens),
    )


def _peak(usages: Iterable[Usage]) -> Usage:
    peak = Usage()
    for usage in usages:
        peak = Usage(
            input_tokens=max(peak.input_tokens, usage.input_tokens),
            cached_input_tokens=max(peak.cached_input_tokens, usage.cached_input_tokens),
            output_tokens=max(peak.output_tokens, usage.output_tokens),
            reasoning_tokens=max(peak.reasoning_tokens, usage.reasoning_tokens),
        )
    return peak


class Totals:
    """Sums charge entries into rows; knows nothing of SQL (tests feed it entries)."""

    def __init__(self, group_by: Sequence[str], label_key: str = "") -> None:
        self.group_by = tuple(group_by)
        self.label_key = label_key
        self._rows: dict[tuple[str, ...], ReportRow] = {}

    def add(self, entry: ChargeEntry, earlier: Usage | None = None) -> None:
        """Add one entry; `earlier` is the usage already charged for the same reservation on
        the same budget by earlier entries (a late commit), None when this is the first."""
        budget_id = entry.budget_id if "BUDGET" in self.group_by else ""
        model = entry.model if "MODEL" in self.group_by else ""
        label = _label_value(entry.labels, self.label_key) if "LABEL" in self.group_by else ""
        day = utc_day(entry.created_at_us) if "DAY" in self.group_by else ""
        key = (budget_id, model, label, day, entry.unit)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = ReportRow(budget_id, model, label, day, entry.unit)
        row.charged += entry.spent_delta
        row.overage += entry.overage_delta
        tokens = entry.usage if earlier is None else _increase(entry.usage, earlier)
        row.usage = Usage(
            input_tokens=row.usage.input_tokens + tokens.input_tokens,
            cached_input_tokens=row.usage.cached_input_tokens + tokens.cached_input_tokens,
            output_tokens=row.usage.output_tokens + tokens.output_tokens,
            reasoning_tokens=row.usage.reasoning_tokens + tokens.reasoning_tokens,
        )
        if earlier is None:
            row.calls += 1

    def rows(self) -> list[ReportRow]:
        """Sorted by the groups in the order asked for, then by unit."""
        fields_by_group = {
            "BUDGET": "budget_id",
            "MODEL": "model",
            "LABEL": "label_value",
            "DAY": "day",
        }
        order = [fields_by_group[group] for group in self.group_by]

        def sort_key(row: ReportRow) -> tuple[str, ...]:
            return (*(getattr(row, name) for name in order), row.unit)

        return sorted(self._rows.values(), key=sort_key)


def _entry(row: Any) -> ChargeEntry:
    return ChargeEntry(
        id=row.id,
        budget_id=row.budget_id,
        reservation_id=row.reservation_id or "",
        kind=row.kind,
        unit=row.unit,
        spent_delta=row.spent_delta,
        overage_delta=row.overage_delta,
        reserved_delta=row.reserved_delta,
        usage=Usage(
            input_tokens=row.input_tokens,
            cached_input_tokens=row.cached_input_tokens,
            output_tokens=row.output_tokens,
            reasoning_tokens=row.reasoning_tokens,
        ),
        model=getattr(row, "model", ""),
        labels=getattr(row, "labels", "{}"),
        created_at_us=row.created_at_us,
    )


async def usage_report(db: Database, query: ReportQuery, *, entries_max: int) -> list[ReportRow]:
    """The report's rows; refused when more than `entries_max` entries are in range."""
    query = check_query(query)
    e = ledger_entries
    where: list[ColumnElement[bool]] = [e.c.kind.in_(CHARGE_KINDS)]
    if query.budget_prefix:
        where.append(e.c.budget_id.startswith(query.budget_prefix, autoescape=True))
    if query.since_us:
        where.append(e.c.created_at_us >= query.since_us)
    if query.until_us:
        where.append(e.c.created_at_us < query.until_us)
    by_budget = "BUDGET" in query.group_by
    columns: list[Any] = [
        e.c.id,
        e.c.budget_id,
        e.c.reservation_id,
        e.c.kind,
        e.c.spent_delta,
        e.c.overage_delta,
        e.c.reserved_delta,
        e.c.input_tokens,
        e.c.cached_input_tokens,
        e.c.output_tokens,
        e.c.reasoning_tokens,
        e.c.created_at_us,
        budgets.c.unit,
    ]
    if "MODEL" in query.group_by:
        columns.append(e.c.model)
    if "LABEL" in query.group_by:
        columns.append(e.c.labels)
    if not by_budget:
        # The chain's copies of one charge: keep the deepest budget the filter selected.
        columns.append(budgets.c.depth)
        columns.append(
            func.max(budgets.c.depth).over(partition_by=e.c.reservation_id).label("deepest")
        )
    statement = (
        select(*columns).join(budgets, budgets.c.id == e.c.budget_id).where(*where).order_by(e.c.id)
    )
    in_range = select(func.count()).select_from(
        select(e.c.id).where(*where).limit(entries_max + 1).subquery()
    )

    totals = Totals(query.group_by, query.label_key)
    maybe_late: list[ChargeEntry] = []
    async with db.read() as conn:
        count = (await conn.execute(in_range)).scalar_one()
        if count > entries_max:
            raise Overloaded(
                f"the report covers more than {entries_max:,} ledger entries, the most one "
                "report may read (report_entries_max, budgetd serve --report-entries-max); "
                "narrow it with since/until or a budget prefix"
            )
        result = await conn.stream(statement)
        async for partition in result.partitions(PARTITION_ROWS):
            for row in partition:
                if not by_budget and row.depth != row.deepest:
                    continue
                entry = _entry(row)
                if entry.may_follow_an_expiry:
                    maybe_late.append(entry)
                else:
                    totals.add(entry)
        earlier = await _earlier_charges(conn, maybe_late)
    for entry in maybe_late:
        before = [
            usage
            for entry_id, usage in earlier.get((entry.reservation_id, entry.budget_id), ())
            if entry_id < entry.id
        ]
        totals.add(entry, _peak(before) if before else None)
    return totals.rows()


async def _earlier_charges(
    conn: Any, entries: Sequence[ChargeEntry]
) -> dict[tuple[str, str], list[tuple[int, Usage]]]:
    """The EXPIRE entries that came before `entries` (late commits), by (reservation, budget).

    Entries carry no index on their reservation, so the lookup is bounded another way. A
    Charge (usage recorded without a hold) is never late: its reservation expires when it
    is created, which one primary-key read per reservation tells. A late commit's EXPIRE
    entries were written at or after its reservation's expiry and before the commit, so the
    search runs over that time range of the `created_at_us` index.
    """
    e, r = ledger_entries, reservations
    commits_at: dict[str, int] = {}
    for entry in entries:
        if entry.reservation_id:
            commits_at[entry.reservation_id] = max(
                commits_at.get(entry.reservation_id, 0), entry.created_at_us
            )
    expiries: list[tuple[int, str]] = []
    ids = sorted(commits_at)
    for start in range(0, len(ids), IDS_PER_QUERY_MAX):
        query = select(r.c.id, r.c.created_at_us, r.c.expires_at_us).where(
            r.c.id.in_(ids[start : start + IDS_PER_QUERY_MAX])
        )
        for row in (await conn.execute(query)).all():
            if row.expires_at_us > row.created_at_us:  # a reservation with a TTL, not a Charge
                expiries.append((row.expires_at_us, row.id))
    expiries.sort()
    found: dict[tuple[str, str], list[tuple[int, Usage]]] = {}
    for start in range(0, len(expiries), IDS_PER_QUERY_MAX):
        chunk = expiries[start : start + IDS_PER_QUERY_MAX]
        query = select(
            e.c.id,
            e.c.reservation_id,
            e.c.budget_id,
            e.c.input_tokens,
            e.c.cached_input_tokens,
            e.c.output_tokens,
            e.c.reasoning_tokens,
        ).where(
            e.c.kind == "EXPIRE",
            e.c.created_at_us >= chunk[0][0],
            e.c.created_at_us <= max(commits_at[res_id] for _, res_id in chunk),
            e.c.reservation_id.in_([res_id for _, res_id in chunk]),
        )
        for row in (await conn.execute(query)).all():
            usage = Usage(
                input_tokens=row.input_tokens,
                cached_input_tokens=row.cached_input_tokens,
                output_tokens=row.output_tokens,
                reasoning_tokens=row.reasoning_tokens,
            )
            found.setdefault((row.reservation_id, row.budget_id), []).append((row.id, usage))
    return found
