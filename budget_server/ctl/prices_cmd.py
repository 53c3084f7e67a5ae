"""`budgetctl prices`: list, show, set, import and delete the model prices USD budgets use.

People read and type prices in dollars per million tokens (`$2.50`), which is exactly
what budgetd stores: nano-dollars per million tokens, 1 USD = 10^9. `--json` documents
carry budget.proto's ModelPrice with those integers:

    prices list     {"prices": [ModelPrice, ...], "more": bool}
    prices show     {"model": str, "priced_as": str, "price": ModelPrice}
                    priced_as is the row that prices the model: itself, its family
                    (a dated snapshot's undated name) or the default "*"
    prices set      {"price": ModelPrice}
    prices import   {"imported": int, "skipped": int}
    prices delete   {"deleted": str}

The parser's helpers come from parser.py, which imports this module to register the
command; only functions of each module are used across, so the import cycle is harmless.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import parser as cli
from budget_server.ctl import render
from budget_server.ctl.amounts import AmountError, format_usd, parse_usd
from budget_server.ctl.commands import Result
from budget_server.ctl.failures import CtlError, UsageError
from budget_server.ctl.rpc import Admin, collect
from budget_server.ctl.tables import Column, fields, table
from budget_server.ctl.times import format_time
from budget_server.pricing.litellm import IMPORT_BYTES_MAX

DEFAULT_MODEL = "*"  # budget_server.ledger.prices.DEFAULT_PRICE_MODEL, without SQLAlchemy


def _list(
    admin: Admin, prefix: str, *, wanted: int | None, page_size: int
) -> tuple[list[pb.ModelPrice], bool]:
    def page(token: str, size: int) -> tuple[Sequence[pb.ModelPrice], str]:
        request = pb.ListPricesRequest(prefix=prefix, page_size=size, page_token=token)
        response = admin.call(admin.stub.ListPrices, request)
        return response.prices, response.next_page_token

    return collect(page, wanted=wanted, page_size=page_size)


def _find(admin: Admin, model: str) -> pb.ModelPrice | None:
    """The row named exactly `model`, among the (few) rows whose names start with it."""
    rows, _ = _list(admin, model, wanted=None, page_size=cli.ROWS_DEFAULT)
    return next((row for row in rows if row.model == model), None)


# ------------------------------------------------------------------ rendering


def per_mtok(nanousd: int) -> str:
    """Nano-dollars per million tokens as dollars per million tokens, exact: `$2.50`."""
    return format_usd(nanousd)


PRICE_COLUMNS = (
    Column("model"),
    Column("input/1M", numeric=True),
    Column("cached/1M", numeric=True),
    Column("output/1M", numeric=True),
    Column("source"),
    Column("updated"),
)


def prices_table(prices: Sequence[pb.ModelPrice]) -> str:
    """Prices in dollars per million tokens; cached is the price of cache-read input."""
    rows = [
        [
            p.model,
            per_mtok(p.input_nanousd_per_mtok),
            per_mtok(p.cached_input_nanousd_per_mtok),
            per_mtok(p.output_nanousd_per_mtok),
            p.source,
            format_time(p.updated_at_us),
        ]
        for p in prices
    ]
    return table(PRICE_COLUMNS, rows)


def price_fields(price: pb.ModelPrice) -> str:
    def amount(nanousd: int) -> str:
        return f"{per_mtok(nanousd)} per 1M tokens ({nanousd:,} nano-USD)"

    return fields(
        [
            ("model", price.model),
            ("input", amount(price.input_nanousd_per_mtok)),
            ("cached input", amount(price.cached_input_nanousd_per_mtok)),
            ("output", amount(price.output_nanousd_per_mtok) + "; reasoning is output"),
            ("source", price.source),
            ("updated", format_time(price.updated_at_us)),
        ]
    )


# ------------------------------------------------------------------ commands


def prices_list(admin: Admin, args: argparse.Namespace) -> Result:
    page_size = int(args.page_size)
    prefix = str(args.prefix)
    prices, more = _list(admin, prefix, wanted=None if args.all else page_size, page_size=page_size)
    if prices:
        text = prices_table(prices)
    else:
        text = f"no prices for models starting {prefix!r}" if prefix else "no prices"
    if more:
        text += f"\n(first {len(prices)} prices shown; --all lists every one)"
    return Result({"prices": [render.message_json(p) for p in prices], "more": more}, text)


def prices_show(admin: Admin, args: argparse.Namespace) -> Result:
    model = str(args.model)
    if not model:
        raise UsageError("MODEL must not be empty")
    candidates = [model]
    price = _find(admin, model)
    if price is None:
        # Imported here: the resolution rule lives with the ledger, which needs SQLAlchemy,
        # and only this path needs it.
        from budget_server.ledger.prices import model_family

        family = model_family(model)
        candidates += [name for name in (family, DEFAULT_MODEL) if name not in candidates]
        for name in candidates[1:]:
            price = _find(admin, name)
            if price is not None:
                break
    if price is None:
        raise CtlError(
            f"no price for {model!r} (looked for {', '.join(map(repr, candidates))}); a USD "
            "budget refuses it. Set one with `budgetctl prices set`"
        )
    text = price_fields(price)
    if price.model != model:
        text = f"{model} has no price of its own; it is priced as {price.model}:\n{text}"
    doc = {"model": model, "priced_as": price.model, "price": render.message_json(price)}
    return Result(doc, text)


def _price_arg(option: str, text: str) -> int:
    try:
        return parse_usd(text)
    except AmountError as error:
        raise UsageError(f"{option}: {error}") from None


def prices_set(admin: Admin, args: argparse.Namespace) -> Result:
    input_price = _price_arg("--input", str(args.input))
    cached = input_price
    if args.cached_input is not None:
        cached = _price_arg("--cached-input", str(args.cached_input))
    price = pb.ModelPrice(
        model=str(args.model),
        input_nanousd_per_mtok=input_price,
        cached_input_nanousd_per_mtok=cached,
        output_nanousd_per_mtok=_price_arg("--output", str(args.output)),
    )
    stored = admin.call(admin.stub.SetPrice, pb.SetPriceRequest(price=price)).price
    return Result(
        {"price": render.message_json(stored)},
        f"set the price of {stored.model}\n{price_fields(stored)}",
    )


def prices_import(admin: Admin, args: argparse.Namespace) -> Result:
    path = Path(str(args.file))
    try:
        size = path.stat().st_size
        if size > IMPORT_BYTES_MAX:
            raise UsageError(
                f"{path} is {size:,} bytes; budgetd imports at most {IMPORT_BYTES_MAX:,}"
            )
        raw = path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    request = pb.ImportPricesRequest(litellm_json=raw, source=str(args.source or ""))
    response = admin.call(admin.stub.ImportPrices, request)
    text = (
        f"imported {response.imported:,} prices from {path}; skipped {response.skipped:,} "
        "entries (not chat models with per-token prices, or prices that are not exact)"
    )
    return Result(render.message_json(response), text)


def prices_delete(admin: Admin, args: argparse.Namespace) -> Result:
    model = str(args.model)
    admin.call(admin.stub.DeletePrice, pb.DeletePriceRequest(model=model))
    return Result({"deleted": model}, f"deleted the price of {model}")


# ------------------------------------------------------------------ command line


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`budgetctl prices ACTION ...`, registered by parser.build_parser."""
    prices = top.add_parser(
        "prices",
        help="list, show, set, import and delete model prices (USD budgets)",
        description="Model prices, in dollars per million tokens, that USD budgets are "
        "charged by: input, cached input and output (reasoning is output). A dated model "
        "(gpt-4o-2024-08-06) without a price of its own is priced as its family (gpt-4o), "
        "else as the default model '*', else a USD budget refuses it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = prices.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = cli._command(
        actions,
        "list",
        prices_list,
        summary="list prices",
        description="List prices in model order, in dollars per million tokens.",
        examples="""\
  budgetctl prices list --prefix gpt-4o
  budgetctl --json prices list --all | jq '.prices | length'
""",
    )
    listing.add_argument("--prefix", default="", help="only models starting with this")
    listing.add_argument(
        "--all",
        action="store_true",
        help=f"follow every page (default: the first {cli.ROWS_DEFAULT} prices)",
    )
    cli._page_size_option(listing, cli.ROWS_DEFAULT)

    show = cli._command(
        actions,
        "show",
        prices_show,
        summary="show the price a model is charged at",
        description="Show the price a model is charged at: its own, its family's, or the "
        "default '*'.",
        examples="  budgetctl prices show gpt-4o-2024-08-06\n",
    )
    show.add_argument("model", metavar="MODEL")

    setting = cli._command(
        actions,
        "set",
        prices_set,
        summary="set a model's price",
        description="Create or replace a model's price, in dollars per million tokens, "
        "exact to the nano-dollar. The model '*' is the default price for models the table "
        "does not know.",
        examples="""\
  budgetctl prices set gpt-4o --input '$2.50' --cached-input '$1.25' --output '$10'
  budgetctl prices set '*' --input 5 --output 15
""",
    )
    setting.add_argument("model", metavar="MODEL")
    setting.add_argument("--input", required=True, metavar="USD", help="per 1M input tokens")
    setting.add_argument(
        "--cached-input",
        metavar="USD",
        help="per 1M cache-read input tokens (default: the input price)",
    )
    setting.add_argument(
        "--output", required=True, metavar="USD", help="per 1M output tokens, reasoning included"
    )

    importing = cli._command(
        actions,
        "import",
        prices_import,
        summary="import prices from a LiteLLM price file",
        description="Create or replace the price of every chat model in a LiteLLM "
        "model_prices_and_context_window.json (or budgetd's own pricing/prices.json). "
        "Other entries are skipped, and so are prices that are not exact in nano-dollars.",
        examples="""\
  budgetctl prices import model_prices_and_context_window.json --source 'litellm 1.80.0'
""",
    )
    importing.add_argument("file", metavar="FILE")
    importing.add_argument(
        "--source",
        metavar="TEXT",
        help="recorded with each price (default: the file's own, else 'import (DATE)')",
    )

    deleting = cli._command(
        actions,
        "delete",
        prices_delete,
        summary="delete a model's price",
        description="Delete a model's price; its dated names then fall back to the family, "
        "then to '*'.",
        examples="  budgetctl prices delete my-finetune\n",
    )
    deleting.add_argument("model", metavar="MODEL")
