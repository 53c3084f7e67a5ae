"""Prometheus metrics, scraped over HTTP from a real server."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.config import ServerConfig
from tests.support.ledger import create
from tests.support.servers import Stubs, stubs


@pytest.fixture
async def measured(db_url: str) -> AsyncIterator[tuple[BudgetServer, Stubs]]:
    config = ServerConfig(
        listen="127.0.0.1:0", db_url=db_url, metrics_listen="127.0.0.1:0", insecure=True
    )
    async with BudgetServer(config) as server, stubs(server.address) as api:
        yield server, api


async def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_outcomes_latency_streams_and_utilisation_are_exported(
    measured: tuple[BudgetServer, Stubs],
) -> None:
    server, api = measured
    assert server.metrics_port > 0
    await create(api, "metrics:a", 1000)
    one = await api.budget.Reserve(pb.ReserveRequest(budget_id="metrics:a", amount=600))
    await api.budget.Commit(pb.CommitRequest(reservation_id=one.reservation.id, amount=250))
    two = await api.budget.Reserve(pb.ReserveRequest(budget_id="metrics:a", amount=700))
    with pytest.raises(grpc.aio.AioRpcError):
        await api.budget.Reserve(pb.ReserveRequest(budget_id="metrics:a", amount=100))
    await api.budget.Release(pb.ReleaseRequest(reservation_id=two.reservation.id))
    call = api.budget.Meter()
    await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id="metrics:a", model="m")))
    await call.read()

    samples = await _scrape(server.metrics_port)

    def outcome(name: str) -> float:
        return samples[("budgetd_reservations_total", (("outcome", name),))]

    assert (outcome("granted"), outcome("refused")) == (3, 1)
    assert (outcome("committed"), outcome("released")) == (1, 1)
    assert samples[("budgetd_open_meter_streams", ())] == 1
    assert samples[("budgetd_grant_latency_seconds_count", ())] == 4
    assert samples[("budgetd_sql_transaction_seconds_count", ())] >= 6
    assert samples[("budgetd_budget_utilisation_ratio", (("budget", "metrics:a"),))] == 0.25

    await api.admin.FreezeBudget(pb.FreezeBudgetRequest(id="metrics:a"))
    assert (await asyncio.wait_for(call.read(), 5)).WhichOneof("event") == "abort"
    call.cancel()
    samples = await _scrape(server.metrics_port)
    aborts = samples[("budgetd_meter_aborts_total", (("reason", "ABORT_REASON_FROZEN"),))]
    assert aborts == 1
