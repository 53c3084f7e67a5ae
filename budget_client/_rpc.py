"""gRPC plumbing shared by the client's calls: channel options and error mapping."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import status_pb2

from budget_client._errors import (
    BudgetError,
    BudgetExceeded,
    BudgetUnavailable,
    InvalidRequest,
    ReservationError,
)
from budget_client._proto.budgetd.v1 import budget_pb2 as pb

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Codes that mean "budgetd is not there right now" rather than "budgetd said no".
UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def exhausted_detail(
    error: grpc.aio.AioRpcError,
) -> pb.BudgetExhaustedDetail | None:
    metadata: Any = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for any_detail in status.details:
                detail = pb.BudgetExhaustedDetail()
                if any_detail.Unpack(detail):
                    return detail
    return None


def translate(error: grpc.aio.AioRpcError) -> BudgetError:
    """The client exception for a gRPC failure, keeping its status code."""
    code = error.code()
    message = error.details() or code.name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        detail = exhausted_detail(error)
        if detail is not None:
            return BudgetExceeded(message, budget_id=detail.budget_id, available=detail.available)
        return BudgetError(message, code=code)  # a limit of budgetd's own, not a budget
    if code in UNREACHABLE:
        return BudgetUnavailable(f"budgetd is unreachable: {message}", code=code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(message, code=code)
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        if "frozen" in message:
            return BudgetExceeded(message, code=code)
        return ReservationError(message, code=code)
    return BudgetError(message, code=code)
