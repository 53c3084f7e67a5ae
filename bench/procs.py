"""The processes of a benchmark run: servers, load generators and fresh databases.

Servers announce themselves on their first stdout line (`... listening on HOST:PORT`, or
the fake OpenAI server's base URL). Load generators (`python -m bench.worker SPEC`) speak
a line protocol: they print `ready` once connected and set up, then answer each command
line (`go {json}`) with one JSON line, so several of them can be started together and each
phase can be timed from outside; closing their stdin ends them. Every process started here
is stopped here, by its own pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

_LISTENING = re.compile(r"listening on (\S+)")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

PG_HOST = os.environ.get("BUDGETD_BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BUDGETD_BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BUDGETD_BENCH_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("BUDGETD_BENCH_PG_DB", "postgres")

_CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@dataclass
class Service:
    """A server process and the address it listens on."""

    name: str
    process: asyncio.subprocess.Process
    address: str
    log_path: Path
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)
    api_key: str | None = None
    """What clients send as `authorization: Bearer ...` (budgetd with API keys)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def start_service(name: str, argv: Sequence[str], log_dir: Path) -> Service:
    """Start `python argv...` and wait for its `listening on` (or `http://...`) line."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
            env=_CHILD_ENV,
        )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)).decode()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"{name} did not start in {START_TIMEOUT_S} s; see {log_path}") from None
    match = _LISTENING.search(line)
    address = match.group(1) if match else line.strip()
    if not address or (match is None and not address.startswith("http")):
        process.kill()
        await process.wait()
        raise RuntimeError(f"{name} did not start ({line!r}): {log_path.read_text()[-2000:]}")
    drain = asyncio.get_running_loop().create_task(_drain(process.stdout))
    return Service(name, process, address, log_path, drain)


def budgetd_has_api_keys() -> bool:
    """Whether this budgetd checks API keys (`serve --admin-key-file` exists)."""
    from budget_server.cli import build_parser

    parser = build_parser()
    serve = next(
        action.choices["serve"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return any("--admin-key-file" in action.option_strings for action in serve._actions)


async def start_budgetd(
    db_url: str, log_dir: Path, name: str = "budgetd", *, api_keys: bool = True
) -> Service:
    """budgetd as it would run in production: with API keys when it has them (the first
    admin key, written at start, is what the benchmark's clients send), else --insecure."""
    argv = ["-m", "budget_server.cli", "serve", "--listen", "127.0.0.1:0", "--db", db_url]
    argv += ["--log-level", "warning"]
    key_path = log_dir / f"{name}-{secrets.token_hex(3)}.key"
    if api_keys:
        argv += ["--admin-key-file", str(key_path)]
    elif budgetd_has_api_keys():
        argv += ["--insecure"]
    service = await start_service(name, argv, log_dir)
    if api_keys:
        service.api_key = key_path.read_text().strip()
    return service


async def start_bare(log_dir: Path, naive_db: str | None = None, name: str = "bare") -> Service:
    argv = ["-m", "bench.bare_server", "--listen", "127.0.0.1:0"]
    if naive_db:
        argv += ["--naive-db", naive_db]
    return await start_service(name, argv, log_dir)


async def start_fake_openai(
    log_dir: Path, tokens: int = 256, rate: float = 0.0, name: str = "fake-openai"
) -> Service:
    argv = ["-m", "budget_client.testing", "--port", "0", "--tokens", str(tokens)]
    return await start_service(name, [*argv, "--rate", str(rate)], log_dir)


# ----------------------------------------------------------------------------- workers


@dataclass
class Worker:
    """A load-generator process: `ready`, then one JSON answer per command."""

    process: asyncio.subprocess.Process
    spec: dict[str, Any]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ready(self, timeout_s: float) -> dict[str, Any]:
        line = await self._line(timeout_s)
        if not line.startswith("ready"):
            raise RuntimeError(f"worker said {line!r} instead of ready; see {self.log_path}")
        extra = line[len("ready") :].strip()
        result: dict[str, Any] = json.loads(extra) if extra else {}
        return result

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go " + json.dumps(command).encode() + b"\n")

    async def reply(self, timeout_s: float) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self._line(timeout_s))
        return result

    async def close(self) -> None:
        """End the worker: closing stdin tells it to finish and exit."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def _line(self, timeout_s: float) -> str:
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"worker timed out after {timeout_s} s; see {self.log_path}"
            ) from None
        if not raw:
            await self.process.wait()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"worker exited {self.process.returncode}: {tail}")
        return raw.decode().strip()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def start_worker(spec: dict[str, Any], log_dir: Path) -> Worker:
    log_path = log_dir / f"worker-{spec.get('kind', 'x')}-{secrets.token_hex(3)}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.worker",
            json.dumps(spec),
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE,
            stderr=log,
            env=_CHILD_ENV,
            limit=64 * 1024 * 1024,  # an answer can be long (per-stream records)
        )
    return Worker(process, spec, log_path)


class Crew:
    """Several workers driven in lock-step: each command goes to all, then all answers."""

    def __init__(self, members: list[Worker]) -> None:
        self.members = members

    async def command(
        self, command: dict[str, Any] | list[dict[str, Any]], timeout_s: float
    ) -> list[dict[str, Any]]:
        commands = command if isinstance(command, list) else [command] * len(self.members)
        for worker, one in zip(self.members, commands, strict=True):
            worker.send(one)
        return list(await asyncio.gather(*(w.reply(timeout_s) for w in self.members)))

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.members]


@asynccontextmanager
async def crews(
    groups: Sequence[Sequence[dict[str, Any]]], log_dir: Path, ready_timeout_s: float = 120.0
) -> AsyncIterator[list[tuple[Crew, list[dict[str, Any]]]]]:
    """One crew per group of specs, all started at once; each worker is ready when the block
    starts (with what it said when ready) and stopped when it ends."""
    started = [[await start_worker(spec, log_dir) for spec in group] for group in groups]
    everyone = [w for group in started for w in group]
    try:
        readies = await asyncio.gather(*(w.ready(ready_timeout_s) for w in everyone))
        answers = iter(readies)
        yield [(Crew(group), [next(answers) for _ in group]) for group in started]
        await asyncio.gather(*(w.close() for w in everyone))
    finally:
        await asyncio.gather(*(w.kill() for w in everyone), return_exceptions=True)


@asynccontextmanager
async def crew(
    specs: Sequence[dict[str, Any]], log_dir: Path, ready_timeout_s: float = 120.0
) -> AsyncIterator[tuple[Crew, list[dict[str, Any]]]]:
    """Start one worker per spec and wait until every one is ready; stop them all after."""
    async with crews([specs], log_dir, ready_timeout_s) as (only,):
        yield only


# ----------------------------------------------------------------------------- databases


async def _pg_admin() -> asyncpg.Connection:
    return await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=10
    )


@asynccontextmanager
async def fresh_database(backend: str, directory: Path, name: str) -> AsyncIterator[str]:
    """A new SQLite file, or a new PostgreSQL database dropped (with its sessions) after."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / (name + '.db')}"
        return
    db_name = f"budgetd_bench_{name.replace('-', '_')}_{secrets.token_hex(4)}"
    admin = await _pg_admin()
    try:
        await admin.execute(f'CREATE DATABASE "{db_name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{db_name}"
    finally:
        admin = await _pg_admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        finally:
            await admin.close()


async def postgres_unavailable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        connection = await _pg_admin()
    except (OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable: {exc}"
    await connection.close()
    return None
