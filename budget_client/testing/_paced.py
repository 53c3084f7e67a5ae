"""An ASGI response written on a schedule, that notices at once when the client leaves.

This is the part of the fake that budgetd's tests lean on: when a client closes
the stream early, the record must say so within milliseconds, and must count
only what was really handed to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from budget_client.testing._records import LiveRecord
from budget_client.testing._wire import Emission, error_body

# Where the server's protocol puts itself in the scope's state (`_server.ConnectionInState`).
CONNECTION_STATE = "budgetd.fake.connection"


def closing_check(scope: Scope) -> Callable[[], bool]:
    """Whether the client has closed the connection (its FIN made asyncio close the
    transport). A write made after that is dropped without a word, so it is not sent."""
    connection: Any = scope.get("state", {}).get(CONNECTION_STATE)
    if connection is None:
        return lambda: False
    return lambda: bool(connection.transport is None or connection.transport.is_closing())


class PacedResponse(Response):
    """Writes emissions on their schedule while watching for the client leaving.

    Starlette's StreamingResponse notices a disconnect only when its next write
    fails, and uvicorn (ASGI 2.3) drops writes to a closed connection silently,
    so a slow stream would go on "sending" to nobody. Here a watcher task waits
    on `receive()` for `http.disconnect` and cancels the writer the moment it
    arrives, stamping the record with the time it learned of the close.
    """

    def __init__(
        self,
        emissions: Iterator[Emission],
        live: LiveRecord,
        shutdown: asyncio.Event,
        headers: Mapping[str, str],
        media_type: str,
    ) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        self._emissions = emissions
        self._live = live
        self._shutdown = shutdown
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._closing = closing_check(scope)
        writer = asyncio.create_task(self._write(send))
        watcher = asyncio.create_task(self._watch(receive))
        stopper = asyncio.create_task(self._shutdown.wait())
        tasks = (writer, watcher, stopper)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                writer.result()  # a bug in the writer must surface as a 500, not vanish
            elif stopper.done() and not watcher.done():
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                await self._end_early(send)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._live.finish()  # no-op unless cancelled by the server

    async def _write(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for emission in self._emissions:
            # Always yields, even when due: lets the watcher cancel us first if the
            # disconnect is already known, instead of writing into a dead socket.
            await asyncio.sleep(max(t0 + emission.due - loop.time(), 0.0))
            if not await self._send_body(send, emission.body, more_body=True):
                return
            self._live.sent(emission.text, emission.tokens, emission.chunk)
        if await self._send_body(send, b"", more_body=False):
            self._live.finish(completed=True)

    async def _send_body(self, send: Send, body: bytes, *, more_body: bool) -> bool:
        """Send, or record the disconnect if the client has closed its side: a write after
        that would be dropped, and the record counts only what really went out."""
        await self._start(send)
        if self._closing():
            self._live.finish(disconnected_at=time.time())
            return False
        await send({"type": "http.response.body", "body": body, "more_body": more_body})
        return True

    async def _start(self, send: Send) -> None:
        if not self._started:
            self._started = True
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._live.completed:
                    self._live.finish(disconnected_at=time.time())
                return

    async def _end_early(self, send: Send) -> None:
        """Server shutdown: cut the body short, or answer 503 if nothing was sent."""
        if self._started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = error_body("The fake OpenAI server is shutting down.")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
