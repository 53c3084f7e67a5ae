"""LiteLLM's price file to budgetd's price table, exactly, and the table budgetd ships.

LiteLLM's `model_prices_and_context_window.json` maps a model name to USD per token as
JSON floats (`"input_cost_per_token": 1.5e-07`). budgetd stores integers: nano-dollars per
million tokens, which is USD per token times 10^15. A float's `repr` is the shortest text
that reads back as the same float, which is the text LiteLLM's maintainers wrote, so
`Decimal(repr(value)) * 10**15` recovers the price they meant (1.5e-07 -> 150,000,000)
rather than the binary float's expansion (1.4999999999999999e-07...). A value that is still
not a whole number after that (float noise such as 2.9999900000000002e-06 in the file's
text) is refused and reported, never rounded: a price table must be exact or say it is not.

What is taken from an entry: chat-like models (`mode` chat, completion or responses) with
both `input_cost_per_token` and `output_cost_per_token`; `cache_read_input_token_cost`
when present, else cached input is priced as input (the provider gives no discount).
Model names are kept as LiteLLM spells them: bare (`gpt-4o`) and provider-prefixed
(`azure/gpt-4o`) alike. Bare names are not derived from prefixed ones: different
providers charge different prices for the same bare name.

This module does not import SQLAlchemy: budgetctl and scripts/update_prices.py use it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Context, Decimal, Inexact, Rounded
from importlib import resources
from typing import Any, Final

from budget_server.ledger.usage import Price
from budget_server.limits import AMOUNT_MAX, MODEL_LENGTH_MAX

MODES: Final = frozenset({"chat", "completion", "responses"})
IMPORT_BYTES_MAX: Final = 8 * 1024 * 1024
"""ImportPrices refuses larger files; LiteLLM's whole file is about 3.5 MB."""
SOURCE_LENGTH_MAX: Final = 256
"""The `prices.source` column's width."""
USD_PER_TOKEN_TO_NANOUSD_PER_MTOK: Final = 10**15
SHIPPED_FORMAT: Final = "budgetd-prices/1"
SHIPPED_FILE: Final = "prices.json"
COLUMNS: Final = ("input", "cached_input", "output")

INPUT_FIELD: Final = "input_cost_per_token"
CACHED_INPUT_FIELD: Final = "cache_read_input_token_cost"
OUTPUT_FIELD: Final = "output_cost_per_token"

# Precision far above a float repr's 17 digits plus the scale; any rounding is an error.
_EXACT = Context(prec=100, traps=[Inexact, Rounded])


class PriceFileError(ValueError):
    """A price file that cannot be read at all; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Conversion:
    """What a price file yielded."""

    prices: tuple[Price, ...]
    """Exact prices, sorted by model."""
    skipped: int
    """Entries that are not chat models with per-token input and output prices."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Chat models whose prices cannot be stored exactly or are invalid: model -> why."""
    source: str = ""
    """The source a budgetd prices.json names; LiteLLM's own files name none."""


@dataclass(frozen=True, slots=True)
class ShippedTable:
    """prices.json as budgetd ships it."""

    source: str
    """Recorded with every seeded row, e.g. "litellm 1.110.2 (2026-12-01)"."""
    prices: tuple[Price, ...]


def check_model(model: str) -> str | None:
    """Why `model` cannot be a price's name, or None when it can."""
    if not model:
        return "the model name is empty"
    if len(model) > MODEL_LENGTH_MAX:
        return f"the model name is {len(model)} characters; the maximum is {MODEL_LENGTH_MAX}"
    if any(char.isspace() or not char.isprintable() for char in model):
        return "the model name contains spaces or control characters"
    return None


def nanousd_per_mtok(value: object) -> int:
    """USD per token, as LiteLLM writes it, to nano-dollars per million tokens, exactly.

    Raises ValueError, naming the value, when it is not an exact non-negative amount.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    scaled = _EXACT.multiply(Decimal(repr(value)), Decimal(USD_PER_TOKEN_TO_NANOUSD_PER_MTOK))
    if scaled < 0:
        raise ValueError(f"{value!r} is negative")
    if scaled != scaled.to_integral_value():
        raise ValueError(
            f"{value!r} USD per token is {scaled.normalize():f} nano-dollars per million "
            "tokens, not a whole number"
        )
    if scaled > AMOUNT_MAX:
        raise ValueError(f"{value!r} USD per token is above the largest storable price")
    return int(scaled)


def _entry_price(model: str, entry: Mapping[str, Any]) -> Price:
    """One chat model's price; ValueError says why it cannot be stored."""
    problem = check_model(model)
    if problem is not None:
        raise ValueError(problem)
    amounts = {}
    for name in (INPUT_FIELD, CACHED_INPUT_FIELD, OUTPUT_FIELD):
        if entry.get(name) is None:
            continue
        try:
            amounts[name] = nanousd_per_mtok(entry[name])
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return Price(
        model=model,
        input_nanousd_per_mtok=amounts[INPUT_FIELD],
        cached_input_nanousd_per_mtok=amounts.get(CACHED_INPUT_FIELD, amounts[INPUT_FIELD]),
        output_nanousd_per_mtok=amounts[OUTPUT_FIELD],
    )


