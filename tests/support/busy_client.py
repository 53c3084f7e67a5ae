"""An app whose event loop is busy, metering streams against budgetd: run as a process of
its own (`python -m tests.support.busy_client SPEC`) so that only its loop is busy, and
print what happened as JSON.

Each turn of its loop computes for `turn_ms` (an app parsing streamed chunks), then counts
one token on every meter; the meters send every change (a tiny report interval), so every
turn ends gRPC writes on all of them. Before each turn it reads how many wake-up bytes
grpc's poller thread has left waiting for the loop (budget_client/_grpc_wakeup.py): when
the socket fills, that thread is blocked and the process's completions stop.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from budget_client import BudgetClient
from budget_client._grpc_wakeup import _grpc_wakeup_parts, _pending_bytes


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    async with BudgetClient(
        spec["address"],
        spool_dir=Path(spec["spool_dir"]),
        fail_policy="closed",
        usage_report_interval_s=0.001,
        drain_grpc_wakeups=spec["drain"],
    ) as client:
        meters = [client.meter(spec["budget"], model="gpt-4o") for _ in range(spec["streams"])]
        for meter in meters:
            await meter.open()
        parts = _grpc_wakeup_parts(asyncio.get_running_loop())
        assert parts is not None, "grpc's wake-up socket was not found"
        fd = parts[0].fileno()
        backlog_max = turns = 0
        stop = time.monotonic() + spec["seconds"]
        while time.monotonic() < stop:
            backlog_max = max(backlog_max, _pending_bytes(fd))
            busy_until = time.perf_counter() + spec["turn_ms"] / 1000
            while time.perf_counter() < busy_until:
                pass
            for meter in meters:
                meter.add_output_tokens(1)
            turns += 1
            await asyncio.sleep(0)
        committed = [await meter.finish() for meter in meters]
    return {
        "turns": turns,
        "backlog_max": backlog_max,
        "charged": [c.charged for c in committed],
    }


def main() -> None:
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
