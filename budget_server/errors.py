"""Operating errors of the ledger, each tied to the gRPC status it is returned as.

    LedgerError
     ├── InvalidArgument        INVALID_ARGUMENT     malformed input; nothing was written
     ├── Unauthenticated        UNAUTHENTICATED      missing, wrong or revoked API key
 ├── PermissionDenied       PERMISSION_DENIED    the key lacks the scope for this budget
 ├── NotFound               NOT_FOUND            unknown budget or reservation
     ├── AlreadyExists          ALREADY_EXISTS       budget id taken
     ├── FailedPrecondition     FAILED_PRECONDITION  finished reservation, ...
 │    └── BudgetFrozen                            a budget in the chain is frozen
     ├── BudgetExhausted        RESOURCE_EXHAUSTED   a HARD budget in the chain has too little left
     ├── Overloaded             RESOURCE_EXHAUSTED   a queue bound was hit
     └── Unavailable            UNAVAILABLE          the database could not be reached; retry

These are expected outcomes, returned as statuses. Our own bugs are `LedgerInvariantError`
(an AssertionError that survives `python -O`), never caught as an operating error.
"""

from __future__ import annotations

import grpc


class LedgerError(Exception):
    """An operation the ledger refused; the message is meant for a person."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(LedgerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(LedgerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LedgerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(LedgerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LedgerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LedgerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class BudgetFrozen(FailedPrecondition):
    """A budget in the chain is frozen; names which one, for the stream's abort."""

    def __init__(self, budget_id: str) -> None:
        super().__init__(f"budget {budget_id!r} is frozen")
        self.budget_id = budget_id


class Overloaded(LedgerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LedgerError):
    code = grpc.StatusCode.UNAVAILABLE


class BudgetExhausted(LedgerError):
    """A HARD budget in the chain cannot cover the grant; carries what it has left."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, budget_id: str, requested: int, available: int, unit: str) -> None:
        super().__init__(
            f"budget {budget_id!r} is exhausted: requested {requested} {unit.lower()}, "
            f"available {available}"
        )
        self.budget_id = budget_id
        self.requested = requested
        self.available = available
        self.unit = unit


class LedgerInvariantError(AssertionError):
    """A ledger invariant failed: a bug in budgetd, never bad input."""


def ledger_assert(condition: bool, message: str) -> None:
    """Check an invariant in a way `python -O` cannot strip (TigerBeetle's tb_assert)."""
    if not condition:
        raise LedgerInvariantError(message)
