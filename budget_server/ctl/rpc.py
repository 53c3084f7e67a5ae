"""budgetd's AdminService as budgetctl calls it: one channel, a deadline on every call.

A command-line tool must end: without a deadline a call to an address that drops
packets would hang the operator's shell, so every call carries `timeout_s` and a late
answer becomes `Unreachable` (exit 3). gRPC failures leave this module as `CtlError`s,
so commands never handle `grpc.RpcError` themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final, TypeVar

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_server.ctl.failures import CtlError, from_rpc_error

TIMEOUT_DEFAULT_S: Final = 10.0
PAGE_SIZE_MAX: Final = 1000
"""budgetd's own cap; asking for more only returns this many."""
PAGES_MAX: Final = 100_000
"""A server that kept returning page tokens would otherwise keep us looping forever."""

Request = TypeVar("Request")
Response = TypeVar("Response")
Item = TypeVar("Item")


class Admin:
    """The AdminService calls budgetctl makes, each with the deadline and error mapping."""

    def __init__(self, channel: grpc.Channel, server: str, timeout_s: float) -> None:
        self._stub = pb_grpc.AdminServiceStub(channel)
        self.server = server
        self.timeout_s = timeout_s

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.server) from None

    def create_budget(self, request: pb.CreateBudgetRequest) -> pb.CreateBudgetResponse:
        return self._call(self._stub.CreateBudget, request)

    def update_budget(self, request: pb.UpdateBudgetRequest) -> pb.UpdateBudgetResponse:
        return self._call(self._stub.UpdateBudget, request)

    def get_budget(self, budget_id: str) -> pb.GetBudgetResponse:
        return self._call(self._stub.GetBudget, pb.GetBudgetRequest(budget_id=budget_id))

    def verify_ledger(self, budget_id: str) -> pb.VerifyLedgerResponse:
        return self._call(self._stub.VerifyLedger, pb.VerifyLedgerRequest(budget_id=budget_id))

    def list_budgets(
        self, prefix: str, *, wanted: int | None, page_size: int
    ) -> tuple[list[pb.Budget], bool]:
        def page(token: str, size: int) -> tuple[Sequence[pb.Budget], str]:
            request = pb.ListBudgetsRequest(prefix=prefix, page_size=size, page_token=token)
            response = self._call(self._stub.ListBudgets, request)
            return response.budgets, response.next_page_token

        return collect(page, wanted=wanted, page_size=page_size)

    def list_reservations(
        self, budget_id: str, state: pb.ReservationState.ValueType, *, wanted: int, page_size: int
    ) -> tuple[list[pb.Reservation], bool]:
        def page(token: str, size: int) -> tuple[Sequence[pb.Reservation], str]:
            request = pb.ListReservationsRequest(
                budget_id=budget_id, state=state, page_size=size, page_token=token
            )
            response = self._call(self._stub.ListReservations, request)
            return response.reservations, response.next_page_token

        return collect(page, wanted=wanted, page_size=page_size)

    def list_entries(
        self,
        budget_id: str,
        kind: pb.EntryKind.ValueType,
        since_us: int,
        until_us: int,
        *,
        wanted: int,
        page_size: int,
    ) -> tuple[list[pb.LedgerEntry], bool]:
        def page(token: str, size: int) -> tuple[Sequence[pb.LedgerEntry], str]:
            request = pb.ListLedgerEntriesRequest(
                budget_id=budget_id,
                kind=kind,
                since_us=since_us,
                until_us=until_us,
                page_size=size,
                page_token=token,
            )
            response = self._call(self._stub.ListLedgerEntries, request)
            return response.entries, response.next_page_token

        return collect(page, wanted=wanted, page_size=page_size)


@contextmanager
def connect(server: str, timeout_s: float = TIMEOUT_DEFAULT_S) -> Iterator[Admin]:
    """A channel to budgetd; connecting happens at the first call, under its deadline."""
    with grpc.insecure_channel(server) as channel:
        yield Admin(channel, server, timeout_s)


def collect(
    fetch: Callable[[str, int], tuple[Sequence[Item], str]],
    *,
    wanted: int | None,
    page_size: int,
) -> tuple[list[Item], bool]:
    """Follow page tokens until `wanted` items (None: all); also say whether more exist.

    budgetd issues a page token only when another row exists, so "more" is exact.
    """
    items: list[Item] = []
    token = ""
    seen_tokens: set[str] = set()
    for _ in range(PAGES_MAX):
        size = page_size if wanted is None else min(page_size, wanted - len(items))
        page, token = fetch(token, min(size, PAGE_SIZE_MAX))
        items.extend(page)
        if wanted is not None and len(items) >= wanted:
            return items[:wanted], bool(token) or len(items) > wanted
        if not token:
            return items, False
        if token in seen_tokens:
            raise CtlError(f"budgetd returned the page token {token!r} twice; stopping")
        seen_tokens.add(token)
    raise CtlError(f"stopped after {PAGES_MAX:,} pages; narrow the query")
