"""The ledger's tables (SQLAlchemy Core: the hot path issues few, explicit statements).

Times are integer microseconds since the epoch, so SQLite and PostgreSQL store and
compare them identically. Amounts are BIGINT in the budget's unit.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)

from budget_server.limits import ID_LENGTH_MAX, IDEMPOTENCY_KEY_LENGTH_MAX, MODEL_LENGTH_MAX

# Constraint names are fixed so Alembic migrations can refer to them on both backends.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for a ledger.
_BIGINT_PK = BigInteger().with_variant(Integer(), "sqlite")

budgets = Table(
    "budgets",
    metadata,
    Column("id", String(ID_LENGTH_MAX), primary_key=True),
    Column("parent_id", String(ID_LENGTH_MAX), ForeignKey("budgets.id"), nullable=True),
    Column("depth", SmallInteger, nullable=False),  # 0 for a root; rows lock root-first
    Column("unit", String(8), nullable=False),
    Column("limit_amount", BigInteger, nullable=False),
    Column("period", String(8), nullable=False),
    Column("time_zone", String(64), nullable=False),
    Column("mode", String(4), nullable=False),
    Column("alert_thresholds", String(64), nullable=False),  # "50,70,90,100"
    Column("frozen", Boolean, nullable=False),
    Column("spent", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("overage", BigInteger, nullable=False),
    Column("window_start_us", BigInteger, nullable=False),  # 0 for PERIOD NONE
    # The highest alert threshold already fired in this window: an alert fires once per
    # window, decided under the same row lock as the charge that crossed it.
    Column("alerted_pct", SmallInteger, nullable=False, server_default="0"),
    # Deleted budgets keep their rows: the ledger is append-only and its entries refer to them.
    Column("deleted_at_us", BigInteger, nullable=False, server_default="0"),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    Index(None, "parent_id"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("budget_id", String(ID_LENGTH_MAX), ForeignKey("budgets.id"), nullable=False),
    Column("state", String(10), nullable=False),
    Column("idempotency_key", String(IDEMPOTENCY_KEY_LENGTH_MAX), nullable=True),
    Column("model", String(MODEL_LENGTH_MAX), nullable=False),
    Column("labels", Text, nullable=False),  # JSON object
    # Last usage the server knows of: what an expired reservation is charged at.
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    # The token shape a meter stream's hold was priced from (0 for plain reservations), so
    # a stream resumed on another process knows how far its grant reaches.
    Column("grant_input_tokens", BigInteger, nullable=False),
    Column("grant_output_tokens", BigInteger, nullable=False),
    Column("charged", BigInteger, nullable=False),  # on its own budget, once finished
    Column("overage", BigInteger, nullable=False),
    Column("expires_at_us", BigInteger, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("finished_at_us", BigInteger, nullable=False),  # 0 while PENDING
    UniqueConstraint("budget_id", "idempotency_key"),
)

# Only open reservations are looked up by state (the sweeper's due ones, a budget's open
# holds), so only they are indexed by it. Indexes on (state, expires_at_us) and (budget_id,
# state) took a new entry in each for every finished reservation and grew with the whole
# history; these hold the few hundred open ones. Queries compare the state with this
# literal, not a bound parameter: a generic PostgreSQL plan (what a prepared statement
# settles on) cannot match a partial index against a parameter, and reads every row.
PENDING = reservations.c.state == literal_column("'PENDING'")
Index(
    "ix_reservations_pending_expires_at_us",
    reservations.c.expires_at_us,
    sqlite_where=PENDING,
    postgresql_where=PENDING,
)
Index(
    "ix_reservations_pending_budget_id",
    reservations.c.budget_id,
    sqlite_where=PENDING,
    postgresql_where=PENDING,
)

# What a reservation holds on each budget of its chain, in that budget's unit. The sum of
# the holds of PENDING reservations on a budget is that budget's `reserved`.
reservation_holds = Table(
    "reservation_holds",
    metadata,
    Column("reservation_id", String(40), ForeignKey("reservations.id"), primary_key=True),
    Column("budget_id", String(ID_LENGTH_MAX), ForeignKey("budgets.id"), primary_key=True),
    Column("held", BigInteger, nullable=False),
    Column("charged", BigInteger, nullable=False),
    Index(None, "budget_id"),
    # Every hold is rewritten when its reservation finishes (and when a meter grant grows),
    # moments after it was inserted. Pages left half empty keep the new version on the
    # same page, so PostgreSQL updates it in place (HOT) instead of adding a tuple and an
    # index entry and leaving the old one to vacuum.
    postgresql_with={"fillfactor": 50},
)

# Append-only. Each row carries its effect on the budget's running figures, so that
# summing the deltas recomputes them (VerifyLedger).
ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", _BIGINT_PK, primary_key=True, autoincrement=True),
    Column("budget_id", String(ID_LENGTH_MAX), ForeignKey("budgets.id"), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("spent_delta", BigInteger, nullable=False),
    Column("reserved_delta", BigInteger, nullable=False),
    Column("overage_delta", BigInteger, nullable=False),
    Column("reservation_id", String(40), nullable=True),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("model", String(MODEL_LENGTH_MAX), nullable=False),
    Column("labels", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("actor", String(32), nullable=False),
    Index(None, "budget_id", "id"),
    Index(None, "created_at_us"),
    Index(None, "reservation_id"),
)

# Per-token prices in nano-dollars per million tokens, so that sub-nano-dollar per-token
# prices (e.g. $0.075 per million) stay exact integers; a cost is rounded up once.
prices = Table(
    "prices",
    metadata,
    Column("model", String(MODEL_LENGTH_MAX), primary_key=True),
    Column("input_nanousd_per_mtok", BigInteger, nullable=False),
    Column("cached_input_nanousd_per_mtok", BigInteger, nullable=False),
    Column("output_nanousd_per_mtok", BigInteger, nullable=False),
    Column("source", String(256), nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

# Every alert that fired; the unique constraint is the last word on "once per window".
alerts = Table(
    "alerts",
    metadata,
    Column("event_id", String(40), primary_key=True),
    Column("budget_id", String(ID_LENGTH_MAX), ForeignKey("budgets.id"), nullable=False),
    Column("window_start_us", BigInteger, nullable=False),
    Column("threshold_pct", SmallInteger, nullable=False),
    Column("spent", BigInteger, nullable=False),
    Column("limit_amount", BigInteger, nullable=False),
    Column("fired_at_us", BigInteger, nullable=False),
    UniqueConstraint("budget_id", "window_start_us", "threshold_pct"),
)

webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("url", String(2048), nullable=False),
    Column("secret", String(256), nullable=False),  # HMAC key; needed in clear to sign
    Column("budget_prefix", String(ID_LENGTH_MAX), nullable=False),
    Column("kinds", String(512), nullable=False),  # comma-separated BudgetEventKind names
    Column("created_at_us", BigInteger, nullable=False),
)

# The durable outbox: a webhook event is written in the same transaction as what caused it,
# and delivered (with retries) from here, so a restart loses nothing and a retry sends the
# same event id again instead of a second event.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", _BIGINT_PK, primary_key=True, autoincrement=True),
    Column("webhook_id", String(40), nullable=False),
    Column("event_id", String(40), nullable=False),
    Column("payload", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_us", BigInteger, nullable=False),
    Column("delivered_at_us", BigInteger, nullable=False),  # 0 until delivered
    Column("failed", Boolean, nullable=False),  # gave up after the last attempt
    Column("last_error", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    UniqueConstraint("webhook_id", "event_id"),
    Index(None, "delivered_at_us", "failed", "next_attempt_us"),
)

# API keys: only a hash of the secret is stored; the id is the public part of the key.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("scopes", Text, nullable=False),  # JSON list
    Column("created_at_us", BigInteger, nullable=False),
    Column("revoked_at_us", BigInteger, nullable=False),  # 0 while valid
)
