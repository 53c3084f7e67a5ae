"""Run the fake OpenAI app on a loopback port in a background thread.

A thread (not a subprocess) so tests read records in-process without
serialisation, and (not the test's own event loop) so a sync `openai.OpenAI`
client can block on it and server timing does not depend on how busy the
test's loop is. The socket is bound before the thread starts, so the port is
known even when 0 was asked for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from budget_client.testing._fake_openai import FakeConfig, create_app
from budget_client.testing._paced import CONNECTION_STATE
from budget_client.testing._records import RecordStore, RequestRecord
from budget_client.testing._styles import TEXT_STYLES
from budget_client.testing._tokens import get_encoding

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop when it is installed, as budgetd runs: how soon the fake notices a client
    closing its stream is part of what the abort benchmarks measure, so the fake should not
    be the slowest process in the room."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


class ConnectionInState(H11Protocol):
    """uvicorn's h11 protocol, putting itself in each request's scope state so that the
    app can see whether the client has closed the connection (`_paced.closing_check`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app_state = {**self.app_state, CONNECTION_STATE: self}


class FakeOpenAIServer:
    """An OpenAI-compatible chat completions server for tests, benchmarks and demos.

    `with FakeOpenAIServer(tokens=2000, tokens_per_second=200) as srv:` then point
    `openai.OpenAI(base_url=srv.base_url, api_key="test")` at it. Per request,
    the SDK's `extra_headers={"x-fake-tokens": "50", "x-fake-rate": "0",
    "x-fake-style": "emoji"}` override the defaults, and `max_tokens` caps them.

    Leaving an SDK stream with `break` does not close it: the connection stays
    open and this server keeps sending (the record shows `disconnected=False` and
    a growing `tokens_sent`) until `stream.close()` or the garbage collector
    closes the response. That is the SDK's behaviour against the real API too.
    """

    def __init__(
        self,
        tokens: int = 256,
        tokens_per_second: float = 0.0,
        style: str = "english",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if style not in TEXT_STYLES:
            raise ValueError(f"unknown text style {style!r}; expected one of {TEXT_STYLES}")
        if tokens < 0 or tokens_per_second < 0:
            raise ValueError("tokens and tokens_per_second must be >= 0")
        self.config = FakeConfig(tokens, float(tokens_per_second), style)
        self._store = RecordStore()
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._shutdown: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._exited: concurrent.futures.Future[None] = concurrent.futures.Future()

    # -- addresses ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one once started, also when 0 was asked for)."""
        return self._port

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        """What to pass as the SDK's `base_url`."""
        return self.url + "/v1"

    @property
    def records_url(self) -> str:
        """GET: the records as a JSON list; DELETE: forget them."""
        return self.url + "/_fake/records"

    # -- records -----------------------------------------------------------------

    @property
    def records(self) -> list[RequestRecord]:
        """Snapshots of every request so far, oldest first."""
        return self._store.snapshot()

    def clear_records(self) -> None:
        self._store.clear()

    def wait_for(
        self, predicate: Callable[[RequestRecord], bool], timeout: float = 5.0
    ) -> RequestRecord:
        """Block until a record matches, e.g. `lambda r: r.request_id == cid and r.finished_at`."""
        return self._store.wait_for(predicate, timeout)

    async def wait_for_async(self, predicate: Callable[[RequestRecord], bool]) -> RequestRecord:
        """`wait_for` that keeps the caller's event loop running (its client may need it).

        No timeout argument, asyncio style: wrap it in `asyncio.timeout(...)`.
        """
        while True:
            for record in self._store.snapshot():
                if predicate(record):
                    return record
            await asyncio.sleep(0.001)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        self._spawn()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._check_started():
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError("fake OpenAI server did not start in time")
            time.sleep(0.002)
        return self

    def stop(self) -> None:
        """End in-flight responses, close every connection and join the thread."""
        thread = self._thread
        if thread is None:
            return
        self._request_exit()
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("fake OpenAI server thread did not stop")
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeOpenAIServer:
        self._spawn()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._check_started():
            if time.monotonic() >= deadline:
                await self.__aexit__(None, None, None)
                raise RuntimeError("fake OpenAI server did not start in time")
            await asyncio.sleep(0.002)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        thread = self._thread
        if thread is None:
            return
        self._request_exit()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_TIMEOUT):
                await asyncio.wrap_future(self._exited)
        self.stop()  # joins (instantly, or raises if the thread hangs)

    # -- internals ---------------------------------------------------------------

    def _spawn(self) -> None:
        if self._thread is not None:
            raise RuntimeError("fake OpenAI server already started")
        get_encoding()  # load the vocabulary now, not inside the first request's latency
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections
        # only when the listener's proto says TCP, and proto 0 would leave Nagle on,
        # which holds small writes ~40 ms for the peer's delayed ACK and merges chunks.
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._failure = None
        self._exited = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"fake-openai:{self._port}", daemon=True
        )
        self._thread.start()

    def _check_started(self) -> bool:
        server = self._server
        if server is not None and server.started:
            return True
        thread = self._thread
        if thread is not None and not thread.is_alive():
            self._thread = None
            raise RuntimeError("fake OpenAI server failed to start") from self._failure
        return False

    def _run(self, sock: socket.socket) -> None:
        try:
            _run_loop(self._serve(sock))
        except BaseException as exc:  # reported by start(); uvicorn fails with sys.exit()
            self._failure = exc
        finally:
            sock.close()
            self._loop = self._server = self._shutdown = None
            self._exited.set_result(None)

    async def _serve(self, sock: socket.socket) -> None:
        shutdown = asyncio.Event()
        config = uvicorn.Config(
            create_app(self.config, self._store, shutdown),
            log_config=None,  # never reconfigure the host process's logging
            access_log=False,
            lifespan="off",
            http=ConnectionInState,
            ws="none",
        )
        server = uvicorn.Server(config)
        self._loop, self._shutdown, self._server = asyncio.get_running_loop(), shutdown, server
        await server.serve(sockets=[sock])

    def _request_exit(self) -> None:
        loop, server, shutdown = self._loop, self._server, self._shutdown
        if loop is None or server is None or shutdown is None:
            return

        def exit_now() -> None:
            shutdown.set()
            server.should_exit = True

        with contextlib.suppress(RuntimeError):  # loop already closed: thread is ending
            loop.call_soon_threadsafe(exit_now)
