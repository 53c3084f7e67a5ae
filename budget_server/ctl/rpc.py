"""budgetd's AdminService as budgetctl calls it: one channel, a deadline on every call.

A command-line tool must end: without a deadline a call to an address that drops
packets would hang the operator's shell, so every call carries `timeout_s` and a late
answer becomes `Unreachable` (exit 3). The one exception is `watch`'s event stream, which
lasts as long as the watch; EventStream lets the watch cancel it. gRPC failures leave
this module as `CtlError`s, so commands never handle `grpc.RpcError` themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeVar

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_server.ctl.failures import CtlError, Unreachable, from_rpc_error

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

    def __init__(
        self,
        channel: grpc.Channel,
        server: str,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._stub = pb_grpc.AdminServiceStub(channel)
        self.server = server
        self.timeout_s = timeout_s
        self.metadata = metadata

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        try:
            return method(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.server) from None

    @property
    def stub(self) -> pb_grpc.AdminServiceStub:
        """Every AdminService method, for `call`: `admin.call(admin.stub.ListKeys, request)`."""
        return self._stub

    def call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        """Any unary call of `stub`, with the deadline and the mapping to CtlError."""
        return self._call(method, request)

    def call_all(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], requests: Sequence[Request]
    ) -> list[Response | CtlError]:
        """The same call for each request, all in flight at once: N answers in one round trip.

        Each failure comes back in its request's place rather than raised, so one budget
        deleted meanwhile does not hide the others' answers. The caller bounds `requests`.
        """
        futures = [
            method.future(request, timeout=self.timeout_s, metadata=self.metadata)
            for request in requests
        ]
        results: list[Response | CtlError] = []
        for future in futures:
            try:
                results.append(future.result())
            except grpc.RpcError as error:
                results.append(from_rpc_error(error, self.server))
        return results

    def freeze_budget(self, budget_id: str, reason: str) -> pb.UpdateBudgetResponse:
        request = pb.FreezeBudgetRequest(id=budget_id, reason=reason)
        return self._call(self._stub.FreezeBudget, request)

    def unfreeze_budget(self, budget_id: str) -> pb.UpdateBudgetResponse:
        return self._call(self._stub.UnfreezeBudget, pb.UnfreezeBudgetRequest(id=budget_id))

    def delete_budget(self, budget_id: str) -> pb.DeleteBudgetResponse:
        return self._call(self._stub.DeleteBudget, pb.DeleteBudgetRequest(id=budget_id))

    def list_alerts(
        self, budget_id: str, *, wanted: int | None, page_size: int
    ) -> tuple[list[pb.Alert], bool]:
        def page(token: str, size: int) -> tuple[Sequence[pb.Alert], str]:
            request = pb.ListAlertsRequest(budget_id=budget_id, page_size=size, page_token=token)
            response = self._call(self._stub.ListAlerts, request)
            return response.alerts, response.next_page_token

        return collect(page, wanted=wanted, page_size=page_size)

    def watch_budgets(self, prefix: str) -> EventStream:
        """The events of budgets under `prefix`, as they happen; see EventStream."""
        request = pb.WatchBudgetsRequest(prefix=prefix)
        call = self._stub.WatchBudgets(request, metadata=self.metadata)
        return EventStream(call, self.server)

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


class EventStream:
    """One WatchBudgets call: iterate it for events, `cancel()` it from any thread.

    The one call without a deadline: it lasts as long as the watch. Iterating raises
    CtlError when the stream fails (Unreachable once budgetd is gone) and simply stops
    when budgetd ends it, or after `cancel()`.
    """

    def __init__(self, call: grpc.CallIterator[pb.BudgetEvent], server: str) -> None:
        self._call = call
        self._server = server
        self._cancelled = False

    def __iter__(self) -> Iterator[pb.BudgetEvent]:
        try:
            yield from self._call
        except grpc.RpcError as error:
            if not self._cancelled:
                raise from_rpc_error(error, self._server) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped


@contextmanager
def connect(
    server: str,
    timeout_s: float = TIMEOUT_DEFAULT_S,
    *,
    api_key: str = "",
    tls: bool = False,
    tls_ca_file: str = "",
) -> Iterator[Admin]:
    """A channel to budgetd; connecting happens at the first call, under its deadline."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    if tls or tls_ca_file:
        try:
            root = Path(tls_ca_file).read_bytes() if tls_ca_file else None
        except OSError as exc:
            raise Unreachable(f"cannot read the CA bundle {tls_ca_file!r}: {exc.strerror}") from exc
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
        with grpc.secure_channel(server, credentials) as channel:
            yield Admin(channel, server, timeout_s, metadata)
        return
    with grpc.insecure_channel(server) as channel:
        yield Admin(channel, server, timeout_s, metadata)


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
