"""What can go wrong in budgetctl, each failure tied to the exit code a script sees.

    CtlError                 exit 2   the message is for a person, printed after "budgetctl: "
     ├── UsageError          exit 2   an argument that only the command could check
     ├── ServerRefused       exit 2   budgetd answered with an error status
     └── Unreachable         exit 3   no answer from budgetd (not running, wrong address, slow)

Exit 1 is not an error: `verify` found drift. Scripts can tell "budgetd said no" (2)
from "budgetd was not there" (3), which is the difference between fixing the request and
retrying later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import grpc
from google.protobuf.message import DecodeError

# googleapis-common-protos ships .pyi files but no py.typed marker; unused-ignore keeps this
# line clean once pyproject.toml lists google.rpc.* among the untyped modules.
from google.rpc import status_pb2  # type: ignore[import-untyped, unused-ignore]

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl.amounts import format_amount

EXIT_OK: Final = 0
EXIT_DRIFT: Final = 1
EXIT_ERROR: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_INTERRUPTED: Final = 130  # Ctrl-C, as shells report SIGINT

STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
_UNREACHABLE_CODES: Final = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CtlError(Exception):
    """A failure reported as `budgetctl: <message>` on stderr."""

    exit_code: int = EXIT_ERROR


class UsageError(CtlError):
    """A bad argument found after parsing, e.g. a limit read in the budget's own unit."""


class ServerRefused(CtlError):
    """budgetd answered with an error status; code kept so callers need not parse text."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(CtlError):
    """budgetd did not answer in time, or could not be connected to."""

    exit_code = EXIT_UNREACHABLE


def from_status(
    code: grpc.StatusCode,
    details: str | None,
    trailing_metadata: Sequence[tuple[str, str | bytes]] | None,
    server: str,
) -> CtlError:
    """The failure to report for a gRPC status from a call to budgetd at `server`."""
    if code in _UNREACHABLE_CODES:
        return Unreachable(
            f"cannot reach budgetd at {server} ({code.name}: {details or 'no details'}); "
            "is it running? Set the address with --server, BUDGETD_SERVER or BUDGETD_ADDRESS"
        )
    lines = [f"{code.name}: {details or 'no details'}"]
    exhausted = exhausted_detail(trailing_metadata or ())
    if exhausted is not None:
        lines.append(
            f"budget {exhausted.budget_id!r} has "
            f"{format_amount(exhausted.available, exhausted.unit)} available "
            f"(requested {format_amount(exhausted.requested, exhausted.unit)})"
        )
    return ServerRefused(code, "\n  ".join(lines))


def from_rpc_error(error: grpc.RpcError, server: str) -> CtlError:
    # Errors raised before a call starts (a malformed target) have no code().
    if not isinstance(error, grpc.Call):
        return Unreachable(f"cannot reach budgetd at {server} ({error})")
    return from_status(error.code(), error.details(), error.trailing_metadata(), server)


def exhausted_detail(
    trailing_metadata: Sequence[tuple[str, str | bytes]],
) -> pb.BudgetExhaustedDetail | None:
    """The BudgetExhaustedDetail budgetd packs into the standard status trailer, if any."""
    for key, value in trailing_metadata:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None  # the message text still says what happened
        for packed in status.details:
            detail = pb.BudgetExhaustedDetail()
            if packed.Unpack(detail):
                return detail
    return None
