"""Measure 6: the server's memory per open meter stream, with thousands open at once, and
whether usage is still absorbed; against a bare grpc.aio service holding as many streams.

Load-generator processes each hold their share of the streams over a few channels (one
HTTP/2 connection each, with its own API key, as separate app instances would have). The
server's RSS (VmRSS) is read before the streams open (after a warm-up batch has been opened
and finished, so one-time allocations are not counted) and again once they are all open;
the difference over the number of streams is the cost of an open stream. Then every stream
sends a usage message per round, and finally every stream finishes: each `committed` must
carry its last usage. Also recorded: the server's CPU while the streams sit idle (budgetd
persists each live stream's usage on a heartbeat).
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from bench import procs
from bench.common import cpu_s, rounded, rss_kb
from bench.context import HUGE_LIMIT_TOKENS, Run, create_budgets, create_keys
from bench.procs import Crew, Service

TARGET_KB_PER_STREAM = 30.0
BUDGETS = [f"hold-{i}" for i in range(8)]
WARMUP_STREAMS = 200


async def hold(run: Run, crew: Crew, server: Service) -> dict[str, Any]:
    settings = run.settings
    per_worker = settings.hold_streams // settings.hold_workers
    warm = max(1, WARMUP_STREAMS // settings.hold_workers)
    await crew.command({"phase": "open", "streams": warm}, 300)
    await crew.command({"phase": "finish"}, 300)
    await asyncio.sleep(settings.hold_settle_s)
    rss_before_kb = rss_kb(server.pid)
    opened = await crew.command({"phase": "open", "streams": per_worker}, 900)
    open_s = max(a["elapsed_s"] for a in opened)
    await asyncio.sleep(settings.hold_settle_s)
    rss_open_kb = rss_kb(server.pid)
    cpu_before = cpu_s(server.pid)
    await asyncio.sleep(settings.hold_idle_s)
    idle_cpu_share = (cpu_s(server.pid) - cpu_before) / settings.hold_idle_s
    rounds: list[float] = []
    for value in range(1, settings.hold_rounds + 1):
        written = await crew.command({"phase": "usage", "round": value}, 900)
        rounds.append(max(a["elapsed_s"] for a in written))
    finished = await crew.command({"phase": "finish"}, 900)
    streams = per_worker * settings.hold_workers
    return {
        "streams": streams,
        "rss_before_kb": rss_before_kb,
        "rss_open_kb": rss_open_kb,
        "kb_per_stream": (rss_open_kb - rss_before_kb) / streams,
        "open_s": open_s,
        "idle_cpu_share": idle_cpu_share,
        "usage_round_s": rounds,
        "finish_s": max(a["elapsed_s"] for a in finished),
        "committed": sum(a["committed"] for a in finished),
        "mismatched": sum(a["mismatched"] for a in finished),
        "errors": sum(a["errors"] for a in finished),
        "first_error": next((a["first_error"] for a in finished if a["first_error"]), None),
    }


async def measure(run: Run) -> dict[str, Any]:
    settings = run.settings
    outcomes: dict[str, dict[str, Any]] = {}
    connections = settings.hold_workers * settings.hold_channels
    for name in ("bare", "budgetd"):  # one at a time: each gets the machine to itself
        async with AsyncExitStack() as stack:
            server: Service
            if name == "budgetd":
                server = await run.budgetd(stack, "sqlite", "streams-budgetd")
                await create_budgets(server, BUDGETS, HUGE_LIMIT_TOKENS)
            else:
                server = await run.bare(stack, "streams-bare")
            # A key per connection, as separate app instances would have: budgetd caps the
            # streams one key may hold open (streams_per_key_max).
            keys = await create_keys(server, connections, "charge:hold-*")
            specs = [
                {
                    "kind": "hold",
                    "address": server.address,
                    "api_keys": keys[w * settings.hold_channels : (w + 1) * settings.hold_channels],
                    "channels": settings.hold_channels,
                    "budgets": BUDGETS,
                    "open_concurrency": 200,
                }
                for w in range(settings.hold_workers)
            ]
            crew, _ = await stack.enter_async_context(procs.crew(specs, run.log_dir))
            outcomes[name] = await hold(run, crew, server)
    mine, bare = outcomes["budgetd"], outcomes["bare"]
    absorbed = (
        mine["committed"] == mine["streams"] and mine["mismatched"] == 0 and mine["errors"] == 0
    )
    checks = {
        "kb_per_stream": mine["kb_per_stream"] <= TARGET_KB_PER_STREAM,
        "usage_absorbed": absorbed,
    }
    return {
        "description": f"{settings.hold_streams} concurrent open meter streams from "
        f"{settings.hold_workers} processes x {settings.hold_channels} connections",
        "streams": mine["streams"],
        "budgetd_kb_per_stream": rounded(mine["kb_per_stream"], 1),
        "bare_kb_per_stream": rounded(bare["kb_per_stream"], 1),
        "budgetd_over_bare_kb_per_stream": rounded(
            mine["kb_per_stream"] - bare["kb_per_stream"], 1
        ),
        "budgetd": mine,
        "bare": bare,
        "targets": {
            "kb_per_stream": f"<= {TARGET_KB_PER_STREAM:.0f} KB per open stream (RSS delta)",
            "usage_absorbed": "a usage message on every open stream is absorbed (committed "
            "with the last usage)",
        },
        "checks": checks,
        "met": all(checks.values()),
    }
