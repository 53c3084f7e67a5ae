"""One function per budgetctl command: read the parsed arguments, call budgetd, build a Result.

A command builds both its table and its JSON document; main prints the one asked for.
Building both costs microseconds and keeps the two forms from drifting apart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import render
from budget_server.ctl.amounts import AmountError, format_amount, parse_amount
from budget_server.ctl.failures import EXIT_DRIFT, EXIT_OK, CtlError, UsageError
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


FREEZE_REASON_LENGTH_MAX: Final = 500
"""budgetd keeps this much of a freeze's reason (it goes into every aborted stream's message)."""


def budgets_freeze(admin: Admin, args: argparse.Namespace) -> Result:
    """{"budget": Budget}; budgetd aborts the budget's open streams on every replica."""
    reason = str(args.reason or "")
    if len(reason) > FREEZE_REASON_LENGTH_MAX:
        raise UsageError(f"--reason is over {FREEZE_REASON_LENGTH_MAX} characters")
    budget = admin.freeze_budget(str(args.id), reason).budget
    because = f" ({reason})" if reason else ""
    text = (
        f"froze budget {budget.id}{because}: new grants are refused, and its open streams "
        f"are aborted on every replica\n{render.budget_fields(budget)}"
    )
    return Result({"budget": render.message_json(budget)}, text)


def budgets_unfreeze(admin: Admin, args: argparse.Namespace) -> Result:
    """{"budget": Budget}"""
    budget = admin.unfreeze_budget(str(args.id)).budget
    text = f"unfroze budget {budget.id}: it grants again\n{render.budget_fields(budget)}"
    return Result({"budget": render.message_json(budget)}, text)


def budgets_delete(admin: Admin, args: argparse.Namespace) -> Result:
    """{"deleted": str}. The id is retired for good, so a person confirms it unless --yes;
    a script (no terminal on stdin, or --json) must say --yes, as it cannot be asked."""
    budget_id = str(args.id)
    if not args.yes:
        if args.json or not sys.stdin.isatty():
            raise UsageError(
                "deleting a budget retires its id for good: add --yes to confirm "
                "(needed with --json or when stdin is not a terminal)"
            )
        _confirm_delete(admin, budget_id)
    admin.delete_budget(budget_id)
    text = (
        f"deleted budget {budget_id}: every call on it is refused from now on; its ledger "
        "entries stay, and the id cannot be created again"
    )
    return Result({"deleted": budget_id}, text)


def _confirm_delete(admin: Admin, budget_id: str) -> None:
    # Looked up first, so a mistyped id fails with NOT_FOUND before anyone is asked.
    budget = admin.get_budget(budget_id).budget
    spent = format_amount(budget.spent, budget.unit)
    limit = format_amount(budget.limit, budget.unit)
    question = (
        f"Delete budget {budget_id!r} (spent {spent} of {limit})? Its ledger entries stay, "
        "but the id can never be created again. [y/N] "
    )
    print(question, end="", file=sys.stderr, flush=True)
    try:
        # The whole line (a terminal's line is bounded): left unread, the rest would go
        # to the shell after we exit.
        answer = sys.stdin.readline()
    except (EOFError, UnicodeDecodeError):
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CtlError(f"budget {budget_id} not deleted")


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
