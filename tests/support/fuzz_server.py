"""budgetd in an event loop of its own, on a background thread, for synchronous callers.

Hypothesis' stateful testing is synchronous, so the fuzz tests drive a real in-process
server from the test's thread with grpc's sync stubs. Running the server in-process
(rather than as `budgetd serve`) keeps the test's `ManualClock` in charge of expiry and
lets the test ask the server, in its own loop, whether a meter session has settled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.config import ServerConfig
from tests.support.databases import fresh_database

T = TypeVar("T")

START_S = 60.0
"""Longest wait for the server (and a fresh PostgreSQL database) to come up."""
CALL_S = 30.0
"""Longest wait for one coroutine the test runs in the server's loop."""


class ThreadedServer:
    """A running `BudgetServer`; `run(fn)` executes `fn(server)` in the server's loop."""

    def __init__(self, backend: str, tmp_path: Path, clock: ManualClock, **config: Any) -> None:
        self.backend = backend
        self.clock = clock
        self._tmp_path = tmp_path
        self._config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: BudgetServer | None = None
        self._thread = threading.Thread(target=self._main, name=f"budgetd-{backend}", daemon=True)

    @property
    def address(self) -> str:
        assert self._server is not None
        return self._server.address

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_S):
            raise AssertionError(f"budgetd on {self.backend} did not start in {START_S} s")
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def run(self, fn: Callable[[BudgetServer], Awaitable[T]], timeout_s: float = CALL_S) -> T:
        """Await `fn(server)` in the server's loop and return its result here."""
        assert self._loop is not None
        assert self._server is not None
        server = self._server

        async def call() -> T:
            return await fn(server)

        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            future.cancel()
            raise AssertionError(f"{fn!r} did not finish in {timeout_s} s") from None

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_S)
        assert not self._thread.is_alive(), "budgetd's thread did not stop"
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # pytest's Skipped is a BaseException; re-raised by start
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with fresh_database(self.backend, self._tmp_path) as url:
            config = ServerConfig(listen="127.0.0.1:0", db_url=url, **self._config)
            async with BudgetServer(config, clock=self.clock) as server:
                self._server = server
                self._ready.set()
                await self._stop.wait()


@contextmanager
def threaded_server(
    backend: str, tmp_path: Path, clock: ManualClock, **config: Any
) -> Iterator[ThreadedServer]:
    """A fresh database and a budgetd on it for the duration of the block."""
    server = ThreadedServer(backend, tmp_path, clock, **config)
    try:
        server.start()
        yield server
    finally:
        server.stop()
