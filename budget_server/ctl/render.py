"""What budgetctl prints: tables for people, one JSON document for scripts.

The JSON form (`--json`) is one object on stdout; its messages are budget.proto's, in the
proto3 JSON mapping with the .proto field names (`limit`, `window_start_us`, ...), every
field present even at its default, enums as their full names (`UNIT_USD`, `MODE_HARD`),
and 64-bit integers as JSON numbers rather than the mapping's strings. Amounts are
integers in the budget's unit: tokens, or nano-dollars for `UNIT_USD`. They can exceed
2^53, so read them with a parser that keeps big integers exact (Python's json, jq 1.7).

    budgets create / update   {"budget": Budget}
    budgets show              {"budget": Budget, "ancestors": [Budget, ...]}  parent first
    budgets list              {"budgets": [Budget, ...], "more": bool}
    reservations              {"budget_id": str, "unit": Unit, "reservations": [...], "more": bool}
    ledger                    {"budget_id": str, "unit": Unit, "entries": [...], "more": bool}
    verify                    VerifyLedgerResponse: {"ok", "budgets_checked",
                              "entries_checked", "drifts": [LedgerDrift, ...]}

`more` is true when budgetd has further rows than were fetched (raise --limit, or --all).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl.amounts import format_amount, format_percent, format_tokens
from budget_server.ctl.tables import Column, fields, table
from budget_server.ctl.times import format_time

JSONObject = dict[str, Any]


def message_json(message: Message) -> JSONObject:
    """A message as described in this module's docstring."""
    doc = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _numbers_in_field_order(cast(Descriptor, message.DESCRIPTOR), doc)


_INT64_TYPES = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def _numbers_in_field_order(descriptor: Descriptor, doc: JSONObject) -> JSONObject:
    """64-bit integers back to numbers, keys in .proto order, nested messages likewise.

    The proto3 JSON mapping quotes 64-bit integers (and `unquote_int64_if_possible` only
    unquotes those below 2^53), so a script would get "9007199254740993" for some amounts
    and numbers for others. MessageToDict also puts set fields before defaults; .proto
    order is what a person reading the output expects.
    """
    ordered: JSONObject = {}
    for field in descriptor.fields:
        if field.name not in doc:
            continue
        value = doc[field.name]
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            pass  # budget.proto's maps are string to string
        elif nested is not None:
            if field.is_repeated:
                value = [_numbers_in_field_order(nested, item) for item in value]
            else:
                value = _numbers_in_field_order(nested, value)
        elif field.cpp_type in _INT64_TYPES:
            value = [int(item) for item in value] if field.is_repeated else int(value)
        ordered[field.name] = value
    return ordered


def enum_label(enum: EnumDescriptor, value: int) -> str:
    """`MODE_SOFT` -> `soft`: the name people type on the command line."""
    known = enum.values_by_number.get(value)
    if known is None:  # a value added to budget.proto after this budgetctl was built
        return str(value)
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED")
    return known.name.removeprefix(prefix).lower()


BUDGET_COLUMNS = (
    Column("id"),
    Column("unit"),
    Column("limit", numeric=True),
    Column("spent", numeric=True),
    Column("reserved", numeric=True),
    Column("available", numeric=True),
    Column("used", numeric=True),
    Column("mode"),
    Column("period"),
    Column("frozen"),
)


def budget_row(budget: pb.Budget) -> list[str]:
    def amount(value: int) -> str:
        return format_amount(value, budget.unit)

    return [
        budget.id,
        enum_label(pb.Unit.DESCRIPTOR, budget.unit),
        amount(budget.limit),
        amount(budget.spent),
        amount(budget.reserved),
        amount(budget.available),
        format_percent(budget.spent, budget.limit),
        enum_label(pb.Mode.DESCRIPTOR, budget.mode),
        enum_label(pb.Period.DESCRIPTOR, budget.period),
        "FROZEN" if budget.frozen else "no",
    ]


def budgets_table(budgets: Sequence[pb.Budget]) -> str:
    """USED is spent / limit, the figure alert thresholds are measured against."""
    return table(BUDGET_COLUMNS, [budget_row(b) for b in budgets])


