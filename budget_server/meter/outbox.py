"""What one meter stream has to tell its client, written in order as soon as it is decided.

The session decides things (opened, granted, alert, abort, committed) from the stream's own
messages, from an extension finishing, or from a freeze on the bus, and must not wait for
the client's next message to say them. An asyncio.Queue drained by the handler did that at
~3.3 KB per stream, plus a second task per stream to read the client's messages while the
handler waited on the queue. Here the handler reads the client's messages itself, and a
writer task exists only while there is something to write: events are rare (a handful per
stream), so an idle open stream costs no task and no queue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb

log = logging.getLogger("budgetd.meter")


class Outbox:
    """Writes one stream's events with `context.write`, one at a time, in order."""

    __slots__ = ("_context", "_inline", "_pending", "_writer", "closed")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._pending: list[pb.MeterEvent] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._inline = False  # send_last is writing from the handler
        self.closed = False  # the call can no longer be written to; events are dropped

    def put(self, event: pb.MeterEvent) -> None:
        """Queue `event`; it goes out on the next turn of the event loop, after any queued
        before it."""
        if self.closed:
            return
        if self._pending is None:
            self._pending = [event]
        else:
            self._pending.append(event)
        if self._writer is None and not self._inline:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def drained(self) -> None:
        """Wait until everything put so far is written (or the call broke). The writer is
        awaited without a shield: if this waiter is cancelled, the call is over and close()
        would cancel the writer anyway."""
        while self._writer is not None:
            await self._writer

    async def send_last(self, event: pb.MeterEvent) -> None:
        """Write the call's last event after anything queued, and wait until all is
        written. The handler waits here anyway, so with nothing queued the event is written
        from the handler itself rather than from a task of its own (one per call saved)."""
        if self._writer is None and not self.closed:
            self._inline = True  # anything put meanwhile waits behind this event
            try:
                await self._send(event)
            finally:
                self._inline = False
            if self._pending:
                self._writer = asyncio.get_running_loop().create_task(self._write())
        else:
            self.put(event)
        await self.drained()

    def close(self) -> None:
        """The call is over: stop writing, drop what is left."""
        self.closed = True
        self._pending = None
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None

    async def _write(self) -> None:
        try:
            while self._pending:
                event = self._pending.pop(0)
                if not self._pending:
                    self._pending = None
                await self._send(event)
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None

    async def _send(self, event: pb.MeterEvent) -> None:
        try:
            await self._context.write(event)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the call ended under us (client gone, server stopping)
            log.debug("meter event not written: %r", error)
            self.closed = True
            self._pending = None
