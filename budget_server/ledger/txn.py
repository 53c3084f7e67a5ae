"""Apply a batch of operations to one budget chain in one SQL transaction (group commit).

Statements per batch are few and independent of the batch size: lock and read the chain
(root-first), read the reservations the batch touches, decide every operation in memory,
then write back with multi-row statements. Budget rows are written with a compare-and-set
on the figures that were read, so a second writer that slipped past the lock makes the
batch retry instead of over-granting; on PostgreSQL the rows are also locked FOR UPDATE,
root-first then by id, the order that cannot deadlock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from budget_server.db.pg_raw import RawPg
from budget_server.errors import (
    BudgetExhausted,
    BudgetFrozen,
    FailedPrecondition,
    InvalidArgument,
    LedgerError,
    NotFound,
    ledger_assert,
)
from budget_server.events.model import BudgetEvent
from budget_server.events.publisher import EventPublisher
from budget_server.ledger import statements as SQL
from budget_server.ledger.alerts import fire_alerts
from budget_server.ledger.model import (
    BudgetState,
    BudgetView,
    ChargeOp,
    CommitOp,
    EntryDraft,
    ExpireOp,
    ExtendOp,
    Op,
    OpResult,
    RecordUsageOp,
    ReleaseOp,
    ReservationState,
    ReservationView,
    ReserveOp,
    labels_from_json,
    labels_json,
)
from budget_server.ledger.pg_writes import write_all_postgres
from budget_server.ledger.steps import (
    AsyncExecutor,
    Steps,
    SyncConnection,
    price_steps,
    run_async,
    run_sync,
)
from budget_server.ledger.usage import ZERO_USAGE, Price, Usage, cost
from budget_server.ledger.windows import window_bounds
from budget_server.ledger.writes import write_set, write_steps
from budget_server.limits import AMOUNT_MAX, INT64_MAX

# Operations on an existing reservation, which the batch loads before deciding.
RESERVATION_OPS = (ExtendOp, CommitOp, ReleaseOp, ExpireOp, RecordUsageOp)

log = logging.getLogger("budgetd.ledger")


def _unit_name(unit: str) -> str:
    """How an amount in `unit` reads in a message: USD amounts are nano-dollars."""
    return "nano-USD" if unit == "USD" else unit.lower()


def _same_kind(earlier: ReservationState, key: str, *, charge: bool) -> None:
    """A replay must repeat the call that used the key: a Charge answered with a pending
    reservation's replay would tell its caller it was recorded when nothing was charged,
    and a Reserve answered with a finished charge gets no grant. A charge is the one
    reservation that expires as it is made (a reservation lives at least TTL_MIN_MS)."""
    if (earlier.expires_at_us == earlier.created_at_us) == charge:
        return
    used_by, wanted = ("a reservation", "charge") if charge else ("a charge", "reservation")
    raise FailedPrecondition(
        f"idempotency_key {key!r} already names {used_by} ({earlier.id}); "
        f"a {wanted} needs a key of its own"
    )


def reservation_ids(ops: Sequence[Op]) -> list[str]:
    """The existing reservations a batch works on, which it reads before deciding."""
    return [op.reservation_id for op in ops if isinstance(op, RESERVATION_OPS)]


def idempotency_keys(ops: Sequence[Op]) -> list[str]:
    """The keys of a batch's new reservations, looked up in case they were made before."""
    return [
        op.idempotency_key
        for op in ops
        if isinstance(op, ReserveOp | ChargeOp) and op.idempotency_key
    ]


class NeedsAsync(Exception):
    """The batch fired alerts, whose outbox and notifications are written by SQLAlchemy
    async code: the sync (SQLite writer thread) or raw asyncpg (PostgreSQL) attempt is
    abandoned and the batch runs on SQLAlchemy's async path instead. Alerts fire once per
    threshold per window, so this is rare."""


