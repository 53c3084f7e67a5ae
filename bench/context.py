"""What a benchmark run is given: its mode's settings, where logs and results go, and the
helpers every measure uses to set budgets up on any kind of server."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import procs
from bench.procs import Service
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc

HUGE_LIMIT_TOKENS = 2**50  # a budget that never runs out: nothing is aborted


@dataclass(frozen=True)
class Settings:
    """How long and how big each measure runs in one mode."""

    mode: str
    reps: int
    """budgetd and its limit run this many times each, in alternating order."""
    concurrent: bool = False
    """Run the measures at the same time (smoke mode: checks that everything runs, in
    seconds; the figures are then meaningless)."""
    flood_streams: tuple[int, ...] = (64, 256)
    flood_s: float = 5.0
    flood_workers: int = 2
    requests_streams: int = 256
    requests_s: float = 5.0
    requests_warmup_s: float = 1.0
    requests_workers: int = 2
    many_budgets: int = 1000
    backends: tuple[str, ...] = ("sqlite", "postgres")
    abort_probes: int = 300
    """Probes per condition (server x load), split over the repetitions."""
    abort_blocks: int = 6
    """Probes run in blocks, budgetd's and the limits' alternating, so that a burst of noise
    from the rest of the machine lands on both rather than on one."""
    abort_concurrency: int = 8
    abort_rate: float = 200.0
    abort_grant_tokens: int = 24
    abort_loads: tuple[float, ...] = (0.0, 0.5)
    """Background load, as a share of budgetd's peak absorbed usage rate (measure 1)."""
    echo_s: float = 4.0
    """Bare round trips are timed for this long per repetition and load."""
    paced_streams: int = 64
    paced_workers: int = 2
    overage_budget_tokens: int = 60_000
    overage_reps: int = 3
    """Each repetition spends a fresh budget to the end; per-stream figures are pooled."""
    overage_processes: int = 4
    overage_streams_per_process: int = 16
    overage_rate: float = 50.0
    overage_tokens: tuple[int, int] = (200, 4000)
    overage_bare_abort_at: tuple[int, int] = (100, 400)
    """Where the bare server cuts each stream off in overage's same-run limit."""
    client_cost_module: str = "bench.client_cost"
    """bench.client_cost checks exactness after every chunk (quadratic: a minute at 8,000
    tokens here); bench.cost_sampled after every 40th."""
    client_cost_args: tuple[str, ...] = ()
    hold_streams: int = 10_000
    hold_workers: int = 4
    hold_channels: int = 16
    """Connections per load generator: 10,000 streams over 64 connections stay under
    budgetd's 250 streams per connection."""
    hold_rounds: int = 3
    hold_settle_s: float = 2.0
    """Pause before each RSS reading, for the server to finish what opening set off."""
    hold_idle_s: float = 6.0
    """Window over which the server's CPU is read while the streams sit open (longer than
    budgetd's 5 s heartbeat, so that one heartbeat of every stream falls in it)."""


MODES = {
    "full": Settings(mode="full", reps=3),
    "quick": Settings(
        mode="quick",
        reps=1,
        flood_s=1.5,
        requests_s=1.0,
        requests_warmup_s=0.5,
        abort_probes=40,
        abort_blocks=2,
        echo_s=1.0,
        overage_budget_tokens=8_000,
        overage_reps=1,
        overage_bare_abort_at=(30, 120),
        client_cost_module="bench.cost_sampled",
        client_cost_args=("--runs", "3", "--naive-chunks", "100"),
        hold_streams=2000,
        hold_rounds=2,
        hold_settle_s=1.0,
        hold_idle_s=1.0,
    ),
    "smoke": Settings(
        mode="smoke",
        reps=1,
        concurrent=True,
        flood_streams=(16,),
        flood_s=0.5,
        flood_workers=1,
        requests_streams=16,
        requests_s=1.0,
        requests_warmup_s=0.2,
        requests_workers=1,
        many_budgets=20,
        backends=("sqlite",),
        abort_probes=6,
        abort_blocks=1,
        abort_concurrency=3,
        abort_loads=(0.0,),
        echo_s=0.5,
        paced_streams=8,
        paced_workers=1,
        overage_budget_tokens=1_500,
        overage_reps=1,
        overage_processes=1,
        overage_streams_per_process=4,
        overage_rate=400.0,
        overage_tokens=(200, 600),
        overage_bare_abort_at=(20, 60),
        client_cost_module="bench.cost_sampled",
        client_cost_args=("--tokens", "2000", "--runs", "1", "--naive-chunks", "20"),
        hold_streams=200,
        hold_workers=1,
        hold_channels=2,
        hold_rounds=1,
        hold_settle_s=0.5,
        hold_idle_s=0.5,
    ),
}


