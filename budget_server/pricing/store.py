"""The `prices` table: seeded from the shipped table, changed by AdminService.

The ledger reads prices from this table in each charging transaction
(budget_server/ledger/prices.py), so a change reaches every replica at its next charge.
Writes are upserts (INSERT ... ON CONFLICT), which SQLite and PostgreSQL both spell the
same way through their SQLAlchemy dialects; seeding inserts with DO NOTHING so that
replicas starting together on one empty PostgreSQL cannot collide.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from budget_server.db.engine import Database
from budget_server.db.schema import prices
from budget_server.errors import InvalidArgument, NotFound
from budget_server.ledger.admin import page_size
from budget_server.ledger.usage import Price
from budget_server.limits import AMOUNT_MAX
from budget_server.pricing.litellm import (
    SOURCE_LENGTH_MAX,
    PriceFileError,
    check_model,
    parse,
    shipped_table,
)

MANUAL_SOURCE: Final = "manual"

_AMOUNT_FIELDS: Final = (
    "input_nanousd_per_mtok",
    "cached_input_nanousd_per_mtok",
    "output_nanousd_per_mtok",
)


@dataclass(frozen=True, slots=True)
class StoredPrice:
    """A row of the prices table."""

    price: Price
    source: str
    """Where the price came from: the shipped table's LiteLLM version, "manual", ..."""
    updated_at_us: int


def check_price(price: Price) -> Price:
    """INVALID_ARGUMENT for a name or amount the table cannot hold."""
    problem = check_model(price.model)
    if problem is not None:
        raise InvalidArgument(f"model {price.model[:80]!r}: {problem}")
    for name in _AMOUNT_FIELDS:
        value = getattr(price, name)
        if not 0 <= value <= AMOUNT_MAX:
            raise InvalidArgument(
                f"{name} must be between 0 and {AMOUNT_MAX} (AMOUNT_MAX); got {value}"
            )
    return price


def _check_source(source: str) -> str:
    if len(source) > SOURCE_LENGTH_MAX:
        raise InvalidArgument(
            f"source is {len(source)} characters; the maximum is {SOURCE_LENGTH_MAX}"
        )
    return source


def _row(price: Price, source: str, now_us: int) -> dict[str, Any]:
    return {
        "model": price.model,
        "input_nanousd_per_mtok": price.input_nanousd_per_mtok,
        "cached_input_nanousd_per_mtok": price.cached_input_nanousd_per_mtok,
        "output_nanousd_per_mtok": price.output_nanousd_per_mtok,
        "source": source,
        "updated_at_us": now_us,
    }


def _stored(row: Any) -> StoredPrice:
    return StoredPrice(
        Price(
            model=row.model,
            input_nanousd_per_mtok=row.input_nanousd_per_mtok,
            cached_input_nanousd_per_mtok=row.cached_input_nanousd_per_mtok,
            output_nanousd_per_mtok=row.output_nanousd_per_mtok,
        ),
        row.source,
        row.updated_at_us,
    )


def _insert(db: Database) -> postgresql.Insert | sqlite.Insert:
    return sqlite.insert(prices) if db.is_sqlite else postgresql.insert(prices)


async def _write(db: Database, rows: Sequence[dict[str, Any]], *, replace: bool) -> None:
    """Insert rows, replacing (or, with replace=False, keeping) existing ones, in one txn."""
    statement = _insert(db)
    if replace:
        excluded = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[prices.c.model],
            set_={name: excluded[name] for name in (*_AMOUNT_FIELDS, "source", "updated_at_us")},
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[prices.c.model])
    async with db.write() as conn:
        # One statement compiled once and run over every row (the driver's executemany).
        await conn.execute(statement, list(rows))


async def seed_prices(db: Database, now_us: int) -> int:
    """Load the shipped table into an empty prices table; return the rows added.

    Only an empty table is seeded, so an operator's prices and deletions survive restarts
    and upgrades; `budgetctl prices import budget_server/pricing/prices.json` brings a
    newer shipped table in on purpose.
    """
    async with db.read() as conn:
        if (await conn.execute(select(prices.c.model).limit(1))).first() is not None:
            return 0
    table = shipped_table()
    await _write(db, [_row(p, table.source, now_us) for p in table.prices], replace=False)
    return len(table.prices)


async def set_price(db: Database, price: Price, now_us: int) -> StoredPrice:
    """Create or replace one model's price, recorded as set by hand."""
    await _write(db, [_row(check_price(price), MANUAL_SOURCE, now_us)], replace=True)
    return StoredPrice(price, MANUAL_SOURCE, now_us)


def default_import_source(now_us: int) -> str:
    day = dt.datetime.fromtimestamp(now_us / 1_000_000, dt.UTC).date().isoformat()
    return f"import ({day})"


class Imported(NamedTuple):
    imported: int
    skipped: int
    source: str  # as recorded with each price: given, the file's own, or "import (date)"


async def import_prices(db: Database, raw: bytes, source: str, now_us: int) -> Imported:
    """Upsert every price in a LiteLLM-format file; return what was imported and skipped.

    Skipped counts entries that are not chat models with per-token prices and those whose
    prices are not exact (see budget_server.pricing.litellm).
    """
    _check_source(source)
    try:
        conversion = parse(raw)
    except PriceFileError as error:
        raise InvalidArgument(f"litellm_json: {error}") from None
    source = source or conversion.source or default_import_source(now_us)
    rows = [_row(p, source, now_us) for p in conversion.prices]
    if rows:
        await _write(db, rows, replace=True)
    return Imported(len(rows), conversion.skipped + len(conversion.refused), source)


def _encode_token(model: str) -> str:
    return base64.urlsafe_b64encode(model.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        model = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token is not one this server issued") from exc
    if not model:
        raise InvalidArgument("page_token is not one this server issued")
    return model


async def list_prices(
    db: Database, prefix: str, size: int, token: str
) -> tuple[list[StoredPrice], str]:
    """A page of prices in model order; the token is the last model of the page."""
    size = page_size(size)
    query = select(prices).order_by(prices.c.model).limit(size + 1)
    if prefix:
        query = query.where(prices.c.model.startswith(prefix, autoescape=True))
    if token:
        query = query.where(prices.c.model > _decode_token(token))
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    page = [_stored(row) for row in rows[:size]]
    return page, _encode_token(page[-1].price.model) if len(rows) > size else ""


async def delete_price(db: Database, model: str) -> None:
    """Forget a model's price: its dated names fall back to the family, then to `*`."""
    problem = check_model(model)
    if problem is not None:
        raise InvalidArgument(f"model {model[:80]!r}: {problem}")
    async with db.write() as conn:
        result = await conn.execute(delete(prices).where(prices.c.model == model))
        if result.rowcount == 0:
            raise NotFound(f"no price is set for model {model!r}")