def new_reservation_id() -> str:
    """`r_`, the wall-clock microsecond in 13 hex digits, then 80 random bits.

    Time first, so that new ids land at the right edge of every index keyed on them (the
    reservations' primary key, the holds', the ledger entries' reservation index) instead
    of on a random page each: with fully random ids a transaction of 128 reservations
    could dirty as many leaf pages per index, with these a handful (as UUIDv7). Metered
    requests/s through gRPC on SQLite, 4 paired runs of measure 2 on one growing file: no
    gain in the first, on near-empty tables, then +3-11 %. The random part keeps ids
    unguessable and unique across processes; nothing may read meaning into an id."""
    return "r_" + format(time.time_ns() // 1000, "013x") + os.urandom(10).hex()


def budget_view(state: BudgetState) -> BudgetView:
    _, end_us = (
        window_bounds(state.period, state.time_zone, state.window_start_us)
        if (state.window_start_us)
        else (0, 0)
    )
    return BudgetView(
        id=state.id,
        parent_id=state.parent_id,
        unit=state.unit,
        limit=state.limit,
        period=state.period,
        time_zone=state.time_zone,
        mode=state.mode,
        thresholds_pct=state.thresholds_pct,
        frozen=state.frozen,
        spent=state.spent,
        reserved=state.reserved,
        overage=state.overage,
        window_start_us=state.window_start_us,
        window_end_us=end_us,
        created_at_us=state.created_at_us,
        updated_at_us=state.updated_at_us,
    )


def reservation_view(res: ReservationState) -> ReservationView:
    return ReservationView(
        id=res.id,
        budget_id=res.budget_id,
        state=res.state,
        granted=res.granted,
        usage=res.usage,
        grant=res.grant,
        charged=res.charged,
        overage=res.overage,
        expires_at_us=res.expires_at_us,
        idempotency_key=res.idempotency_key or "",
        model=res.model,
        labels=dict(res.labels),
        created_at_us=res.created_at_us,
        finished_at_us=res.finished_at_us,
    )


def _usage_of(row: Any) -> Usage:
    return Usage(
        input_tokens=row.input_tokens,
        cached_input_tokens=row.cached_input_tokens,
        output_tokens=row.output_tokens,
        reasoning_tokens=row.reasoning_tokens,
    )


def roll_windows(chain: Sequence[BudgetState], now_us: int, entries: list[EntryDraft]) -> None:
    """Start a new window for every periodic budget whose window has ended.

    `spent` and `overage` restart at zero with a ROLLOVER entry whose deltas undo the old
    window's figures; `reserved` carries over, so pending reservations stay covered.
    """
    for budget in chain:
        if budget.period == "NONE":
            continue
        start_us, _ = window_bounds(budget.period, budget.time_zone, now_us)
        if start_us <= budget.window_start_us:
            continue
        entries.append(
            EntryDraft(
                budget_id=budget.id,
                kind="ROLLOVER",
                amount=budget.spent,
                spent_delta=-budget.spent,
                overage_delta=-budget.overage,
                actor="rollover",
            )
        )
        budget.spent = 0
        budget.overage = 0
        budget.alerted_pct = 0
        budget.window_start_us = start_us


class ChainBatch:
    """One transaction over one chain: read, decide in memory, write back."""

    def __init__(
        self,
        chain_ids: Sequence[str],
        now_us: int,
        lock_rows: bool,
        publisher: EventPublisher | None = None,
    ) -> None:
        self.publisher = publisher
        self.events: list[BudgetEvent] = []  # alerts fired by this batch
        self.chain_ids = tuple(chain_ids)
        self.now_us = now_us
        self.lock_rows = lock_rows
        self.chain: list[BudgetState] = []
        self.by_id: dict[str, BudgetState] = {}
        self.reservations: dict[str, ReservationState] = {}
        self.by_key: dict[str, ReservationState] = {}
        self.prices: dict[str, Price] = {}
        self.entries: list[EntryDraft] = []

    # ------------------------------------------------------------------ reading

    async def load(self, conn: AsyncConnection | AsyncExecutor, ops: Sequence[Op]) -> None:
        """Read the chain and the batch's reservations, through SQLAlchemy's async engine
        or PostgreSQL's raw asyncpg path (`db.pg_raw`)."""
        await run_async(conn, self._load_steps(ops))

    def load_sync(self, conn: SyncConnection, ops: Sequence[Op]) -> None:
        run_sync(conn, self._load_steps(ops))

    def _load_steps(self, ops: Sequence[Op]) -> Steps[None]:
        query = SQL.SELECT_CHAIN_FOR_UPDATE if self.lock_rows else SQL.SELECT_CHAIN
        self.take_chain((yield query, {"ids": list(self.chain_ids)}).all())
        ids, keys = reservation_ids(ops), idempotency_keys(ops)
        by_key = {"budget_id": self.chain_ids[-1], "keys": keys}
        found: Any = None
        if ids and keys:
            found = yield SQL.SELECT_RESERVATIONS_BY_ID_OR_KEY, {"ids": ids, **by_key}
        elif ids:
            found = yield SQL.SELECT_RESERVATIONS_BY_ID, {"ids": ids}
        elif keys:
            found = yield SQL.SELECT_RESERVATIONS_BY_KEY, by_key
        if found is not None:
            self.take_reservations(found.all())
        if models := self.priced_models(ops):
            self.prices = yield from price_steps(models)

    # The parts of loading, also used by `group.ChainGroup` to load many chains at once.

    def take_chain(self, rows: Sequence[Any]) -> None:
        """The chain's budget rows, root-first; a missing one means a deleted budget."""
        if len(rows) != len(self.chain_ids):
            missing = set(self.chain_ids) - {row.id for row in rows}
            raise NotFound(f"budget {sorted(missing)[0]!r} does not exist")
        self.chain = [BudgetState.from_row(row) for row in rows]
        self.by_id = {b.id: b for b in self.chain}
        roll_windows(self.chain, self.now_us, self.entries)

    def take_reservations(self, rows: Sequence[Any]) -> None:
        """Reservation rows joined with their holds: one row per hold."""
        for row in rows:
            res = self.reservations.get(row.id)
            if res is None:
                res = self._reservation_from_row(row)
                self._remember(res)
            if row.hold_budget_id is not None:
                res.holds[row.hold_budget_id] = row.hold_held
                res.charges[row.hold_budget_id] = row.hold_charged

    def priced_models(self, ops: Sequence[Op]) -> set[str]:
        """The models whose prices the batch needs: none unless a budget counts USD."""
        if not any(b.unit == "USD" for b in self.chain):
            return set()
        models = {getattr(op, "model", "") for op in ops}
        models |= {r.model for r in self.reservations.values()}
        return {m for m in models if m}

    @staticmethod
    def _reservation_from_row(row: Any) -> ReservationState:
        return ReservationState(
            id=row.id,
            budget_id=row.budget_id,
            state=row.state,
            idempotency_key=row.idempotency_key,
            model=row.model,
            labels=labels_from_json(row.labels),
            usage=_usage_of(row),
            grant=Usage(input_tokens=row.grant_input_tokens, output_tokens=row.grant_output_tokens),
            charged=row.charged,
            overage=row.overage,
            expires_at_us=row.expires_at_us,
            created_at_us=row.created_at_us,
            finished_at_us=row.finished_at_us,
            read_state=row.state,
        )

    def _remember(self, res: ReservationState) -> None:
        self.reservations[res.id] = res
        if res.idempotency_key:
            self.by_key[res.idempotency_key] = res

    # ------------------------------------------------------------------ deciding

    def apply(self, op: Op) -> OpResult | LedgerError:
        """Decide one operation; on a refusal nothing it touched has changed."""
        try:
            if isinstance(op, ReserveOp):
                return self._reserve(op)
            if isinstance(op, ExtendOp):
                return self._extend(op)
            if isinstance(op, ChargeOp):
                return self._charge(op)
            if isinstance(op, CommitOp):
                return self._finish(op.reservation_id, op, "COMMIT")
            if isinstance(op, ReleaseOp):
                return self._finish(op.reservation_id, op, "RELEASE")
            if isinstance(op, ExpireOp):
                return self._finish(op.reservation_id, op, "EXPIRE")
            if isinstance(op, RecordUsageOp):
                return self._record_usage(op)
        except LedgerError as error:
            return error
        raise TypeError(f"unknown operation {op!r}")

    def _amounts(
        self,
        amount: int,
        estimate: Usage | None,
        model: str,
        what: str,
        released: dict[str, int] | None = None,
    ) -> dict[str, int]:
        """What an amount or a usage estimate means in each budget's own unit.

        Bounded here, once for grants and charges alike: no amount above AMOUNT_MAX, and
        no running figure pushed past int64 (a BIGINT overflow would fail the whole batch).
        """
        if estimate is not None:
            amounts = {
                b.id: cost(b.unit, estimate, self.prices.get(model), model) for b in self.chain
            }
        else:
            units = {b.unit for b in self.chain}
            if len(units) > 1:
                raise InvalidArgument(
                    f"the budgets of {self.chain_ids[-1]!r} mix units "
                    f"({', '.join(sorted(units))}); give the {what} as token usage with a model "
                    "so each is charged in its own unit"
                )
            amounts = dict.fromkeys(self.chain_ids, amount)
        for budget in self.chain:
            value = amounts[budget.id]
            after = budget.spent + budget.reserved - (released or {}).get(budget.id, 0) + value
            if value > AMOUNT_MAX:
                raise InvalidArgument(
                    f"the {what} comes to {value} {_unit_name(budget.unit)} on budget "
                    f"{budget.id!r}, beyond what a ledger figure can hold "
                    f"(AMOUNT_MAX = {AMOUNT_MAX})"
                )
            if after > INT64_MAX:
                raise InvalidArgument(
                    f"the {what} of {value} {_unit_name(budget.unit)} would take budget "
                    f"{budget.id!r}'s spent plus reserved to {after}, beyond what a ledger "
                    f"figure can hold ({INT64_MAX})"
                )
        return amounts

    def _check_grant(self, amounts: dict[str, int]) -> None:
        for budget in self.chain:  # root-first: the error names the highest refusing budget
            if budget.frozen:
                raise BudgetFrozen(budget.id)
            wanted = amounts[budget.id]
            if budget.mode == "HARD" and wanted > budget.limit - budget.spent - budget.reserved:
                raise BudgetExhausted(budget.id, wanted, budget.available, budget.unit)

    def _hold(self, res: ReservationState, amounts: dict[str, int], kind: str, actor: str) -> None:
        for budget in self.chain:
            amount = amounts[budget.id]
            budget.reserved += amount
            res.holds[budget.id] = res.holds.get(budget.id, 0) + amount
            self.entries.append(
                EntryDraft(
                    budget_id=budget.id,
                    kind=kind,
                    amount=amount,
                    reserved_delta=amount,
                    reservation_id=res.id,
                    usage=res.usage,
                    model=res.model,
                    labels=labels_json(res.labels),
                    actor=actor,
                )
            )
            ledger_assert(
                budget.mode != "HARD" or budget.spent + budget.reserved <= budget.limit,
                f"a grant of {amount} took HARD budget {budget.id!r} past its limit",
            )

    def _reserve(self, op: ReserveOp) -> OpResult:
        if op.idempotency_key and (earlier := self.by_key.get(op.idempotency_key)):
            _same_kind(earlier, op.idempotency_key, charge=False)
            return self._result(earlier, replayed=True)
        grant = ZERO_USAGE
        if op.output_range is not None and op.estimate is not None:
            low, high = op.output_range
            output = self._largest_affordable_output(op.estimate, low, high, {}, op.model)
            grant = op.estimate.with_output(output)
            amounts = self._amounts(0, grant, op.model, "reservation")
        else:
            amounts = self._amounts(op.amount, op.estimate, op.model, "reservation")
        self._check_grant(amounts)
        res = ReservationState(
            id=new_reservation_id(),
            budget_id=self.chain_ids[-1],
            state="PENDING",
            idempotency_key=op.idempotency_key,
            model=op.model,
            labels=op.labels,
            usage=ZERO_USAGE,
            grant=grant,
            charged=0,
            overage=0,
            expires_at_us=self.now_us + op.ttl_ms * 1000,
            created_at_us=self.now_us,
            finished_at_us=0,
            is_new=True,
        )
        self._hold(res, amounts, "RESERVE", op.actor)
        self._remember(res)
        return self._result(res)

    def _charge(self, op: ChargeOp) -> OpResult:
        if (earlier := self.by_key.get(op.idempotency_key)) is not None:
            _same_kind(earlier, op.idempotency_key, charge=True)
            return self._result(earlier, replayed=True, charged=earlier.charged)
        # Priced (and bounded) before the reservation exists, so a refusal leaves no trace
        # and a retry with the same key is charged for real.
        self._amounts(op.amount, op.usage, op.model, "charge")
        res = ReservationState(
            id=new_reservation_id(),
            budget_id=self.chain_ids[-1],
            state="PENDING",
            idempotency_key=op.idempotency_key,
            model=op.model,
            labels=op.labels,
            usage=op.usage or ZERO_USAGE,
            grant=ZERO_USAGE,
            charged=0,
            overage=0,
            expires_at_us=self.now_us,
            created_at_us=self.now_us,
            finished_at_us=0,
            is_new=True,
        )
        res.holds = dict.fromkeys(self.chain_ids, 0)  # nothing was granted: all of it is overage
        self._remember(res)
        commit = CommitOp(
            reservation_id=res.id,
            usage=op.usage,
            amount=op.amount,
            actor=op.actor,
            future=op.future,
        )
        return self._finish(res.id, commit, "COMMIT")

    def _pending(self, reservation_id: str, verb: str) -> ReservationState:
        res = self.reservations.get(reservation_id)
        if res is None or res.budget_id != self.chain_ids[-1]:
            raise NotFound(f"reservation {reservation_id!r} does not exist")
        if res.state != "PENDING":
            raise FailedPrecondition(
                f"cannot {verb} reservation {reservation_id!r}: it is already {res.state.lower()}"
            )
        return res

    def _extend(self, op: ExtendOp) -> OpResult:
        res = self._pending(op.reservation_id, "extend")
        if res.expires_at_us <= self.now_us:
            raise FailedPrecondition(f"cannot extend reservation {res.id!r}: it has expired")
        if op.usage is not None and not op.usage.covers(res.usage):
            raise InvalidArgument("usage is cumulative and cannot go backwards")
        if op.grant_target is not None:
            amounts = self._grow_grant(res, op.grant_target, op.output_floor)
        else:
            amounts = self._amounts(op.amount, op.estimate, res.model, "extension")
        self._check_grant(amounts)
        if op.usage is not None and op.usage != res.usage:
            res.usage = op.usage
            res.usage_changed = True
        if op.ttl_ms:
            res.expires_at_us = self.now_us + op.ttl_ms * 1000
            res.expiry_changed = True
        self._hold(res, amounts, "EXTEND", op.actor)
        res.holds_changed = True
        return self._result(res)

    def _record_usage(self, op: RecordUsageOp) -> OpResult:
        res = self._pending(op.reservation_id, "meter")
        if op.usage is not None:
            if not op.usage.covers(res.usage):
                raise InvalidArgument("usage is cumulative and cannot go backwards")
            if op.usage != res.usage:
                res.usage = op.usage
                res.usage_changed = True
        if op.ttl_ms:
            res.expires_at_us = self.now_us + op.ttl_ms * 1000
            res.expiry_changed = True
        return self._result(res)

    def _affordable(self, extra: dict[str, int]) -> str | None:
        """The first budget (root-first) that cannot cover `extra`, or None."""
        for budget in self.chain:
            if budget.frozen or (
                budget.mode == "HARD"
                and extra[budget.id] > budget.limit - budget.spent - budget.reserved
            ):
                return budget.id
        return None

    def _largest_affordable_output(
        self, shape: Usage, low: int, high: int, holds: dict[str, int], model: str
    ) -> int:
        """The most output tokens in [low, high] that every budget can still cover.

        Costs grow with output in every unit, so a binary search finds the edge; near the
        limit this is what shrinks a grant to exactly what is left.
        """

        def extra(output: int) -> dict[str, int]:
            usage = shape.with_output(output)
            needed = self._amounts(0, usage, model, "grant")
            return {b: needed[b] - holds.get(b, 0) for b in needed}

        if (refusing := self._affordable(extra(low))) is not None:
            budget = self.by_id[refusing]
            if budget.frozen:
                raise BudgetFrozen(budget.id)
            raise BudgetExhausted(budget.id, extra(low)[refusing], budget.available, budget.unit)
        if low < high and self._fits(extra, high):
            return high  # the common case, away from the limit: one pricing, no search
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(extra, middle):
                low = middle
            else:
                high = middle - 1
        return low

    def _fits(self, extra: Callable[[int], dict[str, int]], output: int) -> bool:
        try:
            return self._affordable(extra(output)) is None
        except InvalidArgument:  # beyond AMOUNT_MAX: certainly more than any budget has
            return False

    def _grow_grant(self, res: ReservationState, target: Usage, floor: int) -> dict[str, int]:
        """Extra amounts per budget to grow a meter grant towards `target`; updates res.grant."""
        shape = Usage(
            input_tokens=max(target.input_tokens, res.grant.input_tokens),
            output_tokens=res.grant.output_tokens,
        )
        low = max(floor, res.grant.output_tokens)
        high = max(target.output_tokens, low)
        output = self._largest_affordable_output(shape, low, high, res.holds, res.model)
        res.grant = shape.with_output(output)
        needed = self._amounts(0, res.grant, res.model, "grant")
        return {b: max(0, needed[b] - res.holds.get(b, 0)) for b in needed}

    def _finish(self, reservation_id: str, op: Op, kind: str) -> OpResult:
        res = self.reservations.get(reservation_id)
        if res is None or res.budget_id != self.chain_ids[-1]:
            raise NotFound(f"reservation {reservation_id!r} does not exist")
        final_state = {"COMMIT": "COMMITTED", "RELEASE": "RELEASED", "EXPIRE": "EXPIRED"}[kind]
        if res.state == "EXPIRED" and isinstance(op, CommitOp) and op.usage is not None:
            return self._late_commit(res, op.usage, op.actor)
        if res.state != "PENDING":
            if res.state == final_state and kind != "EXPIRE":
                return self._result(res, replayed=True, charged=res.charged, overage=res.overage)
            verb = kind.lower()
            raise FailedPrecondition(
                f"cannot {verb} reservation {res.id!r}: it was already {res.state.lower()}"
                + (f" and charged {res.charged}" if res.charged else "")
            )
        if kind == "EXPIRE" and res.expires_at_us > self.now_us:
            raise FailedPrecondition(f"reservation {res.id!r} has not expired yet")

        charges = dict.fromkeys(self.chain_ids, 0)
        if isinstance(op, CommitOp):
            if op.usage is not None:
                # The committed usage is final (often the provider's own count), so it may
                # be below what the client estimated while streaming. Priced before anything
                # changes, so a refused commit leaves the reservation as it was.
                charges = self._amounts(0, op.usage, res.model, "commit", res.holds)
                res.usage = op.usage
                res.usage_changed = True
            else:
                charges = self._amounts(op.amount, None, res.model, "commit", res.holds)
        elif kind == "EXPIRE" and not res.usage.is_zero:
            charges = self._expiry_charges(res)

        labels = labels_json(res.labels)
        for budget in self.chain:
            held = res.holds.get(budget.id, 0)
            charge = charges[budget.id]
            overage = max(0, charge - held)
            budget.reserved -= held
            budget.spent += charge
            budget.overage += overage
            ledger_assert(budget.reserved >= 0, f"reserved of {budget.id} went negative")
            res.charges[budget.id] = charge
            self.entries.append(
                EntryDraft(
                    budget_id=budget.id,
                    kind=kind,
                    amount=charge,
                    spent_delta=charge,
                    reserved_delta=-held,
                    overage_delta=overage,
                    reservation_id=res.id,
                    usage=res.usage,
                    model=res.model,
                    labels=labels,
                    actor=op.actor,
                )
            )
        own = self.chain_ids[-1]
        res.charged = charges[own]
        res.overage = max(0, charges[own] - res.holds.get(own, 0))
        res.state = final_state
        res.finished_at_us = self.now_us
        return self._result(res, charged=res.charged, overage=res.overage)

    def _expiry_charges(self, res: ReservationState) -> dict[str, int]:
        """What an expiry charges: the last usage reported, priced; or, when that cannot be
        priced (the model's price was deleted from a USD budget's table) or would push a
        figure past what the ledger holds (a client reporting an absurd count), what the
        reservation held, which fits by construction. Either way the reservation ends: the
        sweeper retried a refused expiry every second, for ever, and the hold blocked the
        budget's deletion."""
        try:
            return self._amounts(0, res.usage, res.model, "expiry", res.holds)
        except (InvalidArgument, FailedPrecondition) as refused:
            log.warning(
                "reservation %s expires charged what it held, not its last usage: %s",
                res.id,
                refused,
            )
            return {budget_id: res.holds.get(budget_id, 0) for budget_id in self.chain_ids}

    def _late_commit(self, res: ReservationState, usage: Usage, actor: str) -> OpResult:
        """A commit that arrives after expiry: the reservation was charged at the last usage
        the server knew of; charge the rest of the real usage now, never less than before."""
        # Bounded by what it adds: the part already charged is in `spent` already.
        charges = self._amounts(0, usage, res.model, "commit", res.charges)
        labels = labels_json(res.labels)
        for budget in self.chain:
            extra = max(0, charges[budget.id] - res.charges.get(budget.id, 0))
            budget.spent += extra
            budget.overage += extra
            res.charges[budget.id] = res.charges.get(budget.id, 0) + extra
            self.entries.append(
                EntryDraft(
                    budget_id=budget.id,
                    kind="COMMIT",
                    amount=extra,
                    spent_delta=extra,
                    overage_delta=extra,
                    reservation_id=res.id,
                    usage=usage,
                    model=res.model,
                    labels=labels,
                    actor=actor,
                )
            )
        own = self.chain_ids[-1]
        res.usage = usage
        res.usage_changed = True
        res.overage = max(0, res.charges[own] - res.holds.get(own, 0))
        res.charged = res.charges[own]
        res.state = "COMMITTED"
        res.finished_at_us = self.now_us
        return self._result(res, charged=res.charged, overage=res.overage)

    def _result(
        self, res: ReservationState, *, replayed: bool = False, charged: int = 0, overage: int = 0
    ) -> OpResult:
        chain = tuple(budget_view(b) for b in self.chain)
        return OpResult(
            reservation=reservation_view(res),
            budget=chain[-1],
            replayed=replayed,
            charged=charged,
            overage=overage,
            chain=chain,
        )

    # ------------------------------------------------------------------ writing

    def fire_due_alerts(self) -> None:
        for budget in self.chain:
            if (
                budget.spent != budget.read_figures[0]
                or budget.window_start_us != budget.read_figures[3]
            ):
                self.events.extend(fire_alerts(budget, self.now_us))

    async def flush(self, conn: AsyncConnection) -> None:
        self.fire_due_alerts()
        await run_async(conn, self._flush_steps(conn.dialect))
        if self.events and self.publisher is not None:
            await self.publisher.in_transaction(conn, self.events, self.now_us)

    async def flush_raw(self, conn: RawPg) -> None:
        """Write back on PostgreSQL's raw asyncpg path, in one statement (`pg_writes`);
        raises NeedsAsync, before writing, if the batch fired alerts (their rows, outbox
        and pg_notify are written on the SQLAlchemy path)."""
        self.fire_due_alerts()
        if self.events:
            raise NeedsAsync()
        await write_all_postgres(conn, write_set(self))

    def flush_sync(self, conn: SyncConnection) -> None:
        """Write back on a sync connection; raises NeedsAsync, before writing, if the batch
        fired alerts that a publisher must record (its outbox code is async)."""
        self.fire_due_alerts()
        if self.events and self.publisher is not None:
            raise NeedsAsync()
        run_sync(conn, self._flush_steps(conn.dialect))

    def _flush_steps(self, dialect: Dialect) -> Steps[None]:
        yield from write_steps(write_set(self), dialect)
        if self.events:
            yield self._alert_rows()

    def _alert_rows(self) -> tuple[Any, list[dict[str, Any]]]:
        return (
            SQL.INSERT_ALERTS,
            [
                {
                    "event_id": e.id,
                    "budget_id": e.budget_id,
                    "window_start_us": self.by_id[e.budget_id].window_start_us,
                    "threshold_pct": e.threshold_pct,
                    "spent": e.spent,
                    "limit_amount": e.limit,
                    "fired_at_us": e.at_us,
                }
                for e in self.events
            ],
        )
