"""`budgetctl alerts`: the alert thresholds budgets crossed, oldest first.

budgetd records each threshold once per budget window, on whichever replica saw it
crossed. Alerts carry amounts but not their unit, so budgetctl asks for each distinct
budget once (GetBudget) to show dollars or tokens. `--json` carries budget.proto's Alert:

    alerts   {"budget_id": str, "alerts": [Alert, ...], "units": {budget_id: Unit}, "more": bool}

`units` names each listed budget's unit; UNIT_UNSPECIFIED for a budget deleted since (its
alerts stay). `more` is true when budgetd has further alerts than --limit fetched.

The parser's helpers come from parser.py, which imports this module to register the
command; only functions of each module are used across, so the import cycle is harmless.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import parser as cli
from budget_server.ctl import render
from budget_server.ctl.amounts import format_amount, format_percent
from budget_server.ctl.commands import Result
from budget_server.ctl.failures import ServerRefused
from budget_server.ctl.rpc import Admin
from budget_server.ctl.tables import Column, table
from budget_server.ctl.times import format_time

ALERT_COLUMNS = (
    Column("fired"),
    Column("budget"),
    Column("threshold", numeric=True),
    Column("spent", numeric=True),
    Column("limit", numeric=True),
    Column("used", numeric=True),
    Column("window"),
)


def budget_units(
    admin: Admin, budget_ids: Sequence[str], known: Mapping[str, pb.Unit.ValueType]
) -> dict[str, pb.Unit.ValueType]:
    """Each budget's unit, one GetBudget per distinct id not `known`; UNIT_UNSPECIFIED for
    a budget deleted since."""
    units: dict[str, pb.Unit.ValueType] = {}
    for budget_id in dict.fromkeys(budget_ids):  # distinct, in first-seen order
        if budget_id in known:
            units[budget_id] = known[budget_id]
            continue
        try:
            units[budget_id] = admin.get_budget(budget_id).budget.unit
        except ServerRefused as refused:
            if refused.code != grpc.StatusCode.NOT_FOUND:
                raise
            units[budget_id] = pb.UNIT_UNSPECIFIED
    return units


def _amount(value: int, unit: pb.Unit.ValueType) -> str:
    # A deleted budget's unit is unknown: the stored integer, not a guess at its unit.
    return format_amount(value, unit) if unit != pb.UNIT_UNSPECIFIED else f"{value:,}"


def alerts_table(alerts: Sequence[pb.Alert], units: Mapping[str, pb.Unit.ValueType]) -> str:
    """USED is spent / limit when the alert fired; WINDOW is the start of the budget's
    period it fired in (`-` for budgets without a period)."""
    rows = []
    for alert in alerts:
        unit = units.get(alert.budget_id, pb.UNIT_UNSPECIFIED)
        rows.append(
            [
                format_time(alert.fired_at_us),
                alert.budget_id,
                f"{alert.threshold_pct}%",
                _amount(alert.spent, unit),
                _amount(alert.limit, unit),
                format_percent(alert.spent, alert.limit),
                format_time(alert.window_start_us),
            ]
        )
    return table(ALERT_COLUMNS, rows)


def alerts(admin: Admin, args: argparse.Namespace) -> Result:
    budget_id = str(args.id or "")
    known: dict[str, pb.Unit.ValueType] = {}
    if budget_id:
        # Also turns an unknown id into NOT_FOUND rather than "no alerts".
        known[budget_id] = admin.get_budget(budget_id).budget.unit
    fired, more = admin.list_alerts(
        budget_id, wanted=int(args.limit), page_size=int(args.page_size)
    )
    units = budget_units(admin, [alert.budget_id for alert in fired], known)
    if fired:
        text = alerts_table(fired, units)
    else:
        text = f"no alerts for budget {budget_id}" if budget_id else "no alerts"
    if more:
        text += f"\n(first {len(fired)} shown; raise --limit to see more)"
    doc = {
        "budget_id": budget_id,
        "alerts": [render.message_json(alert) for alert in fired],
        "units": {key: pb.Unit.Name(unit) for key, unit in units.items()},
        "more": more,
    }
    return Result(doc, text)


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`budgetctl alerts [ID]`, registered by parser.build_parser."""
    sub = cli._command(
        top,
        "alerts",
        alerts,
        summary="list the alert thresholds budgets crossed",
        description="List the alerts that fired, oldest first: when, which budget, the "
        "threshold crossed, and what was spent of the limit at that moment. Each threshold "
        "fires once per budget window. Times are UTC.",
        examples="""\
  budgetctl alerts
  budgetctl alerts org:acme/team:search --limit 20
  budgetctl --json alerts --limit 1000 | jq '.alerts[] | select(.threshold_pct >= 90)'
""",
    )
    sub.add_argument("id", metavar="ID", nargs="?", help="one budget (default: all)")
    sub.add_argument(
        "--limit",
        metavar="N",
        type=cli.count_arg,
        default=cli.ROWS_DEFAULT,
        help=f"at most N alerts (default {cli.ROWS_DEFAULT})",
    )
    cli._page_size_option(sub, cli.ROWS_DEFAULT)
