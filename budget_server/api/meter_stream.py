"""BudgetService.Meter: a bidirectional stream per LLM response.

The handler reads the client's messages (open, cumulative usage, finish) with
`context.read` and feeds the session; what the session has to say goes through its Outbox,
which writes it at once with `context.write` from a short-lived task (the last event,
committed, from the handler itself, which waits for it anyway). The handler is a
plain coroutine (grpc.aio's reader-writer API), not a generator: every message used to
pass through four generators (grpc's request iterator, the auth guard's check of the open
message, the servicer and this handler), each resumed per message. An abort is written
the moment the session decides it (from a usage message, an extension that ended, or a
freeze on the bus), not when the next client message happens to arrive, and an idle open
stream holds no task, no queue and no timer: heartbeats come from one loop for the whole
process (Heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.convert import usage_from_pb
from budget_server.api.handlers import MalformedRequest
from budget_server.api.status import abort
from budget_server.auth.guard import current_key_id, current_open_check
from budget_server.errors import InvalidArgument, LedgerError
from budget_server.ledger.ledger import Ledger
from budget_server.meter.heartbeat import Heartbeat
from budget_server.meter.outbox import Outbox
from budget_server.meter.policy import GrantPolicy
from budget_server.meter.registry import SessionRegistry
from budget_server.meter.session import MeterSession

log = logging.getLogger("budgetd.meter")

# What `context.read` returns for a message (decoded or not); anything else is the end.
_MESSAGE_TYPES = (pb.MeterRequest, MalformedRequest)


class MeterStreams:
    """Serves Meter calls; keeps the open sessions so freezes can abort them."""

    def __init__(self, ledger: Ledger, policy: GrantPolicy, registry: SessionRegistry) -> None:
        self._ledger = ledger
        self._policy = policy
        self.registry = registry
        self.heartbeat = Heartbeat(policy.heartbeat_ms)
        self._serving = 0
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    async def closed(self, timeout_s: float = 10.0) -> None:
        """Wait until every stream, including those the server just cancelled, has ended
        and persisted its usage (grpc.aio cancels handlers without waiting for them)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), timeout_s)

    async def serve(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        key_id = current_key_id.get()
        try:
            self.registry.admit(key_id)
        except LedgerError as error:
            await abort(context, error)
        self._serving += 1
        self._all_closed.clear()
        outbox = Outbox(context)
        session = MeterSession(self._ledger, self._policy, outbox.put)
        try:
            failure = await self._read(context, session, outbox)
            await outbox.drained()  # everything said before the status goes out
            if failure is not None:
                await abort(context, failure)
        finally:
            outbox.close()
            self.heartbeat.remove(session)
            self.registry.remove(session)
            self.registry.release(key_id)
            if session.close_at_once():
                self._one_closed()
            else:
                # Shielded: a cancelled call must still leave the reservation resumable
                # and its last usage on record; shutdown waits for it (closed()).
                closing = asyncio.ensure_future(session.close())
                closing.add_done_callback(self._one_closed)
                await asyncio.shield(closing)

    def _one_closed(self, _closing: asyncio.Future[None] | None = None) -> None:
        self._serving -= 1
        if not self._serving:
            self._all_closed.set()

    async def _read(
        self, context: grpc.aio.ServicerContext[Any, Any], session: MeterSession, outbox: Outbox
    ) -> LedgerError | None:
        """Feed the client's messages to the session until it finishes or the stream ends;
        the error to end the call with, if any."""
        try:
            while True:
                request = await context.read()
                if not isinstance(request, _MESSAGE_TYPES):
                    break  # grpc.aio.EOF: the client closed its side
                if isinstance(request, MalformedRequest):
                    raise InvalidArgument(request.message)
                kind = request.WhichOneof("msg")
                if session.state == "unopened":
                    if kind != "open":
                        raise InvalidArgument("the first message of a meter stream must be open")
                    if (check_scope := current_open_check.get()) is not None:
                        await check_scope(request.open)
                    opened = await session.open(request.open)
                    self.registry.add(session)
                    self.heartbeat.add(session)
                    outbox.put(pb.MeterEvent(opened=opened))
                elif kind == "open":
                    raise InvalidArgument("the stream is already open; send open only once")
                elif kind == "usage":
                    session.on_usage(usage_from_pb(request.usage.usage))
                elif kind == "finish":
                    final = usage_from_pb(request.finish.usage, "finish.usage")
                    self.heartbeat.remove(session)  # the commit persists it from here on
                    committed = await session.finish(request.finish, final)
                    await outbox.send_last(pb.MeterEvent(committed=committed))
                    break
                else:
                    raise InvalidArgument("empty meter message: set open, usage or finish")
        except LedgerError as error:
            return error
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("meter stream failed")
            return LedgerError("internal error; see the server log")
        return None
