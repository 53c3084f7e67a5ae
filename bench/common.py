"""Small pieces every benchmark process shares: the event loop, statistics, /proc readers."""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
import os
import statistics
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed (as budgetd does), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


def uvloop_version() -> str | None:
    try:
        return importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        return None


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(numerator: float, denominator: float) -> float:
    if not denominator or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def rss_kb(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/<pid>/status), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based, man proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def rounded(value: float, digits: int = 1) -> float | None:
    """JSON has no NaN: a figure that could not be measured is null."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(value, digits)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity (in nested dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
