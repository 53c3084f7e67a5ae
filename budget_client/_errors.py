"""The client's exceptions, one tree (httpx's `_exceptions.py` style):

    BudgetError                 anything budgetd-related; `.code` is the gRPC status or None
     ├── BudgetExceeded         a budget refused the call, or aborted the stream mid-way
     ├── BudgetUnavailable      budgetd cannot be reached (metered calls: only if fail-closed)
     ├── AccessDenied           the API key is missing, wrong, revoked, or lacks the scope
     ├── ReservationError       no such budget or reservation, or not in a state for the call
     └── InvalidRequest         budgetd refused the request as malformed (INVALID_ARGUMENT)

A gRPC failure keeps its status code (`error.code`), so callers never parse messages.
"""

from __future__ import annotations

import grpc

from budget_client._types import Usage


class BudgetError(Exception):
    """Base of every budgetd client error."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class BudgetExceeded(BudgetError):
    """The budget cannot cover the call: refused up front, or aborted while streaming.

    When a stream was cut off, `partial_text` is what the client counted (what the app
    received, and what the provider sent before it saw the cut) and `usage`/`charged` are
    what the ledger recorded for it. `uncounted_tail` is True when the provider was still
    sending a while after the cut (`COUNT_AFTER_CUT_S`), so the rest went uncounted and
    the charge may be short of the provider's bill.
    """

    def __init__(
        self,
        message: str,
        *,
        budget_id: str = "",
        available: int | None = None,
        partial_text: str = "",
        usage: Usage | None = None,
        charged: int | None = None,
        uncounted_tail: bool = False,
        code: grpc.StatusCode | None = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        super().__init__(message, code=code)
        self.budget_id = budget_id
        self.available = available
        self.partial_text = partial_text
        self.usage = usage
        self.charged = charged
        self.uncounted_tail = uncounted_tail


class BudgetUnavailable(BudgetError):
    """budgetd could not be reached. Metered calls raise it only when the policy is
    fail-closed (fail-open runs the LLM call and spools its usage); direct calls
    (reserve, commit, charge, get_budget...) have no call to run, so they always do."""


class AccessDenied(BudgetError):
    """budgetd refused the API key (UNAUTHENTICATED) or its scopes (PERMISSION_DENIED).

    Never masked by the fail-open policy: a wrong key is a configuration error to fix.
    """


class ReservationError(BudgetError):
    """budgetd answered NOT_FOUND or FAILED_PRECONDITION: the budget or reservation does
    not exist, the reservation was already committed, released or expired, or the call
    cannot apply (a USD budget with no price for the model, an idempotency key that names
    another kind of call). `.code` tells NOT_FOUND from FAILED_PRECONDITION."""


class InvalidRequest(BudgetError):
    """budgetd refused the request as malformed; the message names the field and the limit."""
