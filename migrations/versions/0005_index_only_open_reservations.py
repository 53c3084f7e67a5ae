"""index only open reservations by state; leave room in holds' pages for their update

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PENDING = sa.text("state = 'PENDING'")


def upgrade() -> None:
    op.drop_index("ix_reservations_state_expires_at_us", table_name="reservations")
    op.drop_index("ix_reservations_budget_id_state", table_name="reservations")
    op.create_index(
        "ix_reservations_pending_expires_at_us",
        "reservations",
        ["expires_at_us"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )
    op.create_index(
        "ix_reservations_pending_budget_id",
        "reservations",
        ["budget_id"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE reservation_holds SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE reservation_holds RESET (fillfactor)")
    op.drop_index("ix_reservations_pending_budget_id", table_name="reservations")
    op.drop_index("ix_reservations_pending_expires_at_us", table_name="reservations")
    op.create_index(
        "ix_reservations_budget_id_state", "reservations", ["budget_id", "state"], unique=False
    )
    op.create_index(
        "ix_reservations_state_expires_at_us",
        "reservations",
        ["state", "expires_at_us"],
        unique=False,
    )
