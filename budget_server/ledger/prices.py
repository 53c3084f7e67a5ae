"""Model prices, read from the database so every server process charges the same."""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from budget_server.db.schema import prices
from budget_server.ledger.usage import Price

# "gpt-4o-2024-08-06" -> "gpt-4o", "claude-3-5-sonnet-20241022" -> "claude-3-5-sonnet"
_DATED_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
DEFAULT_PRICE_MODEL = "*"  # a row with this name prices models the table does not know


def model_family(model: str) -> str:
    """The undated name a dated model snapshot is priced as."""
    return _DATED_SUFFIX.sub("", model)


def _candidates(model: str) -> list[str]:
    names = [model]
    if (family := model_family(model)) != model:
        names.append(family)
    names.append(DEFAULT_PRICE_MODEL)
    return names


async def load_prices(conn: AsyncConnection, models: Iterable[str]) -> dict[str, Price]:
    """Prices for each model, resolved exact name first, then family, then the default."""
    wanted = {m: _candidates(m) for m in set(models)}
    names = {n for cands in wanted.values() for n in cands}
    if not names:
        return {}
    rows = (await conn.execute(select(prices).where(prices.c.model.in_(names)))).all()
    by_name = {
        row.model: Price(
            model=row.model,
            input_nanousd_per_mtok=row.input_nanousd_per_mtok,
            cached_input_nanousd_per_mtok=row.cached_input_nanousd_per_mtok,
            output_nanousd_per_mtok=row.output_nanousd_per_mtok,
        )
        for row in rows
    }
    resolved: dict[str, Price] = {}
    for model, cands in wanted.items():
        for name in cands:
            if name in by_name:
                resolved[model] = by_name[name]
                break
    return resolved
