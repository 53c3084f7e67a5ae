"""Helpers for meter-stream tests: raw Meter calls, waiting on what the server did, SQL counts.

The meter protocol sends no reply to a usage message, so a test cannot learn from the
stream that the server has taken a message in. Where it must know (before cancelling a
stream, or before it stops counting SQL), it looks at the in-process server instead:
the live session's usage, or the reservation's row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from sqlalchemy import event, select
from sqlalchemy.engine import Row

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.db.schema import reservations
from budget_server.meter.policy import GrantPolicy
from budget_server.meter.session import MeterSession
from tests.support.ledger import all_entries
from tests.support.servers import Stubs

WAIT_S = 5.0
"""Longest wait for anything a test expects the server to do (each test stays under it)."""

MeterCall = grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent]


DEFAULT_POLICY = GrantPolicy()


def refill_mark(grant: int) -> int:
    """The first output count at which a server on the default policy extends a grant in
    the background (and the report mark it names for a grant that can still grow)."""
    return -(-grant * DEFAULT_POLICY.refill_at_pct // 100)


def open_request(
    budget_id: str,
    *,
    prompt_tokens: int = 0,
    max_output_tokens: int = 0,
    model: str = "gpt-4o",
    resume_reservation_id: str = "",
) -> pb.MeterRequest:
    return pb.MeterRequest(
        open=pb.MeterOpen(
            budget_id=budget_id,
            model=model,
            prompt_tokens_estimate=prompt_tokens,
            max_output_tokens=max_output_tokens,
            resume_reservation_id=resume_reservation_id,
        )
    )


def usage_request(
    input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
) -> pb.MeterRequest:
    return pb.MeterRequest(
        usage=pb.MeterUsage(
            usage=pb.Usage(
                input_tokens=input_tokens,
                cached_input_tokens=cached_input_tokens,
                output_tokens=output_tokens,
            )
        )
    )


def finish_request(
    input_tokens: int = 0, output_tokens: int = 0, *, provider: bool = False
) -> pb.MeterRequest:
    return pb.MeterRequest(
        finish=pb.MeterFinish(
            usage=pb.Usage(input_tokens=input_tokens, output_tokens=output_tokens),
            has_provider_usage=provider,
        )
    )


async def next_event(call: MeterCall, timeout_s: float = WAIT_S) -> pb.MeterEvent:
    """The server's next event; fails on end of stream or when none comes in time."""
    event_ = await asyncio.wait_for(call.read(), timeout_s)
    assert isinstance(event_, pb.MeterEvent), "the server ended the meter stream"
    return event_


async def open_stream(api: Stubs, request: pb.MeterRequest) -> tuple[MeterCall, pb.MeterOpened]:
    call = api.budget.Meter()
    await call.write(request)
    first = await next_event(call)
    assert first.WhichOneof("event") == "opened", first
    return call, first.opened


async def wait_until(
    predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S, pause_s: float = 0.002
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        outcome = predicate()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return outcome
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(pause_s)


def live_session(server: BudgetServer, budget_id: str, reservation_id: str) -> MeterSession | None:
    for session in server.sessions.sessions_of({budget_id}):
        if session.reservation_id == reservation_id:
            return session
    return None


async def wait_session_usage(
    server: BudgetServer, budget_id: str, reservation_id: str, output_tokens: int
) -> MeterSession:
    """Wait until the server's live session has taken in usage up to `output_tokens`."""

    def reached() -> MeterSession | None:
        session = live_session(server, budget_id, reservation_id)
        if session is not None and session.usage.output_tokens >= output_tokens:
            return session
        return None

    session: MeterSession = await wait_until(
        reached, f"the server to see {output_tokens} output tokens on {reservation_id}"
    )
    return session


async def reservation_row(server: BudgetServer, reservation_id: str) -> Row[Any]:
    assert server.db is not None
    async with server.db.read() as conn:
        return (
            await conn.execute(select(reservations).where(reservations.c.id == reservation_id))
        ).one()


async def wait_entry(
    api: Stubs, budget_id: str, kind: pb.EntryKind.ValueType, reservation_id: str
) -> pb.LedgerEntry:
    """The first ledger entry of `kind` for the reservation, once it exists."""

    async def found() -> pb.LedgerEntry | None:
        for entry in await all_entries(api, budget_id):
            if entry.kind == kind and entry.reservation_id == reservation_id:
                return entry
        return None

    entry: pb.LedgerEntry = await wait_until(
        found, f"a {pb.EntryKind.Name(kind)} entry for {reservation_id}", pause_s=0.01
    )
    return entry


def background_tasks() -> set[asyncio.Task[Any]]:
    """The tasks alive now: call it before opening a stream, so that the server's own
    periodic work (sweeper, webhook delivery, event listeners...) can be told apart from
    whatever the stream sets in motion (its handler, heartbeat, extensions, actors)."""
    return asyncio.all_tasks()


@contextmanager
def sql_statements(server: BudgetServer, background: set[asyncio.Task[Any]]) -> Iterator[list[str]]:
    """Statements the server's engine executes inside the block, except those issued by the
    `background` tasks. SQLAlchemy's asyncio layer runs the DBAPI call inside the awaiting
    task, so `asyncio.current_task()` in the listener names the task that issued it."""
    assert server.db is not None
    engine = server.db.engine.sync_engine
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop in this thread: not the server's doing
            task = None
        if task is None or task not in background:
            name = task.get_name() if task is not None else "(no task)"
            seen.append(f"[{name}] {statement}")

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
