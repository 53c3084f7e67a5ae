"""Every RPC passes here first: who is calling (the API key), and may they do this to this
budget (the key's scopes). Health and reflection are registered elsewhere and stay open.

Rules name, per method, the action it needs and where the budget is in the request. Calls
on a reservation are checked against the budget that owns it; a Meter stream is checked
on its `open` message, before anything is reserved.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.handlers import MalformedRequest
from budget_server.api.status import abort
from budget_server.auth.store import KeyStore, Principal
from budget_server.errors import LedgerError, PermissionDenied, Unauthenticated
from budget_server.ledger.ledger import Ledger

Context = grpc.aio.ServicerContext[Any, Any]

# The caller of the Meter stream being served, for per-key stream limits.
current_key_id: contextvars.ContextVar[str] = contextvars.ContextVar("budgetd_key_id", default="")

# What a Meter stream's open message must pass: the caller's charge scope on its budget.
# The meter handler reads its messages itself (`context.read`), so the guard hands it the
# check rather than wrapping the request stream: a wrapper was one more generator for
# every usage message to pass through.
OpenCheck = Callable[[pb.MeterOpen], Awaitable[None]]
current_open_check: contextvars.ContextVar[OpenCheck | None] = contextvars.ContextVar(
    "budgetd_open_check", default=None
)


@dataclass(frozen=True, slots=True)
class Rule:
    action: str  # "read", "charge" or "admin"
    field: str = ""  # request field holding the budget id (or prefix, or reservation id)
    kind: str = "budget"  # "budget", "prefix", "budget_or_all", "reservation", "meter",
    # "any" (any valid key) or "none" (admin only)


_READ_BUDGET = Rule("read", "budget_id")
RULES: dict[tuple[str, str], Rule] = {
    ("BudgetService", "Reserve"): Rule("charge", "budget_id"),
    ("BudgetService", "Charge"): Rule("charge", "budget_id"),
    ("BudgetService", "Extend"): Rule("charge", "reservation_id", "reservation"),
    ("BudgetService", "Commit"): Rule("charge", "reservation_id", "reservation"),
    ("BudgetService", "Release"): Rule("charge", "reservation_id", "reservation"),
    ("BudgetService", "GetBudget"): _READ_BUDGET,
    ("BudgetService", "Meter"): Rule("charge", kind="meter"),
    ("AdminService", "GetBudget"): _READ_BUDGET,
    ("AdminService", "ListBudgets"): Rule("read", "prefix", "prefix"),
    ("AdminService", "WatchBudgets"): Rule("read", "prefix", "prefix"),
    ("AdminService", "UsageReport"): Rule("read", "budget_prefix", "prefix"),
    ("AdminService", "ListReservations"): Rule("read", "budget_id", "budget_or_all"),
    ("AdminService", "ListLedgerEntries"): Rule("read", "budget_id", "budget_or_all"),
    ("AdminService", "ListAlerts"): Rule("read", "budget_id", "budget_or_all"),
    ("AdminService", "VerifyLedger"): Rule("read", "budget_id", "budget_or_all"),
    # Prices are the same for everyone; any valid key may read them.
    ("AdminService", "ListPrices"): Rule("read", kind="any"),
}
ADMIN = Rule("admin", kind="none")

Handler = Callable[..., Any]


class Guard:
    """Authenticates and authorizes calls; with no key store (--insecure) it lets all pass."""

    def __init__(self, keys: KeyStore | None, ledger: Ledger) -> None:
        self.keys = keys
        self._ledger = ledger

    async def principal(self, context: Context) -> Principal | None:
        if self.keys is None:
            return None
        value = ""
        for key, item in context.invocation_metadata() or ():
            if key == "authorization":
                value = item if isinstance(item, str) else item.decode()
        if not value.startswith("Bearer "):
            raise Unauthenticated(
                "no API key: send metadata 'authorization: Bearer <key>' "
                "(the client reads BUDGETD_API_KEY)"
            )
        return await self.keys.authenticate(value.removeprefix("Bearer ").strip())

    async def _budget_of_reservation(self, reservation_id: str) -> str:
        return await self._ledger.owner_of(reservation_id) if reservation_id else ""

    async def check(self, principal: Principal, rule: Rule, request: Any) -> None:
        if rule.kind == "any":
            return
        if rule.kind == "none":
            if not principal.allows("admin", ""):
                raise PermissionDenied(
                    f"API key {principal.key_id} ({principal.name}) is not admin"
                )
            return
        value = str(getattr(request, rule.field, "")) if rule.field else ""
        if rule.kind == "reservation":
            value = await self._budget_of_reservation(value)
        if rule.kind == "prefix" or (rule.kind == "budget_or_all" and not value):
            if not principal.covers_prefix(rule.action, value):
                what = f"budgets starting with {value!r}" if value else "all budgets"
                raise PermissionDenied(
                    f"API key {principal.key_id} ({principal.name}) may not {rule.action} {what}"
                )
            return
        self.check_budget(principal, rule.action, value)

    @staticmethod
    def check_budget(principal: Principal, action: str, budget_id: str) -> None:
        if not principal.allows(action, budget_id):
            raise PermissionDenied(
                f"API key {principal.key_id} ({principal.name}) has no {action} scope "
                f"for budget {budget_id!r}"
            )

    def wrap(
        self, service: str, method: str, handler: Handler, streaming: tuple[bool, bool]
    ) -> Handler:
        if self.keys is None:
            return handler
        rule = RULES.get((service, method), ADMIN)
        if streaming == (True, True):
            return self._wrap_meter(handler, rule)
        if streaming == (False, True):
            return self._wrap_server_stream(handler, rule)
        return self._wrap_unary(handler, rule)

    async def _admit(self, request: Any, context: Context, rule: Rule) -> Principal | None:
        try:
            principal = await self.principal(context)
            if principal is not None and not isinstance(request, MalformedRequest):
                await self.check(principal, rule, request)
            return principal
        except LedgerError as error:
            await abort(context, error)

    def _wrap_unary(self, handler: Handler, rule: Rule) -> Handler:
        async def guarded(request: Any, context: Context) -> Any:
            await self._admit(request, context, rule)
            return await handler(request, context)

        return guarded

    def _wrap_server_stream(self, handler: Handler, rule: Rule) -> Handler:
        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            await self._admit(request, context, rule)
            async for item in handler(request, context):
                yield item

        return guarded

    def _wrap_meter(self, handler: Handler, rule: Rule) -> Handler:
        async def guarded(requests: AsyncIterator[Any], context: Context) -> None:
            try:
                principal = await self.principal(context)
            except LedgerError as error:
                await abort(context, error)
            if principal is not None:
                current_key_id.set(principal.key_id)
                current_open_check.set(functools.partial(self._check_open, principal, rule))
            await handler(requests, context)

        return guarded

    async def _check_open(self, principal: Principal, rule: Rule, opening: pb.MeterOpen) -> None:
        """The charge scope on the budget a stream opens on, or resumes on."""
        budget_id = opening.budget_id
        if opening.resume_reservation_id:
            budget_id = await self._budget_of_reservation(opening.resume_reservation_id)
        self.check_budget(principal, rule.action, budget_id)
