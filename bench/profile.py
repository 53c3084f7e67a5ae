"""Optional profiles of budgetd while a measure runs, with py-spy when it is installed.

    python -m bench.profile summarize FILE [--top 25]
    python -m bench.profile summarize RESULTS.json --label "requests/sqlite many"

`record(pid, seconds, path)` samples a running process (py-spy's raw "collapsed stacks"
format: one line per distinct stack, its thread first, frames joined by `;`, then a count;
idle threads are not sampled). `summarize` reads such a file and lists the samples per
thread and the functions that hold the most samples, inclusive (the function or anything
it calls) and self (the function's own code), so a report can say where the time goes.
The benchmark never needs py-spy: without it, no profile is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

_FRAME_FILE = re.compile(r"^(?P<func>.*?) \((?P<file>[^)]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


async def record(pid: int, seconds: float, path: Path, *, idle: bool = False) -> Path | None:
    """Sample `pid` for `seconds` into `path` (collapsed stacks); None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--format", "raw", "--rate", "100", "--nonblocking", "--threads", "-o", str(path)]
    if idle:
        argv.append("--idle")
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await process.wait()
    return None if process.returncode else path


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: one name per function."""
    match = _FRAME_FILE.match(frame)
    if match is None:
        return frame
    parts = Path(match.group("file")).parts
    where = "/".join(parts[-2:]) if len(parts) > 1 else match.group("file")
    return f"{match.group('func')} ({where})"


# Frames every sample of a thread passes through: they say nothing about where time goes.
_BOILERPLATE = (
    "<frozen runpy>",
    "threading.py",
    "asyncio/runners.py",
    "uvloop/__init__.py",
    "budget_server/cli.py",
    "bench/bare_server.py)",
)


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Samples per thread (the event loop's MainThread vs the database driver's threads),
    and the top functions by inclusive and by self samples, in % of all samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            label = frames.pop(0).partition(": ")[2] or "?"
            thread = label.split(" ")[0].rstrip("-0123456789") or label
        frames = [_short(f) for f in frames]
        threads[thread] += count
        total += count
        for frame in {f for f in frames if not any(b in f for b in _BOILERPLATE)}:
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count

    def table(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "threads_pct": table(threads) if total else [],
        "inclusive_pct": table(inclusive) if total else [],
        "self_pct": table(own) if total else [],
    }


def report(path: Path, top: int = 15) -> dict[str, Any]:
    """The summary of a profile, with its raw stacks (a few hundred lines), for the results
    JSON: the file itself lives in the run's temporary directory."""
    return {**summarize(path, top), "stacks": path.read_text().splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["summarize"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--label", help="with a results JSON: MEASURE/PROFILE to summarize")
    args = parser.parse_args()
    path = args.file
    if args.label:  # the stacks kept in a results file
        measure, _, label = args.label.partition("/")
        document = json.loads(path.read_text())
        stacks = document["measures"][measure]["profiles"][label]["stacks"]
        path = Path(tempfile.mkdtemp()) / "stacks.txt"
        path.write_text("\n".join(stacks) + "\n")
    summary = summarize(path, args.top)
    print(f"{summary['samples']} samples")
    for title in ("threads_pct", "inclusive_pct", "self_pct"):
        print(f"\n{title.replace('_pct', '')} %")
        for name, pct in summary[title]:
            print(f"  {pct:5.1f}  {name}")


if __name__ == "__main__":
    main()
