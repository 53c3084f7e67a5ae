"""Time as a seam: expiry and window rollover are tested with a clock the test moves."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time in microseconds since the Unix epoch."""

    def now_us(self) -> int: ...


class SystemClock:
    """The real clock."""

    def now_us(self) -> int:
        return time.time_ns() // 1000


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start_us: int) -> None:
        self._now_us = start_us

    def now_us(self) -> int:
        return self._now_us

    def advance(self, *, seconds: float = 0, us: int = 0) -> None:
        self._now_us += us + round(seconds * 1_000_000)

    def set(self, now_us: int) -> None:
        self._now_us = now_us
