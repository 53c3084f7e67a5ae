"""Optional profiles of budgetd while a measure runs, with py-spy when it is installed.

    python -m bench.profile summarize FILE [--top 25]
    python -m bench.profile summarize RESULTS.json --label "requests/sqlite many"

`record(pid, seconds, path)` samples a running process (py-spy's raw "collapsed stacks"
format: one line per distinct stack, its thread first, frames joined by `;`, then a count).
Only the thread holding the GIL is sampled (`--gil`): budgetd is one process whose Python
code runs one thread at a time, so the GIL's time is what its throughput is made of, and
py-spy's own idle detection did not hold here (threads blocked in a queue's `get`, such as
aiosqlite's and the SQLite writer's, were half the samples). `summarize` reads such a file
and lists the samples per thread, per layer of budgetd (`LAYERS`), and the functions that
hold the most samples, inclusive (the function or anything it calls) and self (the
function's own code), so a report can say where the time goes. The benchmark never needs
py-spy: without it, no profile is taken.
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


RATE_PER_S = 100  # samples per second while the GIL is held


def recorded_s(seconds: float) -> int:
    """How long `record` samples when asked for `seconds` (py-spy takes whole seconds)."""
    return max(1, round(seconds))


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


async def record(pid: int, seconds: float, path: Path) -> Path | None:
    """Sample the GIL's holder in `pid` for `seconds` into `path` (collapsed stacks); None
    without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(recorded_s(seconds))]
    argv += ["--format", "raw", "--rate", str(RATE_PER_S), "--nonblocking", "--threads", "--gil"]
    argv += ["-o", str(path)]
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


# Where a sample belongs in budgetd, by its innermost frame first: grpc.aio's own C code
# (awaited in the meter handler's read and write, or run straight from the event loop) and
# the loop itself are the work the bare server does too. Otherwise the first layer with a
# frame on the stack, in this order (so metrics are metrics wherever they are updated);
# the rest is "other" (the meter handler's own code, registries, heartbeats, the close of
# each stream).
GRPC_AND_LOOP = "gRPC and event loop"
_GRPC_LEAVES = ("Runner.run ", "MeterStreams._read ", "Outbox._send ", "BareMeter.meter ")
LAYERS = (
    ("metrics", ("prometheus_client/", "budget_server/metrics.py")),
    ("auth", ("Guard.principal", "auth/store.py", "auth/keys.py")),
    ("ledger: SQLite writer (its thread and queue)", ("sqlite_writer.py",)),
    ("ledger: PostgreSQL groups", ("PostgresGroups.",)),
    ("ledger: actors", ("ledger/actors.py",)),
    ("ledger: front (chains, owners, outcomes)", ("ledger/ledger.py", "ledger/outcomes.py")),
    ("meter session", ("meter/session.py", "api/convert.py")),
)


def layer_of(frames: list[str]) -> str:
    """The layer of one sample's stack (`frames` shortened, outermost first)."""
    if not frames or frames[-1].startswith(_GRPC_LEAVES):
        return GRPC_AND_LOOP
    for name, marks in LAYERS:
        if any(mark in frame for frame in frames for mark in marks):
            return name
    return "other"


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Samples per thread (the event loop's MainThread vs the database driver's threads),
    per layer, and the top functions by inclusive and by self samples, in % of all
    samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
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
        layers[layer_of(frames)] += count
        total += count
        for frame in {f for f in frames if not any(b in f for b in _BOILERPLATE)}:
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count

    def table(counter: collections.Counter[str], rows: int | None = top) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(rows)]

    return {
        "samples": total,
        "threads_pct": table(threads) if total else [],
        "layers_pct": table(layers, None) if total else [],  # every layer: there are few
        "inclusive_pct": table(inclusive) if total else [],
        "self_pct": table(own) if total else [],
    }


def gil_by_layer(results: dict[str, Any]) -> str:
    """One line per profile that knows its GIL time per request (measure 2's, the bare
    server's among them): that time, and its share per layer."""
    lines = []
    for measure, result in results.items():
        for label, summary in result.get("profiles", {}).items():
            if "gil_ms_per_request" not in summary:
                continue
            layers = ", ".join(f"{name} {pct:.0f}%" for name, pct in summary["layers_pct"])
            lines.append(
                f"  {measure} {label}: {summary['gil_ms_per_request']:.3f} ms per request "
                f"at {summary['rate_per_s']:.0f}/s; {layers}"
            )
    return "\n".join(["GIL held (py-spy --gil), by layer:", *lines]) if lines else ""


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
    for title in ("threads_pct", "layers_pct", "inclusive_pct", "self_pct"):
        print(f"\n{title.replace('_pct', '')} %")
        for name, pct in summary[title]:
            print(f"  {pct:5.1f}  {name}")


if __name__ == "__main__":
    main()
