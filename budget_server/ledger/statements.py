"""The ledger's hot statements, built once with bind parameters.

Profiling the SQLite writer thread showed ~55 % of its time building SQLAlchemy
statements per batch (select().where(), .values(), order_by) and generating their cache
keys, against ~15 % running SQL. A statement built once caches its own key, so executing
it costs only the bind step. IN lists use expanding parameters, so one statement serves
every list length.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Table, Update, and_, bindparam, insert, or_, select, update

from budget_server.db.schema import (
    alerts,
    budgets,
    ledger_entries,
    prices,
    reservation_holds,
    reservations,
)

_chain = (
    select(budgets)
    .where(budgets.c.id.in_(bindparam("ids", expanding=True)), budgets.c.deleted_at_us == 0)
    .order_by(budgets.c.depth, budgets.c.id)
)
SELECT_CHAIN = _chain
SELECT_CHAIN_FOR_UPDATE = _chain.with_for_update()

_by_id = reservations.c.id.in_(bindparam("ids", expanding=True))
_by_key = and_(
    reservations.c.budget_id == bindparam("budget_id"),
    reservations.c.idempotency_key.in_(bindparam("keys", expanding=True)),
)
# Reservations with their holds, one row per hold: one round trip instead of two.
_with_holds = select(
    reservations,
    reservation_holds.c.budget_id.label("hold_budget_id"),
    reservation_holds.c.held.label("hold_held"),
    reservation_holds.c.charged.label("hold_charged"),
).select_from(
    reservations.outerjoin(
        reservation_holds, reservation_holds.c.reservation_id == reservations.c.id
    )
)
SELECT_RESERVATIONS_BY_ID = _with_holds.where(_by_id)
SELECT_RESERVATIONS_BY_KEY = _with_holds.where(_by_key)
SELECT_RESERVATIONS_BY_ID_OR_KEY = _with_holds.where(or_(_by_id, _by_key))

SELECT_PRICES = select(prices).where(prices.c.model.in_(bindparam("names", expanding=True)))

# (column, bind name) pairs of the compare-and-set updates: what a row must still hold
# (MATCH) and what it becomes (SETS). pg_writes builds its one-statement form from the same
# pairs, so the two cannot drift apart.
BUDGET_MATCH = (
    ("id", "b_id"),
    ("spent", "b_spent0"),
    ("reserved", "b_reserved0"),
    ("overage", "b_overage0"),
    ("window_start_us", "b_window0"),
    ("alerted_pct", "b_alerted0"),
)
BUDGET_SETS = (
    ("spent", "b_spent"),
    ("reserved", "b_reserved"),
    ("overage", "b_overage"),
    ("window_start_us", "b_window"),
    ("alerted_pct", "b_alerted"),
    ("updated_at_us", "b_now"),
)
RESERVATION_MATCH = (("id", "r_id"), ("state", "r_read_state"))
RESERVATION_SETS = (
    ("state", "r_state"),
    ("input_tokens", "r_input"),
    ("cached_input_tokens", "r_cached"),
    ("output_tokens", "r_output"),
    ("reasoning_tokens", "r_reasoning"),
    ("grant_input_tokens", "r_grant_input"),
    ("grant_output_tokens", "r_grant_output"),
    ("charged", "r_charged"),
    ("overage", "r_overage"),
    ("expires_at_us", "r_expires"),
    ("finished_at_us", "r_finished"),
)
HOLD_MATCH = (("reservation_id", "h_res"), ("budget_id", "h_budget"))
HOLD_SETS = (("held", "h_held"), ("charged", "h_charged"))


def _compare_and_set(
    table: Table, match: Sequence[tuple[str, str]], sets: Sequence[tuple[str, str]]
) -> Update:
    return (
        update(table)
        .where(*(table.c[column] == bindparam(name) for column, name in match))
        .values({column: bindparam(name) for column, name in sets})
    )


UPDATE_BUDGET_FIGURES = _compare_and_set(budgets, BUDGET_MATCH, BUDGET_SETS)

INSERT_RESERVATIONS = insert(reservations)
INSERT_HOLDS = insert(reservation_holds)
INSERT_ENTRIES = insert(ledger_entries)
INSERT_ALERTS = insert(alerts)

UPDATE_RESERVATIONS = _compare_and_set(reservations, RESERVATION_MATCH, RESERVATION_SETS)

UPDATE_HOLDS = _compare_and_set(reservation_holds, HOLD_MATCH, HOLD_SETS)