def budget_fields(budget: pb.Budget) -> str:
    """One budget, every figure, for `show`, `create` and `update`."""

    def amount(value: int) -> str:
        return format_amount(value, budget.unit)

    period = enum_label(pb.Period.DESCRIPTOR, budget.period)
    if budget.period not in (pb.PERIOD_NONE, pb.PERIOD_UNSPECIFIED):
        period += (
            f" in {budget.time_zone}; this window "
            f"{format_time(budget.window_start_us)} .. {format_time(budget.window_end_us)}"
        )
    thresholds = ", ".join(f"{pct}%" for pct in budget.alert_thresholds_pct) or "none"
    return fields(
        [
            ("id", budget.id),
            ("parent", budget.parent_id or "- (root)"),
            ("unit", enum_label(pb.Unit.DESCRIPTOR, budget.unit)),
            ("limit", amount(budget.limit)),
            ("spent", amount(budget.spent)),
            ("reserved", amount(budget.reserved)),
            ("available", amount(budget.available)),
            ("overage", amount(budget.overage)),
            ("used", f"{format_percent(budget.spent, budget.limit)} of the limit spent"),
            ("mode", enum_label(pb.Mode.DESCRIPTOR, budget.mode)),
            ("period", period),
            ("alerts at", thresholds),
            ("frozen", "YES: every grant is refused" if budget.frozen else "no"),
            ("created", format_time(budget.created_at_us)),
            ("updated", format_time(budget.updated_at_us)),
        ]
    )


RESERVATION_COLUMNS = (
    Column("id"),
    Column("state"),
    Column("granted", numeric=True),
    Column("charged", numeric=True),
    Column("overage", numeric=True),
    Column("input", numeric=True),
    Column("output", numeric=True),
    Column("model"),
    Column("created"),
    Column("ends"),
)


def reservations_table(reservations: Sequence[pb.Reservation], unit: pb.Unit.ValueType) -> str:
    """ENDS is the expiry of a pending hold, else when it was finished."""
    rows = []
    for held in reservations:
        pending = held.state == pb.RESERVATION_STATE_PENDING
        rows.append(
            [
                held.id,
                enum_label(pb.ReservationState.DESCRIPTOR, held.state),
                format_amount(held.granted, unit),
                format_amount(held.charged, unit),
                format_amount(held.overage, unit),
                format_tokens(held.usage.input_tokens),
                format_tokens(held.usage.output_tokens),
                held.model or "-",
                format_time(held.created_at_us),
                format_time(held.expires_at_us if pending else held.finished_at_us),
            ]
        )
    return table(RESERVATION_COLUMNS, rows)


ENTRY_COLUMNS = (
    Column("entry", numeric=True),
    Column("time"),
    Column("kind"),
    Column("amount", numeric=True),
    Column("spent", numeric=True),
    Column("reserved", numeric=True),
    Column("overage", numeric=True),
    Column("reservation"),
    Column("model"),
    Column("actor"),
)


def entries_table(entries: Sequence[pb.LedgerEntry], unit: pb.Unit.ValueType) -> str:
    """SPENT, RESERVED and OVERAGE are the entry's changes to the budget's figures."""

    def delta(value: int) -> str:
        return format_amount(value, unit, signed=True) if value else "0"

    rows = [
        [
            str(entry.id),
            format_time(entry.created_at_us),
            enum_label(pb.EntryKind.DESCRIPTOR, entry.kind),
            format_amount(entry.amount, unit),
            delta(entry.spent_delta),
            delta(entry.reserved_delta),
            delta(entry.overage_delta),
            entry.reservation_id or "-",
            entry.model or "-",
            entry.actor,
        ]
        for entry in entries
    ]
    return table(ENTRY_COLUMNS, rows)


def verification_text(result: pb.VerifyLedgerResponse) -> str:
    """A one-line verdict, then one line per drift with the raw integers.

    Drift amounts stay raw (tokens or nano-dollars, as stored) because whoever repairs
    the ledger needs the exact stored values, not a rendering of them.
    """
    checked = (
        f"{_count(result.budgets_checked, 'budget', 'budgets')}, "
        f"{_count(result.entries_checked, 'entry', 'entries')} checked"
    )
    if result.ok and not result.drifts:
        return f"ledger clean: {checked}"
    differ = _count(len(result.drifts), "figure differs", "figures differ")
    lines = [f"LEDGER DRIFT: {differ} from the entries ({checked})"]
    lines.extend(
        f"drift  {d.budget_id}  {d.figure}: recorded {d.recorded}, recomputed {d.recomputed} "
        f"(off by {d.recorded - d.recomputed:+})"
        for d in result.drifts
    )
    return "\n".join(lines)


def _count(number: int, one: str, many: str) -> str:
    return f"{number:,} {one if number == 1 else many}"
