"""One heartbeat loop for all the meter streams of this process.

A live stream persists its usage and pushes its reservation's expiry every `heartbeat_ms`
(so it never expires while it lives, and a crash loses at most one beat of usage). A task
per stream sleeping in a loop did that at a cost of ~1.7 KB and a timer wake-up per open
stream; with 10,000 mostly idle streams those wake-ups alone took a fifth of a core. Here a
single task sleeps until the next due beat, and streams wait in a timing wheel: buckets of
streams due at the same tick, `TICKS_PER_BEAT` ticks per heartbeat. Each stream still beats
`heartbeat_ms` after its previous beat ended (up to one tick later), as before; a stream
that ends leaves its bucket at once, so nothing keeps an ended stream alive.

Timing runs on the event loop's monotonic clock, as `asyncio.sleep` did: the server's
`Clock` decides expiry, not when work is due (tests move it by hand).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable

from budget_server.meter.session import MeterSession

log = logging.getLogger("budgetd.meter")

TICKS_PER_BEAT = 32
"""Granularity of the wheel: a beat comes at most heartbeat_ms / TICKS_PER_BEAT late, and a
tick beats about 1/TICKS_PER_BEAT of the open streams (~300 of 10,000)."""
BEATS_PER_TURN = 64
"""Beats started per turn of the event loop: starting a tick's beats all at once would hold
the loop for milliseconds at 10,000 streams, and an abort waiting behind them with it."""

_IDLE = -1  # not in the wheel: not yet open, or ended
_BEATING = -2  # its beat is in flight; it goes back in the wheel when that ends


class Heartbeat:
    """Beats the streams it is given until they are taken out."""

    def __init__(self, heartbeat_ms: int) -> None:
        self._interval_s = heartbeat_ms / 1000
        self._tick_s = self._interval_s / TICKS_PER_BEAT
        self._wheel: dict[int, set[MeterSession]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._beats: set[asyncio.Task[None]] = set()  # batches in flight (kept referenced)

    @property
    def streams(self) -> int:
        """Streams waiting for their next beat (those whose beat is in flight excluded)."""
        return sum(len(bucket) for bucket in self._wheel.values())

    def add(self, session: MeterSession) -> None:
        """Beat `session` every heartbeat_ms from now on."""
        self._schedule(session)

    def remove(self, session: MeterSession) -> None:
        """Stop beating `session` (it finished or its stream ended); a beat in flight ends
        on its own and is not repeated."""
        tick = session.beat_tick
        session.beat_tick = _IDLE
        if tick >= 0:
            bucket = self._wheel.get(tick)
            if bucket is not None:
                bucket.discard(session)
                if not bucket:
                    del self._wheel[tick]
        if not self._wheel and self._loop_task is not None:
            # Nothing left to wait for: no task sleeps on behalf of no stream.
            self._loop_task.cancel()
            self._loop_task = None

    def _schedule(self, session: MeterSession) -> None:
        loop = asyncio.get_running_loop()
        # The first tick at or after a full interval from now: never early.
        tick = math.ceil((loop.time() + self._interval_s) / self._tick_s)
        session.beat_tick = tick
        self._wheel.setdefault(tick, set()).add(session)
        if self._loop_task is None:
            self._loop_task = loop.create_task(self._run(), name="meter:heartbeat")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._wheel:
                tick = min(self._wheel)  # at most TICKS_PER_BEAT + 1 keys: cheap
                delay = tick * self._tick_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue  # the wheel may have changed while asleep
                due = self._wheel.pop(tick)
                for session in due:
                    session.beat_tick = _BEATING
                batch = loop.create_task(self._beat_all(due))
                self._beats.add(batch)
                batch.add_done_callback(self._beats.discard)
        finally:
            if self._loop_task is asyncio.current_task():
                self._loop_task = None

    async def _beat_all(self, sessions: Iterable[MeterSession]) -> None:
        """Beat a tick's streams together: their writes queue in their budgets' actors
        together and so share transactions (group commit)."""
        beats: list[asyncio.Future[None]] = []
        for started, session in enumerate(sessions):
            if started and not started % BEATS_PER_TURN:
                await asyncio.sleep(0)  # let the loop serve the streams in between
            beats.append(asyncio.ensure_future(self._beat_one(session)))
        await asyncio.gather(*beats)

    async def _beat_one(self, session: MeterSession) -> None:
        if session.beat_tick != _BEATING:
            return  # removed before its turn came (it is finishing or gone)
        try:
            await session.beat()
        except Exception:  # a stream left out of the wheel would expire while it lives
            log.exception("meter heartbeat failed for %s", session.reservation_id)
        if session.beat_tick == _BEATING:  # not removed meanwhile
            self._schedule(session)
