"""Measure 1: usage messages absorbed by one budgetd process, against a bare grpc.aio
service receiving the same bidirectional messages and doing nothing with them.

Meter streams are opened first (one huge budget, so nothing is aborted), then every stream
sends cumulative usage as fast as gRPC takes it for the window, then finishes. The rate is
every usage message sent divided by the time from the first write to the last `committed`:
a stream's `committed` comes after the server has read all of its usage messages (they are
in order on the stream, and each stream's `committed` must carry its last usage, which is
checked), so the rate counts what the server absorbed, not what sat in buffers.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from bench import procs, profile
from bench.common import cpu_s, median, ratio, rounded
from bench.context import HUGE_LIMIT_TOKENS, Run, create_budgets
from bench.procs import Crew, Service

TARGET_SHARE_OF_BARE = 0.70
BUDGET = "flood"


async def flood_once(run: Run, crew: Crew, server: Service, budget: str = BUDGET) -> dict[str, Any]:
    settings = run.settings
    await crew.command({"phase": "open", "budgets": [budget]}, 120)
    cpu_before = cpu_s(server.pid)
    answers = await crew.command({"phase": "flood", "duration_s": settings.flood_s}, 300)
    server_cpu_s = cpu_s(server.pid) - cpu_before
    messages = sum(a["messages"] for a in answers)
    elapsed_s = max(a["ended_at"] for a in answers) - min(a["started_at"] for a in answers)
    return {
        "rate_per_s": messages / elapsed_s,
        "messages": messages,
        "elapsed_s": elapsed_s,
        "server_cpu_us_per_message": server_cpu_s / messages * 1e6,
        "server_cpu_share": server_cpu_s / elapsed_s,
        "verified": all(a["mismatched"] == 0 and a["errors"] == 0 for a in answers),
        "first_error": next((a["first_error"] for a in answers if a["first_error"]), None),
    }


async def measure(run: Run) -> dict[str, Any]:
    settings = run.settings
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        budgetd, bare = await asyncio.gather(
            run.budgetd(stack, "sqlite", "usage-budgetd"), run.bare(stack, "usage-bare")
        )
        await create_budgets(budgetd, [BUDGET], HUGE_LIMIT_TOKENS)
        for streams in settings.flood_streams:
            groups = [
                [
                    {
                        "kind": "flood",
                        "address": server.address,
                        "api_key": server.api_key,
                        "streams": streams // settings.flood_workers,
                        "budgets": [BUDGET],
                    }
                ]
                * settings.flood_workers
                for server in (budgetd, bare)
            ]
            started = await stack.enter_async_context(procs.crews(groups, run.log_dir))
            crews: dict[str, Crew] = {"budgetd": started[0][0], "bare": started[1][0]}
            runs: dict[str, list[dict[str, Any]]] = {"budgetd": [], "bare": []}
            for rep in range(settings.reps):
                order = ["budgetd", "bare"] if rep % 2 == 0 else ["bare", "budgetd"]
                for name in order:
                    server = budgetd if name == "budgetd" else bare
                    runs[name].append(await flood_once(run, crews[name], server))
            if run.profile_dir is not None:
                profiles[f"{streams} streams"] = await profiled(
                    run, crews["budgetd"], budgetd, streams
                )
            rows.append(summarize(streams, runs))
    return {
        "description": "usage messages/s absorbed by one process (raw Meter streams, "
        "cumulative usage as fast as gRPC takes it, one huge budget)",
        "rows": rows,
        "profiles": profiles,
    }


async def profiled(run: Run, crew: Crew, budgetd: Service, streams: int) -> dict[str, Any]:
    """One more budgetd run with py-spy attached (not counted in the figures)."""
    assert run.profile_dir is not None
    path = run.profile_dir / f"usage-{streams}.txt"
    await crew.command({"phase": "open", "budgets": [BUDGET]}, 120)
    crew_run = crew.command({"phase": "flood", "duration_s": run.settings.flood_s}, 300)
    recorded, _ = await asyncio.gather(
        profile.record(budgetd.pid, run.settings.flood_s, path), crew_run
    )
    if recorded is None:
        return {"error": "py-spy is not installed"}
    return profile.report(path)


def summarize(streams: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    budgetd_rates = [r["rate_per_s"] for r in runs["budgetd"]]
    bare_rates = [r["rate_per_s"] for r in runs["bare"]]
    pair_ratios = [ratio(b, a) for b, a in zip(budgetd_rates, bare_rates, strict=True)]
    share = median(pair_ratios)
    return {
        "streams": streams,
        "budgetd_rate_per_s": rounded(median(budgetd_rates), 0),
        "bare_rate_per_s": rounded(median(bare_rates), 0),
        "share_of_bare": rounded(share, 3),
        "share_of_bare_per_rep": [rounded(r, 3) for r in pair_ratios],
        "budgetd_cpu_us_per_message": rounded(
            median([r["server_cpu_us_per_message"] for r in runs["budgetd"]]), 1
        ),
        "bare_cpu_us_per_message": rounded(
            median([r["server_cpu_us_per_message"] for r in runs["bare"]]), 1
        ),
        "budgetd_cpu_share": rounded(median([r["server_cpu_share"] for r in runs["budgetd"]]), 2),
        "bare_cpu_share": rounded(median([r["server_cpu_share"] for r in runs["bare"]]), 2),
        "verified": all(r["verified"] for rs in runs.values() for r in rs),
        "runs": runs,
        "target": f">= {TARGET_SHARE_OF_BARE:.0%} of bare",
        "met": share >= TARGET_SHARE_OF_BARE,
    }
