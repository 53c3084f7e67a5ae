"""`budgetctl report`: what was charged, and for which tokens, per day (or budget, model, label).

Each row is one group in one unit (tokens, or dollars for USD budgets). Grouped by budget,
every budget of a hierarchy shows its own charges; grouped otherwise, a call is counted
once (on the deepest budget the prefix selects), so the totals printed under the table add
up. `--json` carries budget.proto's UsageReportRow:

    report   {"budget_prefix": str, "since_us": int, "until_us": int,
              "group_by": [str, ...], "label_key": str, "rows": [UsageReportRow, ...]}

The parser's helpers come from parser.py, which imports this module to register the
command; only functions of each module are used across, so the import cycle is harmless.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import parser as cli
from budget_server.ctl import render
from budget_server.ctl.amounts import format_amount
from budget_server.ctl.commands import Result
from budget_server.ctl.failures import UsageError
from budget_server.ctl.rpc import Admin
from budget_server.ctl.tables import Column, table
from budget_server.ctl.times import format_time

GROUPS = {
    "budget": pb.REPORT_GROUP_BUDGET,
    "model": pb.REPORT_GROUP_MODEL,
    "label": pb.REPORT_GROUP_LABEL,
    "day": pb.REPORT_GROUP_DAY,
}
BY_DEFAULT = "day"


@dataclass(frozen=True, slots=True)
class Grouping:
    """What --by asked for."""

    groups: tuple[str, ...]
    label_key: str = ""


def by_arg(text: str) -> Grouping:
    """`budget,model,label:team,day` -> the groups in that order, and the label's key."""
    groups: list[str] = []
    label_key = ""
    for part in text.split(","):
        name, colon, key = part.strip().partition(":")
        name = name.lower()
        if name not in GROUPS or (name == "label") != bool(colon):
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r}: group by budget, model, day or label:KEY, separated by "
                "commas, e.g. budget,day or label:team"
            )
        if name == "label":
            if not key or (label_key and key != label_key):
                raise argparse.ArgumentTypeError(
                    f"{part.strip()!r}: give one label key, e.g. label:team"
                )
            label_key = key
        if name not in groups:
            groups.append(name)
    return Grouping(tuple(groups), label_key)


def _column_title(group: str, label_key: str) -> str:
    return f"label:{label_key}" if group == "label" else group


def _cell(row: pb.UsageReportRow, group: str) -> str:
    value = {
        "budget": row.budget_id,
        "model": row.model,
        "label": row.label_value,
        "day": row.day,
    }[group]
    return value or "-"


def report_table(rows: Sequence[pb.UsageReportRow], grouping: Grouping) -> str:
    """A row per group; under it, when each call counts once, the totals per unit."""
    columns = [Column(_column_title(g, grouping.label_key)) for g in grouping.groups]
    columns += [
        Column("charged", numeric=True),
        Column("overage", numeric=True),
        Column("calls", numeric=True),
        Column("input", numeric=True),
        Column("cached", numeric=True),
        Column("output", numeric=True),
        Column("reasoning", numeric=True),
    ]

    def figures(row: pb.UsageReportRow) -> list[str]:
        return [
            format_amount(row.charged, row.unit),
            format_amount(row.overage, row.unit),
            f"{row.calls:,}",
            f"{row.usage.input_tokens:,}",
            f"{row.usage.cached_input_tokens:,}",
            f"{row.usage.output_tokens:,}",
            f"{row.usage.reasoning_tokens:,}",
        ]

    cells = [[_cell(row, g) for g in grouping.groups] + figures(row) for row in rows]
    if "budget" not in grouping.groups and rows:
        # Without budgets in the rows, a call is counted once, so the sums mean something.
        totals: dict[int, pb.UsageReportRow] = {}
        for row in rows:
            total = totals.setdefault(row.unit, pb.UsageReportRow(unit=row.unit))
            total.charged += row.charged
            total.overage += row.overage
            total.calls += row.calls
            total.usage.input_tokens += row.usage.input_tokens
            total.usage.cached_input_tokens += row.usage.cached_input_tokens
            total.usage.output_tokens += row.usage.output_tokens
            total.usage.reasoning_tokens += row.usage.reasoning_tokens
        for unit in sorted(totals):
            label = ["total"] + [""] * (len(grouping.groups) - 1)
            cells.append(label + figures(totals[unit]))
    return table(columns, cells)


def report(admin: Admin, args: argparse.Namespace) -> Result:
    since_us = int(args.since or 0)
    until_us = int(args.until or 0)
    if since_us and until_us and since_us >= until_us:
        raise UsageError("--since must be before --until")
    grouping: Grouping = args.by or by_arg(BY_DEFAULT)
    request = pb.UsageReportRequest(
        budget_prefix=str(args.prefix),
        since_us=since_us,
        until_us=until_us,
        group_by=[GROUPS[g] for g in grouping.groups],
        label_key=grouping.label_key,
    )
    rows = list(admin.call(admin.stub.UsageReport, request).rows)
    span = f"{format_time(since_us) if since_us else 'the beginning'} .. "
    span += format_time(until_us) if until_us else "now"
    scope = f"budgets starting {args.prefix!r}" if args.prefix else "all budgets"
    heading = f"usage of {scope}, {span} (UTC days)"
    text = f"{heading}\n{report_table(rows, grouping)}" if rows else f"{heading}: no charges"
    doc = {
        "budget_prefix": str(args.prefix),
        "since_us": since_us,
        "until_us": until_us,
        "group_by": [_column_title(g, grouping.label_key) for g in grouping.groups],
        "label_key": grouping.label_key,
        "rows": [render.message_json(row) for row in rows],
    }
    return Result(doc, text)


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`budgetctl report ...`, registered by parser.build_parser."""
    sub = cli._command(
        top,
        "report",
        report,
        summary="spend and tokens per day, budget, model or label",
        description="Sum what was charged (commits and expiries) in a time range: the "
        "amount in each budget's unit, the overage, the calls and their tokens. By default "
        "one row per UTC day. Grouped by budget, each budget of a hierarchy shows its own "
        "charges; grouped otherwise, each call counts once. Times without an offset are UTC.",
        examples="""\
  budgetctl report --since 2026-12-01 --until 2026-12-08
  budgetctl report --prefix org:acme/ --by budget,day
  budgetctl report --by model,label:team --since 2026-12-01
  budgetctl --json report --by day | jq '.rows[] | {day, charged}'
""",
    )
    sub.add_argument("--prefix", default="", help="only budgets whose id starts with this")
    sub.add_argument(
        "--since", metavar="TIME", type=cli.time_arg, help="from this ISO 8601 time (inclusive)"
    )
    sub.add_argument(
        "--until", metavar="TIME", type=cli.time_arg, help="up to this ISO 8601 time (exclusive)"
    )
    sub.add_argument(
        "--by",
        metavar="GROUP,...",
        type=by_arg,
        help=f"group rows by budget, model, day and/or label:KEY (default: {BY_DEFAULT})",
    )
