"""One function per budgetctl command: read the parsed arguments, call budgetd, build a Result.

A command builds both its table and its JSON document; main prints the one asked for.
Building both costs microseconds and keeps the two forms from drifting apart.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import render
from budget_server.ctl.amounts import AmountError, parse_amount
from budget_server.ctl.failures import EXIT_DRIFT, EXIT_OK, UsageError
from budget_server.ctl.rpc import Admin

UNITS = {"tokens": pb.UNIT_TOKENS, "usd": pb.UNIT_USD}
PERIODS = {
    "none": pb.PERIOD_NONE,
    "day": pb.PERIOD_DAY,
    "week": pb.PERIOD_WEEK,
    "month": pb.PERIOD_MONTH,
}
MODES = {"hard": pb.MODE_HARD, "soft": pb.MODE_SOFT}
STATES = {
    "pending": pb.RESERVATION_STATE_PENDING,
    "committed": pb.RESERVATION_STATE_COMMITTED,
    "released": pb.RESERVATION_STATE_RELEASED,
    "expired": pb.RESERVATION_STATE_EXPIRED,
}
KINDS = {
    "reserve": pb.ENTRY_KIND_RESERVE,
    "extend": pb.ENTRY_KIND_EXTEND,
    "commit": pb.ENTRY_KIND_COMMIT,
    "release": pb.ENTRY_KIND_RELEASE,
    "expire": pb.ENTRY_KIND_EXPIRE,
    "rollover": pb.ENTRY_KIND_ROLLOVER,
    "adjust": pb.ENTRY_KIND_ADJUST,
    "limit": pb.ENTRY_KIND_LIMIT,
}


@dataclass(frozen=True, slots=True)
class Result:
    """What a command produced; main prints `doc` with --json, else `text`."""

    doc: render.JSONObject
    """The JSON document (shapes in render.py's docstring)."""
    text: str
    """The same for a person."""
    exit_code: int = EXIT_OK
    """0, or 1 when verify found drift."""


Command = Callable[[Admin, argparse.Namespace], Result]


def _limit(text: str, unit: pb.Unit.ValueType) -> int:
    try:
        return parse_amount(text, unit)
    except AmountError as error:
        raise UsageError(f"--limit: {error}") from None


def budgets_create(admin: Admin, args: argparse.Namespace) -> Result:
    unit = UNITS[str(args.unit)]
    request = pb.CreateBudgetRequest(
        id=str(args.id),
        parent_id=str(args.parent or ""),
        unit=unit,
        limit=_limit(str(args.limit), unit),
        period=PERIODS[str(args.period)],
        time_zone=str(args.tz),
        mode=MODES[str(args.mode)],
        alert_thresholds_pct=list(args.thresholds or ()),
    )
    budget = admin.create_budget(request).budget
    return Result(
        {"budget": render.message_json(budget)},
        f"created budget {budget.id}\n{render.budget_fields(budget)}",
    )


def budgets_update(admin: Admin, args: argparse.Namespace) -> Result:
    changes = (args.limit, args.mode, args.thresholds, args.frozen)
    if all(change is None for change in changes):
        raise UsageError(
            "nothing to update: give --limit, --mode, --thresholds, --freeze or --unfreeze"
        )
    request = pb.UpdateBudgetRequest(id=str(args.id))
    if args.limit is not None:
        # The limit is typed in the budget's own unit, which only budgetd knows.
        unit = admin.get_budget(str(args.id)).budget.unit
        request.limit = _limit(str(args.limit), unit)
    if args.mode is not None:
        request.mode = MODES[str(args.mode)]
    if args.thresholds is not None:
        request.alert_thresholds_pct.extend(args.thresholds)
        request.set_alert_thresholds = True  # an empty list is a change too: no alerts
    if args.frozen is not None:
        request.frozen = bool(args.frozen)
    budget = admin.update_budget(request).budget
    return Result(
        {"budget": render.message_json(budget)},
        f"updated budget {budget.id}\n{render.budget_fields(budget)}",
    )


def budgets_show(admin: Admin, args: argparse.Namespace) -> Result:
    response = admin.get_budget(str(args.id))
    text = render.budget_fields(response.budget)
    if response.ancestors:
        text += "\n\nancestors (parent first); a grant must fit in each:\n"
        text += render.budgets_table(response.ancestors)
    return Result(
        {
            "budget": render.message_json(response.budget),
            "ancestors": [render.message_json(b) for b in response.ancestors],
        },
        text,
    )


def budgets_list(admin: Admin, args: argparse.Namespace) -> Result:
    page_size = int(args.page_size)
    budgets, more = admin.list_budgets(
        str(args.prefix), wanted=None if args.all else page_size, page_size=page_size
    )
    if budgets:
        text = render.budgets_table(budgets)
    else:
        text = f"no budgets with ids starting {args.prefix!r}" if args.prefix else "no budgets"
    if more:
        text += f"\n(first {len(budgets)} budgets shown; --all lists every one)"
    return Result({"budgets": [render.message_json(b) for b in budgets], "more": more}, text)


def reservations(admin: Admin, args: argparse.Namespace) -> Result:
    budget_id = str(args.id)
    # Reservations carry amounts but not their unit; this also turns an unknown id into
    # NOT_FOUND rather than an empty list.
    unit = admin.get_budget(budget_id).budget.unit
    state = STATES[str(args.state)] if args.state else pb.RESERVATION_STATE_UNSPECIFIED
    held, more = admin.list_reservations(
        budget_id, state, wanted=int(args.limit), page_size=int(args.page_size)
    )
    text = render.reservations_table(held, unit) if held else "no reservations"
    if more:
        text += f"\n(first {len(held)} shown; raise --limit to see more)"
    doc = {
        "budget_id": budget_id,
        "unit": pb.Unit.Name(unit),
        "reservations": [render.message_json(r) for r in held],
        "more": more,
    }
    return Result(doc, text)


def ledger(admin: Admin, args: argparse.Namespace) -> Result:
    budget_id = str(args.id)
    since_us = int(args.since or 0)
    until_us = int(args.until or 0)
    if since_us and until_us and since_us >= until_us:
        raise UsageError("--since must be before --until")
    unit = admin.get_budget(budget_id).budget.unit  # as for reservations
    kind = KINDS[str(args.kind)] if args.kind else pb.ENTRY_KIND_UNSPECIFIED
    entries, more = admin.list_entries(
        budget_id, kind, since_us, until_us, wanted=int(args.limit), page_size=int(args.page_size)
    )
    text = render.entries_table(entries, unit) if entries else "no ledger entries"
    if more:
        text += f"\n(first {len(entries)} shown; raise --limit or narrow with --since)"
    doc = {
        "budget_id": budget_id,
        "unit": pb.Unit.Name(unit),
        "entries": [render.message_json(e) for e in entries],
        "more": more,
    }
    return Result(doc, text)


def verify(admin: Admin, args: argparse.Namespace) -> Result:
    result = admin.verify_ledger(str(args.id or ""))
    clean = result.ok and not result.drifts
    return Result(
        render.message_json(result),
        render.verification_text(result),
        EXIT_OK if clean else EXIT_DRIFT,
    )
