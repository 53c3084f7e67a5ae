"""Model prices, read from the database so every server process charges the same."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from budget_server.ledger.usage import Price

# "gpt-4o-2024-08-06" -> "gpt-4o", "claude-3-5-sonnet-20241022" -> "claude-3-5-sonnet"
_DATED_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
DEFAULT_PRICE_MODEL = "*"  # a row with this name prices models the table does not know


def model_family(model: str) -> str:
    """The undated name a dated model snapshot is priced as."""
    return _DATED_SUFFIX.sub("", model)


def price_candidates(models: Iterable[str]) -> dict[str, list[str]]:
    """For each model, the price rows that may price it, best first: its exact name, its
    family, then the default."""
    wanted: dict[str, list[str]] = {}
    for model in set(models):
        names = [model]
        if (family := model_family(model)) != model:
            names.append(family)
        names.append(DEFAULT_PRICE_MODEL)
        wanted[model] = names
    return wanted


def resolve_prices(wanted: dict[str, list[str]], rows: Iterable[Any]) -> dict[str, Price]:
    """The price of each model from the rows read for `price_candidates(...)`; a model none
    of whose candidates has a row is left out (the caller refuses it)."""
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
    for model, names in wanted.items():
        found = next((by_name[name] for name in names if name in by_name), None)
        if found is not None:
            resolved[model] = found
    return resolved
