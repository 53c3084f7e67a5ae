"""budgetd in the test's own event loop, or as separate `budgetd serve` processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc

_BANNER = re.compile(rb"listening on (\S+)")


@dataclass
class Stubs:
    """gRPC stubs on one channel to one server."""

    address: str
    channel: grpc.aio.Channel
    budget: pb_grpc.BudgetServiceStub
    admin: pb_grpc.AdminServiceStub


@asynccontextmanager
async def stubs(address: str) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield Stubs(
            address, channel, pb_grpc.BudgetServiceStub(channel), pb_grpc.AdminServiceStub(channel)
        )


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    address: str
    db_url: str

    def kill(self) -> None:
        """SIGKILL: the crash tests' way to stop a server."""
        self.process.kill()

    async def terminate(self, timeout_s: float = 15) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout_s)


async def start_server_process(
    db_url: str, *extra_args: str, port: int = 0, insecure: bool = True
) -> ServerProcess:
    """Run `budgetd serve` and wait for its banner; it listens on a free loopback port
    (without API keys unless `insecure=False`: tests/test_auth.py covers keys)."""
    if insecure:
        extra_args = ("--insecure", *extra_args)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budget_server.cli",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        db_url,
        "--log-level",
        "warning",
        *extra_args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
    except TimeoutError:
        process.kill()
        raise
    match = _BANNER.search(line)
    if match is None:
        process.kill()
        raise RuntimeError(f"budgetd did not start: {line!r}")
    # Keep reading stdout so the child never blocks on a full pipe.
    asyncio.get_running_loop().create_task(_drain(process.stdout))
    return ServerProcess(process, match.group(1).decode(), db_url)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


@asynccontextmanager
async def server_processes(
    db_url: str, count: int, *extra_args: str, insecure: bool = True
) -> AsyncIterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    try:
        # Started together, as a deployment starts replicas (they take turns migrating).
        outcomes = await asyncio.gather(
            *(start_server_process(db_url, *extra_args, insecure=insecure) for _ in range(count)),
            return_exceptions=True,
        )
        servers.extend(o for o in outcomes if isinstance(o, ServerProcess))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        yield servers
    finally:
        for server in servers:
            if server.process.returncode is None:
                server.kill()
                await server.process.wait()
