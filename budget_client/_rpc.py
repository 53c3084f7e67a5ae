"""gRPC plumbing shared by the client's calls: channel options and error mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
from google.rpc import status_pb2

from budget_client._config import ClientConfig
from budget_client._errors import (
    AccessDenied,
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

# Codes with which a live meter stream ends when its replica dies or the connection drops:
# besides the unreachable ones, INTERNAL ("Internal error from Core", when a write races
# the connection's teardown) and UNKNOWN ("Stream removed"). A stream that ends so is
# resumed; any other code is budgetd's answer and is not retried.
STREAM_BROKEN = UNREACHABLE | {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

# Round robin over the replicas in the address list. budgetd allows 250 streams per
# connection (HTTP/2 MAX_CONCURRENT_STREAMS); past that gRPC would queue new meter
# streams on the full connection, so it is asked to open up to 10 per replica instead
# (gRFC A105, grpcio >= 1.84; 10 is gRPC's own cap on this setting).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "connectionScaling": {"maxConnectionsPerSubchannel": 10},
}

CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    # A restarted replica is found within a second: meter streams resume by waiting for the
    # channel to be ready, so this bounds how long a stream runs unmetered after a restart.
    ("grpc.max_reconnect_backoff_ms", 1_000),
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
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AccessDenied(message, code=code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(message, code=code)
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        if "frozen" in message:
            return BudgetExceeded(message, code=code)
        return ReservationError(message, code=code)
    return BudgetError(message, code=code)


async def ended_call_error(call: grpc.aio.Call) -> BudgetError:
    """The client exception for a call that ended before we could use it.

    grpc.aio raises `asyncio.InvalidStateError` from `write()` on a call that has already
    finished (e.g. no replica was reachable), not the AioRpcError the status carries.
    """
    code = await call.code()
    if code == grpc.StatusCode.OK:  # the server ended the stream cleanly, before any reply
        return BudgetUnavailable("budgetd ended the call before answering", code=code)
    return translate(
        grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
            "",
        )
    )


def open_channel(config: ClientConfig) -> grpc.aio.Channel:
    """A channel to every replica in the config, over TLS when asked for."""
    if not (config.tls or config.tls_ca_file or config.tls_cert_file):
        return grpc.aio.insecure_channel(config.target, options=CHANNEL_OPTIONS)

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(config.tls_ca_file),
        private_key=read(config.tls_key_file),
        certificate_chain=read(config.tls_cert_file),
    )
    return grpc.aio.secure_channel(config.target, credentials, options=CHANNEL_OPTIONS)
