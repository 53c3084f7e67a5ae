"""The ledger an obvious implementation would write: one SQL transaction per operation.

It is the lower limit budgetd's ledger is measured against. Every reserve and every commit
is its own transaction that locks the budget row (SELECT ... FOR UPDATE), checks it and
UPDATEs it, with the reservation row beside it; nothing is batched or coalesced, so a hot
budget costs one serialised transaction per operation. It runs on the same engine set-up
as budgetd (`budget_server.db.engine.open_database`: WAL and BEGIN IMMEDIATE on SQLite,
the same pool on PostgreSQL), so the comparison is of the two designs, not of the drivers.

SQLite has no row locks: SQLAlchemy leaves FOR UPDATE out there, and BEGIN IMMEDIATE takes
the database's write lock instead.
"""

from __future__ import annotations

import secrets

from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, select, update

from budget_server.db.engine import Database


class NaiveExhausted(Exception):
    """The budget cannot cover the reservation."""


metadata = MetaData()

naive_budgets = Table(
    "naive_budgets",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("limit_amount", BigInteger, nullable=False),
    Column("spent", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
)

naive_reservations = Table(
    "naive_reservations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("budget_id", String(128), nullable=False),
    Column("state", String(12), nullable=False),
    Column("granted", BigInteger, nullable=False),
    Column("charged", BigInteger, nullable=False),
)


class NaiveLedger:
    """Reserve and commit, each one transaction with a locked read and an update."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_schema(self) -> None:
        async with self.db.write() as conn:
            await conn.run_sync(metadata.create_all)

    async def create_budget(self, budget_id: str, limit: int) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                insert(naive_budgets).values(id=budget_id, limit_amount=limit, spent=0, reserved=0)
            )

    async def reserve(self, budget_id: str, amount: int) -> str:
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    select(naive_budgets).where(naive_budgets.c.id == budget_id).with_for_update()
                )
            ).one()
            if row.spent + row.reserved + amount > row.limit_amount:
                raise NaiveExhausted(budget_id)
            await conn.execute(
                update(naive_budgets)
                .where(naive_budgets.c.id == budget_id)
                .values(reserved=naive_budgets.c.reserved + amount)
            )
            reservation_id = "nr_" + secrets.token_hex(12)
            await conn.execute(
                insert(naive_reservations).values(
                    id=reservation_id,
                    budget_id=budget_id,
                    state="PENDING",
                    granted=amount,
                    charged=0,
                )
            )
        return reservation_id

    async def commit(self, reservation_id: str, charged: int) -> None:
        async with self.db.write() as conn:
            reservation = (
                await conn.execute(
                    select(naive_reservations)
                    .where(naive_reservations.c.id == reservation_id)
                    .with_for_update()
                )
            ).one()
            await conn.execute(
                select(naive_budgets.c.id)
                .where(naive_budgets.c.id == reservation.budget_id)
                .with_for_update()
            )
            await conn.execute(
                update(naive_budgets)
                .where(naive_budgets.c.id == reservation.budget_id)
                .values(
                    reserved=naive_budgets.c.reserved - reservation.granted,
                    spent=naive_budgets.c.spent + charged,
                )
            )
            await conn.execute(
                update(naive_reservations)
                .where(naive_reservations.c.id == reservation_id)
                .values(state="COMMITTED", charged=charged)
            )
