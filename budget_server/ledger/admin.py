"""Operator-facing reads and writes of the ledger: budgets, listings, verification.

These are not on the hot path, so each runs its own transaction; writes to a budget row
lock it (FOR UPDATE on PostgreSQL, the write lock on SQLite) like the actors do.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from budget_server import validation
from budget_server.db.engine import Database
from budget_server.db.schema import (
    PENDING,
    budgets,
    ledger_entries,
    reservation_holds,
    reservations,
)
from budget_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from budget_server.events.model import BudgetEvent, new_event_id
from budget_server.events.publisher import EventPublisher
from budget_server.ledger.model import (
    ENTRY_KINDS,
    MODES,
    RESERVATION_STATES,
    BudgetState,
    BudgetView,
    format_thresholds,
)
from budget_server.ledger.txn import budget_view
from budget_server.ledger.usage import UNITS
from budget_server.ledger.windows import PERIODS, window_bounds, zone
from budget_server.limits import (
    CHAIN_DEPTH_MAX,
    DEFAULT_THRESHOLDS_PCT,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    THRESHOLDS_MAX,
)


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """What CreateBudget asks for (already mapped from protobuf enums to names)."""

    id: str
    parent_id: str | None
    unit: str
    limit: int
    period: str
    time_zone: str
    mode: str
    thresholds_pct: tuple[int, ...]


def effective_view(state: BudgetState, now_us: int) -> BudgetView:
    """The budget as of now: a window that has ended reads as the new, empty window.

    The ROLLOVER entry is written by the next operation on the budget; until then the
    stored figures belong to the old window, and callers should not see them as current.
    """
    view = budget_view(state)
    if state.period == "NONE":
        return view
    start_us, end_us = window_bounds(state.period, state.time_zone, now_us)
    if start_us <= state.window_start_us:
        return view
    return replace(view, spent=0, overage=0, window_start_us=start_us, window_end_us=end_us)


def check_thresholds(thresholds: Sequence[int]) -> tuple[int, ...]:
    if len(thresholds) > THRESHOLDS_MAX:
        raise InvalidArgument(
            f"{len(thresholds)} alert thresholds; the maximum is {THRESHOLDS_MAX}"
        )
    for value in thresholds:
        if not 1 <= value <= 1000:
            raise InvalidArgument(f"alert threshold {value}% must be between 1 and 1000")
    return tuple(sorted(set(thresholds)))


def check_spec(spec: BudgetSpec) -> BudgetSpec:
    validation.budget_id(spec.id, "id")
    if spec.parent_id is not None:
        validation.budget_id(spec.parent_id, "parent_id")
        if spec.parent_id == spec.id:
            raise InvalidArgument("a budget cannot be its own parent")
    if spec.unit not in UNITS:
        raise InvalidArgument(f"unit must be one of {', '.join(UNITS)}")
    validation.limit(spec.limit)
    if spec.period not in PERIODS:
        raise InvalidArgument(f"period must be one of {', '.join(PERIODS)}")
    zone(spec.time_zone)
    if spec.mode not in MODES:
        raise InvalidArgument(f"mode must be one of {', '.join(MODES)}")
    thresholds = check_thresholds(spec.thresholds_pct or DEFAULT_THRESHOLDS_PCT)
    return replace(spec, thresholds_pct=thresholds)


async def _locked_budget(conn: AsyncConnection, db: Database, budget_id: str) -> BudgetState:
    query = select(budgets).where(budgets.c.id == budget_id, budgets.c.deleted_at_us == 0)
    if db.locks_rows:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound(f"budget {budget_id!r} does not exist")
    return BudgetState.from_row(row)


async def require_budget(conn: AsyncConnection, budget_id: str) -> None:
    """Listing an unknown budget is NOT_FOUND, not an empty page that hides a typo."""
    row = (
        await conn.execute(
            select(budgets.c.id).where(budgets.c.id == budget_id, budgets.c.deleted_at_us == 0)
        )
    ).first()
    if row is None:
        raise NotFound(f"budget {budget_id!r} does not exist")


def _entry(budget_id: str, kind: str, amount: int, now_us: int, actor: str) -> dict[str, object]:
    return {
        "budget_id": budget_id,
        "kind": kind,
        "amount": amount,
        "spent_delta": 0,
        "reserved_delta": 0,
        "overage_delta": 0,
        "reservation_id": None,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "model": "",
        "labels": "{}",
        "created_at_us": now_us,
        "actor": actor,
    }


async def create_budget(db: Database, spec: BudgetSpec, now_us: int) -> BudgetView:
    spec = check_spec(spec)
    start_us, _ = window_bounds(spec.period, spec.time_zone, now_us)
    async with db.write() as conn:
        depth = 0
        if spec.parent_id is not None:
            parent = await _locked_budget(conn, db, spec.parent_id)
            if parent.depth + 1 >= CHAIN_DEPTH_MAX:
                raise InvalidArgument(f"budgets nest at most {CHAIN_DEPTH_MAX} levels deep")
            depth = parent.depth + 1
        values = {
            "id": spec.id,
            "parent_id": spec.parent_id,
            "depth": depth,
            "unit": spec.unit,
            "limit_amount": spec.limit,
            "period": spec.period,
            "time_zone": spec.time_zone,
            "mode": spec.mode,
            "alert_thresholds": format_thresholds(spec.thresholds_pct),
            "frozen": False,
            "spent": 0,
            "reserved": 0,
            "overage": 0,
            "window_start_us": start_us,
            "created_at_us": now_us,
            "updated_at_us": now_us,
        }
        existing = (
            await conn.execute(select(budgets.c.deleted_at_us).where(budgets.c.id == spec.id))
        ).first()
        if existing is not None:
            raise AlreadyExists(
                f"budget {spec.id!r} already exists"
                + (" (deleted; its ledger keeps the id)" if existing.deleted_at_us else "")
            )
        try:
            await conn.execute(insert(budgets).values(values))
        except IntegrityError as exc:
            raise AlreadyExists(f"budget {spec.id!r} already exists") from exc
        await conn.execute(
            insert(ledger_entries).values(_entry(spec.id, "LIMIT", spec.limit, now_us, "admin"))
        )
        row = (await conn.execute(select(budgets).where(budgets.c.id == spec.id))).one()
    return budget_view(BudgetState.from_row(row))


@dataclass(frozen=True, slots=True)
class BudgetChanges:
    limit: int | None = None
    mode: str | None = None
    thresholds_pct: tuple[int, ...] | None = None
    frozen: bool | None = None


def change_events(
    before: BudgetState, after: BudgetState, now_us: int, reason: str
) -> list[BudgetEvent]:
    """What open streams and watchers must hear about a change to a budget."""
    events: list[BudgetEvent] = []

    def event(kind: str, amount: int = 0, message: str = "") -> BudgetEvent:
        return BudgetEvent(
            id=new_event_id(),
            kind=kind,
            budget_id=after.id,
            at_us=now_us,
            amount=amount,
            spent=after.spent,
            limit=after.limit,
            message=message,
        )

    if after.frozen and not before.frozen:
        events.append(event("FROZEN", message=reason or f"budget {after.id!r} was frozen"))
    if before.frozen and not after.frozen:
        events.append(event("UNFROZEN"))
    if after.limit != before.limit:
        # Below what is already spent and held, some grants can no longer be honoured.
        over = after.mode == "HARD" and after.spent + after.reserved > after.limit
        message = (
            f"the limit of {after.id!r} was lowered to {after.limit}, below what is spent "
            "and reserved"
            if over
            else ""
        )
        events.append(event("LIMIT_CHANGED", amount=after.limit, message=message))
    return events


async def update_budget(
    db: Database,
    budget_id: str,
    changes: BudgetChanges,
    now_us: int,
    publisher: EventPublisher | None = None,
    reason: str = "",
) -> tuple[BudgetView, BudgetView]:
    """Apply the changes; return the budget (before, after). Freezing or lowering the limit
    tells every replica (through the publisher) so their open streams are aborted."""
    validation.budget_id(budget_id, "id")
    values: dict[str, object] = {}
    if changes.limit is not None:
        values["limit_amount"] = validation.limit(changes.limit)
    if changes.mode is not None:
        if changes.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}")
        values["mode"] = changes.mode
    if changes.thresholds_pct is not None:
        values["alert_thresholds"] = format_thresholds(check_thresholds(changes.thresholds_pct))
    if changes.frozen is not None:
        values["frozen"] = changes.frozen
    if not values:
        raise InvalidArgument("nothing to update: give a limit, mode, thresholds or frozen")
    async with db.write() as conn:
        before = await _locked_budget(conn, db, budget_id)
        await conn.execute(
            update(budgets).where(budgets.c.id == budget_id).values(updated_at_us=now_us, **values)
        )
        if changes.limit is not None and changes.limit != before.limit:
            await conn.execute(
                insert(ledger_entries).values(
                    _entry(budget_id, "LIMIT", changes.limit, now_us, "admin")
                )
            )
        after = BudgetState.from_row(
            (await conn.execute(select(budgets).where(budgets.c.id == budget_id))).one()
        )
        events = change_events(before, after, now_us, reason)
        if publisher is not None:
            await publisher.in_transaction(conn, events, now_us)
    if publisher is not None:
        publisher.after_commit(events)
    return effective_view(before, now_us), effective_view(after, now_us)


async def delete_budget(
    db: Database, budget_id: str, now_us: int, publisher: EventPublisher | None = None
) -> None:
    """Retire a budget. Refused while it holds open reservations or has live children; its
    rows stay (the ledger is append-only) but it is gone for every other call."""
    validation.budget_id(budget_id, "id")
    async with db.write() as conn:
        await _locked_budget(conn, db, budget_id)
        children = (
            await conn.execute(
                select(func.count())
                .select_from(budgets)
                .where(budgets.c.parent_id == budget_id, budgets.c.deleted_at_us == 0)
            )
        ).scalar_one()
        if children:
            raise FailedPrecondition(
                f"budget {budget_id!r} has {children} child budget(s); delete them first"
            )
        pending = (
            await conn.execute(
                select(func.count())
                .select_from(reservation_holds)
                .join(reservations, reservations.c.id == reservation_holds.c.reservation_id)
                .where(reservation_holds.c.budget_id == budget_id, PENDING)
            )
        ).scalar_one()
        if pending:
            raise FailedPrecondition(
                f"budget {budget_id!r} holds {pending} open reservation(s); "
                "wait for them to finish or expire"
            )
        await conn.execute(
            update(budgets)
            .where(budgets.c.id == budget_id)
            .values(deleted_at_us=now_us, updated_at_us=now_us)
        )
        events = [BudgetEvent(id=new_event_id(), kind="DELETED", budget_id=budget_id, at_us=now_us)]
        if publisher is not None:
            await publisher.in_transaction(conn, events, now_us)
    if publisher is not None:
        publisher.after_commit(events)


async def get_budget_chain(db: Database, budget_id: str, now_us: int) -> list[BudgetView]:
    """The budget then its ancestors, parent first."""
    validation.budget_id(budget_id)
    chain: list[BudgetView] = []
    current: str | None = budget_id
    async with db.read() as conn:
        while current is not None and len(chain) < CHAIN_DEPTH_MAX:
            row = (
                await conn.execute(
                    select(budgets).where(budgets.c.id == current, budgets.c.deleted_at_us == 0)
                )
            ).first()
            if row is None:
                deleted = await conn.execute(
                    select(budgets.c.deleted_at_us).where(budgets.c.id == current)
                )
                if deleted.first() is not None:  # its id stays taken, so say why it is gone
                    raise NotFound(f"budget {current!r} was deleted")
                raise NotFound(f"budget {current!r} does not exist")
            chain.append(effective_view(BudgetState.from_row(row), now_us))
            current = row.parent_id
    return chain


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(value or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)


def encode_page_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def decode_page_token(token: str) -> str:
    try:
        decoded = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token is not one this server issued") from exc
    if not decoded:
        raise InvalidArgument("page_token is not one this server issued")
    return decoded


def _page_token_number(text: str) -> int:
    """The position a page token carries (an id or a time in µs), which the server wrote
    as ASCII digits of an int64; anything else is a token it did not issue."""
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**63:
        raise InvalidArgument("page_token is not one this server issued")
    return int(text)


async def list_budgets(
    db: Database, prefix: str, size: int, token: str, now_us: int
) -> tuple[list[BudgetView], str]:
    size = page_size(size)
    query = (
        select(budgets).where(budgets.c.deleted_at_us == 0).order_by(budgets.c.id).limit(size + 1)
    )
    if prefix:
        query = query.where(budgets.c.id.startswith(prefix, autoescape=True))
    if token:
        query = query.where(budgets.c.id > decode_page_token(token))
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    views = [effective_view(BudgetState.from_row(r), now_us) for r in rows[:size]]
    return views, encode_page_token(views[-1].id) if len(rows) > size else ""


async def list_reservations(
    db: Database, budget_id: str, state: str | None, size: int, token: str
) -> tuple[list[object], str]:
    """Rows of reservations (with the hold on their own budget), oldest first."""
    size = page_size(size)
    if state is not None and state not in RESERVATION_STATES:
        raise InvalidArgument(f"state must be one of {', '.join(RESERVATION_STATES)}")
    query = (
        select(reservations, reservation_holds.c.held)
        .join(
            reservation_holds,
            (reservation_holds.c.reservation_id == reservations.c.id)
            & (reservation_holds.c.budget_id == reservations.c.budget_id),
        )
        .order_by(reservations.c.created_at_us, reservations.c.id)
        .limit(size + 1)
    )
    if budget_id:
        query = query.where(reservations.c.budget_id == validation.budget_id(budget_id))
    if state is not None:
        query = query.where(PENDING if state == "PENDING" else reservations.c.state == state)
    if token:
        created_text, _, last_id = decode_page_token(token).partition(":")
        created = _page_token_number(created_text)
        query = query.where(
            (reservations.c.created_at_us > created)
            | ((reservations.c.created_at_us == created) & (reservations.c.id > last_id))
        )
    async with db.read() as conn:
        if budget_id:
            await require_budget(conn, budget_id)
        rows = list((await conn.execute(query)).all())
    next_token = ""
    if len(rows) > size:
        last = rows[size - 1]
        next_token = encode_page_token(f"{last.created_at_us}:{last.id}")
    return list(rows[:size]), next_token


async def list_entries(
    db: Database,
    budget_id: str,
    kind: str | None,
    since_us: int,
    until_us: int,
    size: int,
    token: str,
) -> tuple[list[object], str]:
    size = page_size(size)
    if kind is not None and kind not in ENTRY_KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(ENTRY_KINDS)}")
    if since_us < 0 or until_us < 0:
        raise InvalidArgument("since_us and until_us must not be negative")
    if since_us and until_us and since_us >= until_us:  # as a usage report's range
        raise InvalidArgument("since_us must be before until_us")
    query = select(ledger_entries).order_by(ledger_entries.c.id).limit(size + 1)
    if budget_id:
        query = query.where(ledger_entries.c.budget_id == validation.budget_id(budget_id))
    if kind is not None:
        query = query.where(ledger_entries.c.kind == kind)
    if since_us:
        query = query.where(ledger_entries.c.created_at_us >= since_us)
    if until_us:
        query = query.where(ledger_entries.c.created_at_us < until_us)
    if token:
        last = _page_token_number(decode_page_token(token))
        query = query.where(ledger_entries.c.id > last)
    async with db.read() as conn:
        if budget_id:
            await require_budget(conn, budget_id)
        rows = list((await conn.execute(query)).all())
    next_token = encode_page_token(str(rows[size - 1].id)) if len(rows) > size else ""
    return list(rows[:size]), next_token


@dataclass(frozen=True, slots=True)
class Drift:
    budget_id: str
    figure: str
    recorded: int
    recomputed: int


@dataclass(frozen=True, slots=True)
class Verification:
    budgets_checked: int
    entries_checked: int
    drifts: tuple[Drift, ...]

    @property
    def ok(self) -> bool:
        return not self.drifts


async def verify(db: Database, budget_id: str = "") -> Verification:
    """Recompute spent/reserved/overage from the entries and holds; report every mismatch."""
    sums = select(
        ledger_entries.c.budget_id,
        func.coalesce(func.sum(ledger_entries.c.spent_delta), 0).label("spent"),
        func.coalesce(func.sum(ledger_entries.c.reserved_delta), 0).label("reserved"),
        func.coalesce(func.sum(ledger_entries.c.overage_delta), 0).label("overage"),
        func.count().label("entries"),
    ).group_by(ledger_entries.c.budget_id)
    holds = (
        select(
            reservation_holds.c.budget_id,
            func.coalesce(func.sum(reservation_holds.c.held), 0).label("held"),
        )
        .join(reservations, reservations.c.id == reservation_holds.c.reservation_id)
        .where(PENDING)
        .group_by(reservation_holds.c.budget_id)
    )
    rows_query = select(budgets.c.id, budgets.c.spent, budgets.c.reserved, budgets.c.overage)
    if budget_id:
        validation.budget_id(budget_id)
        sums = sums.where(ledger_entries.c.budget_id == budget_id)
        holds = holds.where(reservation_holds.c.budget_id == budget_id)
        rows_query = rows_query.where(budgets.c.id == budget_id)
    async with db.read() as conn:
        rows = (await conn.execute(rows_query)).all()
        by_budget = {r.budget_id: r for r in (await conn.execute(sums)).all()}
        held = {r.budget_id: int(r.held) for r in (await conn.execute(holds)).all()}
    if budget_id and not rows:
        raise NotFound(f"budget {budget_id!r} does not exist")
    drifts: list[Drift] = []
    entries = 0
    for row in rows:
        sums_row = by_budget.get(row.id)
        recomputed = {
            "spent": int(sums_row.spent) if sums_row else 0,
            "reserved": int(sums_row.reserved) if sums_row else 0,
            "overage": int(sums_row.overage) if sums_row else 0,
        }
        entries += int(sums_row.entries) if sums_row else 0
        for figure, value in recomputed.items():
            if getattr(row, figure) != value:
                drifts.append(Drift(row.id, figure, getattr(row, figure), value))
        if row.reserved != held.get(row.id, 0):
            drifts.append(Drift(row.id, "holds", row.reserved, held.get(row.id, 0)))
    return Verification(len(rows), entries, tuple(drifts))
