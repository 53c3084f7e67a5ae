"""The ledger's hot statements, built once with bind parameters.

Profiling the SQLite writer thread showed ~55 % of its time building SQLAlchemy
statements per batch (select().where(), .values(), order_by) and generating their cache
keys, against ~15 % running SQL. A statement built once caches its own key, so executing
it costs only the bind step. IN lists use expanding parameters, so one statement serves
every list length.
"""

from __future__ import annotations

from sqlalchemy import and_, bindparam, insert, or_, select, update

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

UPDATE_BUDGET_FIGURES = (
    update(budgets)
    .where(
        budgets.c.id == bindparam("b_id"),
        budgets.c.spent == bindparam("b_spent0"),
        budgets.c.reserved == bindparam("b_reserved0"),
        budgets.c.overage == bindparam("b_overage0"),
        budgets.c.window_start_us == bindparam("b_window0"),
        budgets.c.alerted_pct == bindparam("b_alerted0"),
    )
    .values(
        spent=bindparam("b_spent"),
        reserved=bindparam("b_reserved"),
        overage=bindparam("b_overage"),
        window_start_us=bindparam("b_window"),
        alerted_pct=bindparam("b_alerted"),
        updated_at_us=bindparam("b_now"),
    )
)

INSERT_RESERVATIONS = insert(reservations)
INSERT_HOLDS = insert(reservation_holds)
INSERT_ENTRIES = insert(ledger_entries)
INSERT_ALERTS = insert(alerts)

UPDATE_RESERVATIONS = (
    update(reservations)
    .where(
        reservations.c.id == bindparam("r_id"),
        reservations.c.state == bindparam("r_read_state"),
    )
    .values(
        state=bindparam("r_state"),
        input_tokens=bindparam("r_input"),
        cached_input_tokens=bindparam("r_cached"),
        output_tokens=bindparam("r_output"),
        reasoning_tokens=bindparam("r_reasoning"),
        grant_input_tokens=bindparam("r_grant_input"),
        grant_output_tokens=bindparam("r_grant_output"),
        charged=bindparam("r_charged"),
        overage=bindparam("r_overage"),
        expires_at_us=bindparam("r_expires"),
        finished_at_us=bindparam("r_finished"),
    )
)

UPDATE_HOLDS = (
    update(reservation_holds)
    .where(
        reservation_holds.c.reservation_id == bindparam("h_res"),
        reservation_holds.c.budget_id == bindparam("h_budget"),
    )
    .values(held=bindparam("h_held"), charged=bindparam("h_charged"))
)
