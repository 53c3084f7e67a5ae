"""`budgetd serve` as operators run it: banner, health, reflection, signals, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import select

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.config import ServerConfig
from budget_server.db.engine import open_database
from budget_server.db.schema import reservations
from tests.support.ledger import create
from tests.support.servers import start_server_process, stubs

pytestmark = pytest.mark.slow


async def test_health_reflection_and_a_graceful_sigterm(tmp_path: Path) -> None:
    server = await start_server_process(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "budgetd.v1.BudgetService", "budgetd.v1.AdminService"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name async for r in listed for s in r.list_services_response.service}
            assert {"budgetd.v1.BudgetService", "budgetd.v1.AdminService"} <= names
            assert "grpc.health.v1.Health" in names
        assert await server.terminate() == 0
    finally:
        if server.process.returncode is None:
            server.kill()


async def test_sigterm_lets_in_flight_streams_record_their_usage(tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    server = await start_server_process(db_url)
    try:
        async with stubs(server.address) as api:
            await create(api, "serve:a", 100_000)
            call = api.budget.Meter()
            await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id="serve:a", model="m")))
            opened = (await call.read()).opened
            await call.write(
                pb.MeterRequest(usage=pb.MeterUsage(usage=pb.Usage(output_tokens=120)))
            )
            await asyncio.sleep(0.2)
            assert await server.terminate() == 0
    finally:
        if server.process.returncode is None:
            server.kill()
    db = open_database(db_url)
    try:
        async with db.read() as conn:
            row = (
                await conn.execute(
                    select(reservations).where(reservations.c.id == opened.reservation_id)
                )
            ).one()
    finally:
        await db.close()
    # Broken by the shutdown, the stream's last usage is on record and it waits (PENDING)
    # for the client to resume it elsewhere, or for the sweeper to charge that usage.
    assert (row.state, row.output_tokens) == ("PENDING", 120)


async def test_a_second_signal_forces_exit(tmp_path: Path) -> None:
    server = await start_server_process(
        f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "--shutdown-grace", "30"
    )
    try:
        async with stubs(server.address) as api:
            await create(api, "serve:b", 100)
            call = api.budget.Meter()  # an open stream keeps the graceful stop waiting
            await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id="serve:b", model="m")))
            await call.read()
            server.process.send_signal(signal.SIGINT)
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(server.process.wait(), 10)
            assert code == 128 + signal.SIGINT
    finally:
        if server.process.returncode is None:
            server.kill()


async def test_stop_waits_for_cancelled_streams_to_persist(db_url: str) -> None:
    config = ServerConfig(listen="127.0.0.1:0", db_url=db_url, insecure=True)
    server = BudgetServer(config)
    await server.start()
    async with stubs(server.address) as api:
        await create(api, "serve:c", 100_000)
        call = api.budget.Meter()
        await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id="serve:c", model="m")))
        opened = (await call.read()).opened
        await call.write(pb.MeterRequest(usage=pb.MeterUsage(usage=pb.Usage(output_tokens=77))))
        await asyncio.sleep(0.1)
        await server.stop(grace_s=0)
    db = open_database(db_url)
    try:
        async with db.read() as conn:
            row = (
                await conn.execute(
                    select(reservations).where(reservations.c.id == opened.reservation_id)
                )
            ).one()
    finally:
        await db.close()
    assert row.output_tokens == 77


async def test_start_up_failures_are_one_line_and_leave_no_admin_key(tmp_path: Path) -> None:
    """A port in use, an address that is not one, a database that cannot be opened: a
    sentence saying which, not a traceback; and no admin key made for a server that did
    not start."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (f"127.0.0.1:{port}", f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", "cannot listen on"),
            ("nonsense", f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "cannot listen on"),
            ("127.0.0.1:0", "sqlite+aiosqlite:////nonexistent-dir/c.db", "cannot use the database"),
        ]
        for listen, db_url, words in cases:
            key_file = tmp_path / "admin.key"
            argv = ["serve", "--listen", listen, "--db", db_url, "--admin-key-file", str(key_file)]
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "budget_server.cli", *argv],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, done.stderr
            assert f"budgetd: {words}" in done.stderr
            assert "Traceback" not in done.stderr
            assert not key_file.exists()


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--shutdown-grace", "-1"], {}, "--shutdown-grace: '-1': must be at least 0"),
        (["--webhook-attempts", "0"], {}, "--webhook-attempts: '0': must be at least 1"),
        ([], {"BUDGETD_SWEEP_INTERVAL": "soon"}, "--sweep-interval: 'soon' is not a number"),
    ],
)
def test_bad_numbers_in_flags_and_environment_are_usage_errors(
    argv: list[str], env: dict[str, str], words: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "budget_server.cli", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 2
    assert words in done.stderr
    assert "Traceback" not in done.stderr