@dataclass
class Run:
    """One benchmark run: settings, directories, and what earlier measures found."""

    settings: Settings
    log_dir: Path
    profile_dir: Path | None = None
    """Where py-spy profiles of budgetd go (None: no profiling)."""
    api_keys: bool = True
    """Run budgetd with API keys, as in production (else --insecure)."""
    results: dict[str, Any] = field(default_factory=dict)

    async def budgetd(self, stack: AsyncExitStack, backend: str, name: str) -> Service:
        """A budgetd on a fresh database, stopped (and the database dropped) with `stack`."""
        url = await stack.enter_async_context(procs.fresh_database(backend, self.log_dir, name))
        service = await procs.start_budgetd(url, self.log_dir, name, api_keys=self.api_keys)
        stack.push_async_callback(service.stop)
        return service

    async def bare(self, stack: AsyncExitStack, name: str = "bare") -> Service:
        service = await procs.start_bare(self.log_dir, name=name)
        stack.push_async_callback(service.stop)
        return service

    async def naive(self, stack: AsyncExitStack, backend: str, name: str) -> Service:
        url = await stack.enter_async_context(procs.fresh_database(backend, self.log_dir, name))
        service = await procs.start_bare(self.log_dir, naive_db=url, name=name)
        stack.push_async_callback(service.stop)
        return service

    async def fake_openai(self, stack: AsyncExitStack) -> Service:
        service = await procs.start_fake_openai(self.log_dir)
        stack.push_async_callback(service.stop)
        return service


# ----------------------------------------------------------------------------- admin calls


async def create_budgets(
    service: Service, ids: Sequence[str], limit: int, concurrency: int = 32
) -> None:
    """Create token budgets (HARD, no period) on budgetd, the naive ledger or the bare server."""
    async with grpc.aio.insecure_channel(service.address) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        gate = asyncio.Semaphore(concurrency)

        async def create(budget_id: str) -> None:
            async with gate:
                await admin.CreateBudget(
                    pb.CreateBudgetRequest(
                        id=budget_id, unit=pb.UNIT_TOKENS, limit=limit, mode=pb.MODE_HARD
                    ),
                    metadata=service.metadata,
                )

        await asyncio.gather(*(create(i) for i in ids))


async def create_keys(service: Service, count: int, scope: str) -> list[str | None]:
    """`count` new API keys with `scope` (as many app instances would hold); without API
    keys on the server, `count` Nones."""
    if not service.api_key:
        return [None] * count
    async with grpc.aio.insecure_channel(service.address) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        keys: list[str | None] = []
        for index in range(count):
            response = await admin.CreateKey(
                pb.CreateKeyRequest(name=f"bench-{index}", scopes=[scope]),
                metadata=service.metadata,
            )
            keys.append(response.secret)
        return keys


async def get_budget(service: Service, budget_id: str) -> pb.Budget:
    async with grpc.aio.insecure_channel(service.address) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        response = await admin.GetBudget(
            pb.GetBudgetRequest(budget_id=budget_id), metadata=service.metadata
        )
        return response.budget


async def list_reservations(service: Service, budget_id: str) -> list[pb.Reservation]:
    found: list[pb.Reservation] = []
    async with grpc.aio.insecure_channel(service.address) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        token = ""
        while True:
            page = await admin.ListReservations(
                pb.ListReservationsRequest(budget_id=budget_id, page_size=1000, page_token=token),
                metadata=service.metadata,
            )
            found.extend(page.reservations)
            token = page.next_page_token
            if not token:
                return found


async def verify_ledger(service: Service, budget_id: str) -> pb.VerifyLedgerResponse:
    async with grpc.aio.insecure_channel(service.address) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        response: pb.VerifyLedgerResponse = await admin.VerifyLedger(
            pb.VerifyLedgerRequest(budget_id=budget_id), metadata=service.metadata
        )
        return response


async def fake_records(fake: Service) -> list[dict[str, Any]]:
    """The fake OpenAI server's request records, over HTTP (it runs in its own process)."""
    url = fake.address.removesuffix("/v1") + "/_fake/records"

    def fetch() -> list[dict[str, Any]]:
        with urllib.request.urlopen(url, timeout=30) as response:
            records: list[dict[str, Any]] = json.loads(response.read())
            return records

    return await asyncio.to_thread(fetch)


async def clear_fake_records(fake: Service) -> None:
    url = fake.address.removesuffix("/v1") + "/_fake/records"

    def delete() -> None:
        request = urllib.request.Request(url, method="DELETE")
        with urllib.request.urlopen(request, timeout=30):
            pass

    await asyncio.to_thread(delete)
