"""Between protobuf messages and the ledger's own types (enum names, views)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.errors import InvalidArgument
from budget_server.ledger.model import BudgetView, ReservationView
from budget_server.ledger.usage import Usage

UNIT_NAMES = {pb.UNIT_TOKENS: "TOKENS", pb.UNIT_USD: "USD"}
UNIT_VALUES = {v: k for k, v in UNIT_NAMES.items()}
PERIOD_NAMES = {
    pb.PERIOD_UNSPECIFIED: "NONE",
    pb.PERIOD_NONE: "NONE",
    pb.PERIOD_DAY: "DAY",
    pb.PERIOD_WEEK: "WEEK",
    pb.PERIOD_MONTH: "MONTH",
}
PERIOD_VALUES = {
    "NONE": pb.PERIOD_NONE,
    "DAY": pb.PERIOD_DAY,
    "WEEK": pb.PERIOD_WEEK,
    "MONTH": pb.PERIOD_MONTH,
}
MODE_NAMES = {pb.MODE_UNSPECIFIED: "HARD", pb.MODE_HARD: "HARD", pb.MODE_SOFT: "SOFT"}
MODE_VALUES = {"HARD": pb.MODE_HARD, "SOFT": pb.MODE_SOFT}
STATE_VALUES = {
    "PENDING": pb.RESERVATION_STATE_PENDING,
    "COMMITTED": pb.RESERVATION_STATE_COMMITTED,
    "RELEASED": pb.RESERVATION_STATE_RELEASED,
    "EXPIRED": pb.RESERVATION_STATE_EXPIRED,
}
STATE_NAMES = {v: k for k, v in STATE_VALUES.items()}
KIND_VALUES = {
    "RESERVE": pb.ENTRY_KIND_RESERVE,
    "EXTEND": pb.ENTRY_KIND_EXTEND,
    "COMMIT": pb.ENTRY_KIND_COMMIT,
    "RELEASE": pb.ENTRY_KIND_RELEASE,
    "EXPIRE": pb.ENTRY_KIND_EXPIRE,
    "ROLLOVER": pb.ENTRY_KIND_ROLLOVER,
    "ADJUST": pb.ENTRY_KIND_ADJUST,
    "LIMIT": pb.ENTRY_KIND_LIMIT,
}
KIND_NAMES = {v: k for k, v in KIND_VALUES.items()}


def enum_name(table: Mapping[Any, str], value: int, field: str) -> str:
    """The name for an enum value, or INVALID_ARGUMENT for one this server does not know."""
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"{field} has an unknown value {value}") from None


def usage_from_pb(message: pb.Usage, what: str = "usage") -> Usage:
    return Usage(
        input_tokens=message.input_tokens,
        cached_input_tokens=message.cached_input_tokens,
        output_tokens=message.output_tokens,
        reasoning_tokens=message.reasoning_tokens,
    ).validate(what)


def usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )


def budget_to_pb(view: BudgetView) -> pb.Budget:
    return pb.Budget(
        id=view.id,
        parent_id=view.parent_id or "",
        unit=UNIT_VALUES[view.unit],
        limit=view.limit,
        period=PERIOD_VALUES[view.period],
        time_zone=view.time_zone,
        mode=MODE_VALUES[view.mode],
        alert_thresholds_pct=list(view.thresholds_pct),
        frozen=view.frozen,
        spent=view.spent,
        reserved=view.reserved,
        overage=view.overage,
        available=view.available,
        window_start_us=view.window_start_us,
        window_end_us=view.window_end_us,
        created_at_us=view.created_at_us,
        updated_at_us=view.updated_at_us,
    )


def reservation_to_pb(view: ReservationView) -> pb.Reservation:
    return pb.Reservation(
        id=view.id,
        budget_id=view.budget_id,
        state=STATE_VALUES[view.state],
        granted=view.granted,
        usage=usage_to_pb(view.usage),
        grant_input_tokens=view.grant.input_tokens,
        grant_output_tokens=view.grant.output_tokens,
        charged=view.charged,
        overage=view.overage,
        expires_at_us=view.expires_at_us,
        idempotency_key=view.idempotency_key,
        model=view.model,
        labels=view.labels,
        created_at_us=view.created_at_us,
        finished_at_us=view.finished_at_us,
    )


def reservation_row_to_pb(row: Any) -> pb.Reservation:
    """A row of admin.list_reservations (reservation columns plus its own hold)."""
    return pb.Reservation(
        id=row.id,
        budget_id=row.budget_id,
        state=STATE_VALUES[row.state],
        granted=row.held,
        grant_input_tokens=row.grant_input_tokens,
        grant_output_tokens=row.grant_output_tokens,
        usage=pb.Usage(
            input_tokens=row.input_tokens,
            cached_input_tokens=row.cached_input_tokens,
            output_tokens=row.output_tokens,
            reasoning_tokens=row.reasoning_tokens,
        ),
        charged=row.charged,
        overage=row.overage,
        expires_at_us=row.expires_at_us,
        idempotency_key=row.idempotency_key or "",
        model=row.model,
        labels=json.loads(row.labels),
        created_at_us=row.created_at_us,
        finished_at_us=row.finished_at_us,
    )


def entry_row_to_pb(row: Any) -> pb.LedgerEntry:
    return pb.LedgerEntry(
        id=row.id,
        budget_id=row.budget_id,
        kind=KIND_VALUES[row.kind],
        amount=row.amount,
        spent_delta=row.spent_delta,
        reserved_delta=row.reserved_delta,
        overage_delta=row.overage_delta,
        reservation_id=row.reservation_id or "",
        usage=pb.Usage(
            input_tokens=row.input_tokens,
            cached_input_tokens=row.cached_input_tokens,
            output_tokens=row.output_tokens,
            reasoning_tokens=row.reasoning_tokens,
        ),
        model=row.model,
        labels=json.loads(row.labels),
        created_at_us=row.created_at_us,
        actor=row.actor,
    )
