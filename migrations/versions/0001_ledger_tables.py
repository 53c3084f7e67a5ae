"""ledger tables

Revision ID: 0001
Revises:
Create Date: 2026-12-01 05:39:42.821499
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("parent_id", sa.String(length=128), nullable=True),
        sa.Column("depth", sa.SmallInteger(), nullable=False),
        sa.Column("unit", sa.String(length=8), nullable=False),
        sa.Column("limit_amount", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("time_zone", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=4), nullable=False),
        sa.Column("alert_thresholds", sa.String(length=64), nullable=False),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("overage", sa.BigInteger(), nullable=False),
        sa.Column("window_start_us", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["budgets.id"], name=op.f("fk_budgets_parent_id_budgets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budgets")),
    )
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budgets_parent_id"), ["parent_id"], unique=False)

    op.create_table(
        "prices",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("input_nanousd_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_nanousd_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("output_nanousd_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=256), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_prices")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("budget_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("spent_delta", sa.BigInteger(), nullable=False),
        sa.Column("reserved_delta", sa.BigInteger(), nullable=False),
        sa.Column("overage_delta", sa.BigInteger(), nullable=False),
        sa.Column("reservation_id", sa.String(length=40), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["budgets.id"], name=op.f("fk_ledger_entries_budget_id_budgets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_budget_id_id"), ["budget_id", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_created_at_us"), ["created_at_us"], unique=False
        )

    op.create_table(
        "reservations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("budget_id", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("grant_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("grant_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("charged", sa.BigInteger(), nullable=False),
        sa.Column("overage", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_us", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("finished_at_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["budgets.id"], name=op.f("fk_reservations_budget_id_budgets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
        sa.UniqueConstraint(
            "budget_id", "idempotency_key", name=op.f("uq_reservations_budget_id_idempotency_key")
        ),
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_reservations_budget_id_state"), ["budget_id", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_reservations_state_expires_at_us"),
            ["state", "expires_at_us"],
            unique=False,
        )

    op.create_table(
        "reservation_holds",
        sa.Column("reservation_id", sa.String(length=40), nullable=False),
        sa.Column("budget_id", sa.String(length=128), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("charged", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["budgets.id"], name=op.f("fk_reservation_holds_budget_id_budgets")
        ),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["reservations.id"],
            name=op.f("fk_reservation_holds_reservation_id_reservations"),
        ),
        sa.PrimaryKeyConstraint("reservation_id", "budget_id", name=op.f("pk_reservation_holds")),
    )
    with op.batch_alter_table("reservation_holds", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_reservation_holds_budget_id"), ["budget_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("reservation_holds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservation_holds_budget_id"))

    op.drop_table("reservation_holds")
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_state_expires_at_us"))
        batch_op.drop_index(batch_op.f("ix_reservations_budget_id_state"))

    op.drop_table("reservations")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_created_at_us"))
        batch_op.drop_index(batch_op.f("ix_ledger_entries_budget_id_id"))

    op.drop_table("ledger_entries")
    op.drop_table("prices")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budgets_parent_id"))

    op.drop_table("budgets")
