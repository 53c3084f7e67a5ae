"""What a batch writes back, as rows, apart from how it is sent.

`write_set` turns a decided `ChainBatch` into the rows of each write (budget figures with
the values they were read at, new and changed reservations and holds, ledger entries).
`write_steps` sends them as the prebuilt statements of `statements.py` (SQLite, and
SQLAlchemy's async path); `pg_writes` sends the same rows to PostgreSQL as one statement.
Keeping the rows in one place keeps both ways writing exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Dialect

from budget_server.errors import ledger_assert
from budget_server.ledger import statements as SQL
from budget_server.ledger.model import labels_json
from budget_server.ledger.steps import Steps
from budget_server.ledger.usage import Usage

if TYPE_CHECKING:
    from budget_server.ledger.txn import ChainBatch

Rows = list[dict[str, Any]]


class ConcurrentWrite(Exception):
    """A budget row changed under us (another process): the batch must be retried."""


@dataclass
class WriteSet:
    """Rows keyed by the bind names of the statements in `statements.py`."""

    budgets: Rows = field(default_factory=list)  # UPDATE_BUDGET_FIGURES, compare-and-set
    new_reservations: Rows = field(default_factory=list)
    new_holds: Rows = field(default_factory=list)
    reservations: Rows = field(default_factory=list)  # UPDATE_RESERVATIONS
    holds: Rows = field(default_factory=list)  # UPDATE_HOLDS
    entries: Rows = field(default_factory=list)


def usage_columns(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
    }


def write_set(txn: ChainBatch) -> WriteSet:
    now = txn.now_us
    writes = WriteSet()
    for budget in txn.chain:
        if not budget.changed:
            continue
        spent0, reserved0, overage0, window0, alerted0 = budget.read_figures
        writes.budgets.append(
            {
                "b_id": budget.id,
                "b_spent0": spent0,
                "b_reserved0": reserved0,
                "b_overage0": overage0,
                "b_window0": window0,
                "b_alerted0": alerted0,
                "b_spent": budget.spent,
                "b_reserved": budget.reserved,
                "b_overage": budget.overage,
                "b_window": budget.window_start_us,
                "b_alerted": budget.alerted_pct,
                "b_now": now,
            }
        )

    new = [r for r in txn.reservations.values() if r.is_new]
    writes.new_reservations = [
        {
            "id": r.id,
            "budget_id": r.budget_id,
            "state": r.state,
            "idempotency_key": r.idempotency_key,
            "model": r.model,
            "labels": labels_json(r.labels),
            **usage_columns(r.usage),
            "grant_input_tokens": r.grant.input_tokens,
            "grant_output_tokens": r.grant.output_tokens,
            "charged": r.charged,
            "overage": r.overage,
            "expires_at_us": r.expires_at_us,
            "created_at_us": r.created_at_us,
            "finished_at_us": r.finished_at_us,
        }
        for r in new
    ]
    writes.new_holds = [
        {
            "reservation_id": r.id,
            "budget_id": budget_id,
            "held": held,
            "charged": r.charges.get(budget_id, 0),
        }
        for r in new
        for budget_id, held in r.holds.items()
    ]
    ledger_assert(len(writes.new_holds) >= len(new), "a new reservation has no holds")

    writes.reservations = [
        {
            "r_id": r.id,
            "r_read_state": r.read_state,
            "r_state": r.state,
            "r_input": r.usage.input_tokens,
            "r_cached": r.usage.cached_input_tokens,
            "r_output": r.usage.output_tokens,
            "r_reasoning": r.usage.reasoning_tokens,
            "r_grant_input": r.grant.input_tokens,
            "r_grant_output": r.grant.output_tokens,
            "r_charged": r.charged,
            "r_overage": r.overage,
            "r_expires": r.expires_at_us,
            "r_finished": r.finished_at_us,
        }
        for r in txn.reservations.values()
        if not r.is_new
        and (r.state != r.read_state or r.usage_changed or r.expiry_changed or r.holds_changed)
    ]
    writes.holds = [
        {
            "h_res": r.id,
            "h_budget": budget_id,
            "h_held": held,
            "h_charged": r.charges.get(budget_id, 0),
        }
        for r in txn.reservations.values()
        if not r.is_new and (r.holds_changed or r.state != r.read_state)
        for budget_id, held in r.holds.items()
    ]
    writes.entries = [
        {
            "budget_id": e.budget_id,
            "kind": e.kind,
            "amount": e.amount,
            "spent_delta": e.spent_delta,
            "reserved_delta": e.reserved_delta,
            "overage_delta": e.overage_delta,
            "reservation_id": e.reservation_id,
            **usage_columns(e.usage),
            "model": e.model,
            "labels": e.labels,
            "created_at_us": now,
            "actor": e.actor,
        }
        for e in txn.entries
    ]
    return writes


def merged(sets: Sequence[WriteSet]) -> WriteSet:
    """The writes of several batches (of chains that share no budget) as one set."""
    whole = WriteSet()
    for writes in sets:
        for part in fields(WriteSet):
            getattr(whole, part.name).extend(getattr(writes, part.name))
    return whole


def write_steps(writes: WriteSet, dialect: Dialect) -> Steps[None]:
    """Every row, as prebuilt statements (one per table); alerts are the caller's."""
    if len(writes.budgets) > 1 and dialect.supports_sane_multi_rowcount:
        # A group of batches (`group.ChainGroup`): each row names a different budget and
        # matches at most one row, so the sum says whether every compare-and-set held.
        result = yield SQL.UPDATE_BUDGET_FIGURES, writes.budgets
        if result.rowcount != len(writes.budgets):
            raise ConcurrentWrite("budgets")
    else:
        for row in writes.budgets:
            result = yield SQL.UPDATE_BUDGET_FIGURES, row
            if result.rowcount != 1:
                raise ConcurrentWrite(row["b_id"])
    if writes.new_reservations:
        yield SQL.INSERT_RESERVATIONS, writes.new_reservations
        yield SQL.INSERT_HOLDS, writes.new_holds
    if writes.reservations:
        result = yield SQL.UPDATE_RESERVATIONS, writes.reservations
        # A reservation leaves PENDING exactly once. Where the driver reports rows
        # matched by an executemany, check it; elsewhere the chain's row locks ensure it.
        if dialect.supports_sane_multi_rowcount and result.rowcount != len(writes.reservations):
            raise ConcurrentWrite("reservations")
    if writes.holds:
        yield SQL.UPDATE_HOLDS, writes.holds
    if writes.entries:
        yield SQL.INSERT_ENTRIES, writes.entries
