"""Tests for budget_server.meter.heartbeat and .outbox: the process-wide heartbeat wheel and a
stream's event writer, with stand-ins for the session and the gRPC context."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.meter.heartbeat import Heartbeat
from budget_server.meter.outbox import Outbox
from budget_server.meter.session import MeterSession
from tests.support.meter import wait_until


class _Session:
    """What the Heartbeat uses of a MeterSession."""

    def __init__(self, name: str, *, fail: bool = False) -> None:
        self.reservation_id = name
        self.beat_tick = -1
        self.beats = 0
        self._fail = fail

    async def beat(self) -> None:
        self.beats += 1
        if self._fail:
            raise RuntimeError("boom")


def _as_session(fake: _Session) -> MeterSession:
    return cast(MeterSession, fake)


async def test_every_stream_beats_repeatedly_and_a_removed_one_leaves_no_task() -> None:
    heartbeat = Heartbeat(heartbeat_ms=20)
    one, two = _Session("one"), _Session("two")
    heartbeat.add(_as_session(one))
    heartbeat.add(_as_session(two))
    await wait_until(lambda: one.beats >= 3 and two.beats >= 3, "three beats each")
    heartbeat.remove(_as_session(one))
    assert one.beat_tick == -1
    heartbeat.remove(_as_session(two))
    assert heartbeat.streams == 0
    # No stream left: no loop task sleeps on behalf of none, and no beat is rescheduled.
    await wait_until(lambda: not heartbeat._beats, "beats in flight to end")
    assert heartbeat._loop_task is None
    assert one.beat_tick == two.beat_tick == -1


async def test_a_beat_that_raises_does_not_drop_the_stream() -> None:
    heartbeat = Heartbeat(heartbeat_ms=20)
    failing = _Session("failing", fail=True)
    heartbeat.add(_as_session(failing))
    await wait_until(lambda: failing.beats >= 2, "a second beat after a failed one")
    heartbeat.remove(_as_session(failing))


class _Context:
    """grpc.aio's `write`, as far as the outbox sees it: a write takes turns of the event
    loop, and must not overlap another one on the same call."""

    def __init__(self, *, broken: bool = False) -> None:
        self.written: list[pb.MeterEvent] = []
        self._broken = broken
        self._in_flight = 0
        self.most_in_flight = 0

    async def write(self, message: pb.MeterEvent) -> None:
        self._in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self._in_flight)
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if self._broken:
                raise RuntimeError("RPC already finished")
            self.written.append(message)
        finally:
            self._in_flight -= 1


def _granted(tokens: int) -> pb.MeterEvent:
    return pb.MeterEvent(granted=pb.MeterGranted(granted_output_tokens=tokens))


async def test_outbox_writes_everything_in_order_without_waiting_to_be_asked() -> None:
    context = _Context()
    outbox = Outbox(cast(Any, context))
    outbox.put(_granted(1))
    outbox.put(_granted(2))
    await wait_until(lambda: len(context.written) == 2, "the first two events written")
    outbox.put(_granted(3))  # a new writer once the first one is done
    await outbox.drained()
    assert [e.granted.granted_output_tokens for e in context.written] == [1, 2, 3]
    outbox.close()
    outbox.put(_granted(4))
    await outbox.drained()
    assert len(context.written) == 3


async def test_outbox_of_a_broken_call_drops_events_quietly() -> None:
    outbox = Outbox(cast(Any, _Context(broken=True)))
    outbox.put(_granted(1))
    outbox.put(_granted(2))
    await outbox.drained()
    assert outbox.closed


async def test_outbox_send_last_writes_itself_and_what_comes_meanwhile_waits_behind() -> None:
    context = _Context()
    outbox = Outbox(cast(Any, context))
    # Put while the last event is being written by send_last itself (from its caller).
    asyncio.get_running_loop().call_soon(outbox.put, _granted(2))
    await outbox.send_last(_granted(1))
    assert [e.granted.granted_output_tokens for e in context.written] == [1, 2]
    assert context.most_in_flight == 1  # one write at a time on a call

    busy = _Context()
    outbox = Outbox(cast(Any, busy))
    outbox.put(_granted(1))  # its writer task is still to run: the last event queues behind
    await outbox.send_last(_granted(2))
    assert [e.granted.granted_output_tokens for e in busy.written] == [1, 2]
    assert busy.most_in_flight == 1
