"""BudgetService.Meter: a bidirectional stream per LLM response.

A reader task takes the client's messages (open, cumulative usage, finish) and feeds the
session; the handler itself only writes what the session has to say. The two are apart so
that an abort is written the moment the session decides it, not when the next client
message happens to arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.convert import usage_from_pb
from budget_server.api.handlers import MalformedRequest
from budget_server.api.status import abort
from budget_server.auth.guard import current_key_id
from budget_server.errors import InvalidArgument, LedgerError
from budget_server.ledger.ledger import Ledger
from budget_server.meter.policy import GrantPolicy
from budget_server.meter.registry import SessionRegistry
from budget_server.meter.session import MeterSession

log = logging.getLogger("budgetd.meter")

_END = object()  # the reader is done and nothing more will be written


class MeterStreams:
    """Serves Meter calls; keeps the open sessions so freezes can abort them."""

    def __init__(self, ledger: Ledger, policy: GrantPolicy, registry: SessionRegistry) -> None:
        self._ledger = ledger
        self._policy = policy
        self.registry = registry
        self._serving = 0
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    async def closed(self, timeout_s: float = 10.0) -> None:
        """Wait until every stream, including those the server just cancelled, has ended
        and persisted its usage (grpc.aio cancels handlers without waiting for them)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), timeout_s)

    async def serve(
        self,
        requests: AsyncIterator[pb.MeterRequest | MalformedRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.MeterEvent]:
        key_id = current_key_id.get()
        try:
            self.registry.admit(key_id)
        except LedgerError as error:
            await abort(context, error)
        self._serving += 1
        self._all_closed.clear()
        outbox: asyncio.Queue[pb.MeterEvent | LedgerError | object] = asyncio.Queue()
        session = MeterSession(self._ledger, self._policy, outbox.put_nowait)
        reader = asyncio.create_task(self._read(requests, session, outbox))
        try:
            while True:
                item = await outbox.get()
                if item is _END:
                    return
                if isinstance(item, LedgerError):
                    await abort(context, item)
                assert isinstance(item, pb.MeterEvent)
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.registry.remove(session)
            self.registry.release(key_id)
            # Shielded: a cancelled call must still leave the reservation resumable and its
            # last usage on record; shutdown waits for it (closed()).
            closing = asyncio.ensure_future(session.close())
            closing.add_done_callback(self._one_closed)
            await asyncio.shield(closing)

    def _one_closed(self, _closing: asyncio.Future[None]) -> None:
        self._serving -= 1
        if not self._serving:
            self._all_closed.set()

    async def _read(
        self,
        requests: AsyncIterator[pb.MeterRequest | MalformedRequest],
        session: MeterSession,
        outbox: asyncio.Queue[pb.MeterEvent | LedgerError | object],
    ) -> None:
        try:
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    raise InvalidArgument(request.message)
                kind = request.WhichOneof("msg")
                if session.state == "unopened":
                    if kind != "open":
                        raise InvalidArgument("the first message of a meter stream must be open")
                    opened = await session.open(request.open)
                    self.registry.add(session)
                    outbox.put_nowait(pb.MeterEvent(opened=opened))
                elif kind == "open":
                    raise InvalidArgument("the stream is already open; send open only once")
                elif kind == "usage":
                    session.on_usage(usage_from_pb(request.usage.usage))
                elif kind == "finish":
                    final = usage_from_pb(request.finish.usage, "finish.usage")
                    committed = await session.finish(request.finish, final)
                    outbox.put_nowait(pb.MeterEvent(committed=committed))
                    break
                else:
                    raise InvalidArgument("empty meter message: set open, usage or finish")
        except LedgerError as error:
            outbox.put_nowait(error)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("meter stream failed")
            outbox.put_nowait(LedgerError("internal error; see the server log"))
        outbox.put_nowait(_END)