def _is_chat_priced(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("mode") in MODES
        and entry.get(INPUT_FIELD) is not None
        and entry.get(OUTPUT_FIELD) is not None
    )


def convert(data: object) -> Conversion:
    """LiteLLM's parsed price file (a JSON object of model -> entry) to exact prices."""
    if not isinstance(data, dict):
        raise PriceFileError(
            f"a LiteLLM price file is a JSON object of model names to entries, not a "
            f"JSON {type(data).__name__}"
        )
    prices: list[Price] = []
    refused: dict[str, str] = {}
    skipped = 0
    for model, entry in data.items():
        if not _is_chat_priced(entry):
            skipped += 1  # embeddings, images, audio, LiteLLM's `sample_spec`, ...
            continue
        try:
            prices.append(_entry_price(model, entry))
        except ValueError as error:
            refused[model] = str(error)
    prices.sort(key=lambda price: price.model)
    return Conversion(tuple(prices), skipped, refused)


def parse(raw: bytes) -> Conversion:
    """A price file's bytes: LiteLLM's format, or prices.json as budgetd ships it."""
    if not raw.strip():
        raise PriceFileError("the price file is empty")
    if len(raw) > IMPORT_BYTES_MAX:
        raise PriceFileError(
            f"the price file is {len(raw):,} bytes; the maximum is {IMPORT_BYTES_MAX:,}"
        )
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as error:
        raise PriceFileError(f"the price file is not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        raise PriceFileError(
            f"the price file is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}"
        ) from None
    except RecursionError:
        raise PriceFileError("the price file nests its JSON too deeply") from None
    except ValueError as error:  # a number over Python's digit limit for int()
        raise PriceFileError(f"the price file holds a number too long to read: {error}") from None
    if isinstance(data, dict) and data.get("format") == SHIPPED_FORMAT:
        table = _shipped_from(data)
        return Conversion(table.prices, 0, source=table.source)
    return convert(data)


def _refuse_constant(name: str) -> float:
    # json accepts NaN and Infinity, which are not JSON and not prices.
    raise PriceFileError(f"the price file is not valid JSON: it contains {name}")


# ------------------------------------------------------------------ the shipped table


def dump_shipped(conversion: Conversion, header: Mapping[str, object]) -> str:
    """prices.json's text: the header, then one line per model so updates diff by line."""
    lines = ["{"]
    for key, value in {
        "format": SHIPPED_FORMAT,
        **header,
        "unit": "nano-dollars per million tokens (USD per token x 10^15)",
        "columns": list(COLUMNS),
        "models": len(conversion.prices),
        "skipped": conversion.skipped,
    }.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    refused = [
        f"    {json.dumps(model)}: {json.dumps(why, ensure_ascii=False)}"
        for model, why in sorted(conversion.refused.items())
    ]
    lines.append('  "refused": {' + ("\n" + ",\n".join(refused) + "\n  }," if refused else "},"))
    lines.append('  "prices": {')
    rows = [
        f"    {json.dumps(p.model)}: "
        f"[{p.input_nanousd_per_mtok}, {p.cached_input_nanousd_per_mtok}, "
        f"{p.output_nanousd_per_mtok}]"
        for p in conversion.prices
    ]
    lines.append(",\n".join(rows))
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _shipped_from(data: Mapping[str, Any]) -> ShippedTable:
    source = data.get("source")
    table = data.get("prices")
    if not isinstance(source, str) or not isinstance(table, dict):
        raise PriceFileError(f"a {SHIPPED_FORMAT} file needs a `source` text and a `prices` map")
    prices = []
    for model, row in table.items():
        if (
            check_model(model) is not None
            or not isinstance(row, list)
            or len(row) != len(COLUMNS)
            or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= AMOUNT_MAX for v in row
            )
        ):
            raise PriceFileError(f"{model!r} in the {SHIPPED_FORMAT} file is not a valid price")
        prices.append(Price(model, row[0], row[1], row[2]))
    return ShippedTable(source[:SOURCE_LENGTH_MAX], tuple(sorted(prices, key=lambda p: p.model)))


@functools.cache  # immutable, and read by every server start on an empty database
def shipped_table() -> ShippedTable:
    """budget_server/pricing/prices.json, generated by scripts/update_prices.py."""
    text = (
        resources.files("budget_server.pricing").joinpath(SHIPPED_FILE).read_text(encoding="utf-8")
    )
    return _shipped_from(json.loads(text))
