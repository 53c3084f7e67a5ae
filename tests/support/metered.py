"""Helpers for the metering tests: drive wrap_openai streams, wait on conditions, read back
what the ledger recorded per reservation, and run in-process budgetd on a chosen port."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from budget_client import BudgetExceeded, Meter
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.clock import Clock
from budget_server.config import ServerConfig
from budget_server.meter.policy import GrantPolicy
from tests.support.ledger import all_entries
from tests.support.servers import Stubs

WAIT_S = 30.0
"""Longest wait for anything these tests expect to happen (each test stays well under it)."""


def free_port() -> int:
    """A loopback port nothing listens on now, for a budgetd that starts later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(
    predicate: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition"
) -> float:
    """Poll `predicate` every 5 ms; return the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@asynccontextmanager
async def inprocess_server(
    db_url: str,
    *,
    port: int = 0,
    clock: Clock | None = None,
    policy: GrantPolicy | None = None,
    sweep_interval_s: float = 0.05,
) -> AsyncIterator[BudgetServer]:
    config = ServerConfig(
        listen=f"127.0.0.1:{port}",
        db_url=db_url,
        sweep_interval_s=sweep_interval_s,
        grant_policy=policy or GrantPolicy(),
        insecure=True,  # loopback, no API keys: tests/test_auth.py covers keys
    )
    async with BudgetServer(config, clock=clock) as running:
        yield running


@dataclass
class StreamOutcome:
    """One metered stream as the app saw it."""

    meter: Meter
    request_id: str = ""
    text: str = ""
    aborted: BudgetExceeded | None = None
    chunks: int = 0
    provider_usage: Any = None


async def consume(stream: Any, outcome: StreamOutcome | None = None) -> StreamOutcome:
    """Read a MeteredAsyncStream to its end (or its abort), keeping what the app received."""
    outcome = outcome or StreamOutcome(stream.meter)
    pieces: list[str] = []
    try:
        async for chunk in stream:
            outcome.request_id = outcome.request_id or chunk.id
            outcome.chunks += 1
            if chunk.usage is not None:
                outcome.provider_usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
    except BudgetExceeded as aborted:
        outcome.aborted = aborted
    outcome.text = "".join(pieces)
    return outcome


@dataclass
class ReservationHistory:
    """What the ledger holds about one reservation: its row and its entries' kinds."""

    reservation: pb.Reservation
    kinds: Counter[str] = field(default_factory=Counter)
    charged_by_entries: int = 0


async def reservations_of(api: Stubs, budget_id: str) -> dict[str, pb.Reservation]:
    found: dict[str, pb.Reservation] = {}
    token = ""
    while True:
        page = await api.admin.ListReservations(
            pb.ListReservationsRequest(budget_id=budget_id, page_size=1000, page_token=token)
        )
        found.update((r.id, r) for r in page.reservations)
        token = page.next_page_token
        if not token:
            return found


async def histories(api: Stubs, budget_id: str) -> dict[str, ReservationHistory]:
    """Every reservation of `budget_id` with the kinds of its ledger entries on that budget."""
    result = {
        rid: ReservationHistory(reservation)
        for rid, reservation in (await reservations_of(api, budget_id)).items()
    }
    for entry in await all_entries(api, budget_id):
        if entry.reservation_id:
            history = result[entry.reservation_id]
            history.kinds[pb.EntryKind.Name(entry.kind).removeprefix("ENTRY_KIND_")] += 1
            history.charged_by_entries += entry.spent_delta
    return result


class TcpProxy:
    """A loopback TCP proxy in front of budgetd that a test can cut and restore: a network
    outage as the client sees it, while budgetd itself keeps running (and sees the client
    go away). `async with TcpProxy(upstream_port) as proxy:` then `proxy.address`."""

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and reset every connection through the proxy."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def __aenter__(self) -> TcpProxy:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        self._writers -= {writer, up_writer}

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.transport.abort()
