"""Measure 2: metered requests/s (open -> 10 usage messages -> finish -> committed), 256
concurrent streams, on many budgets and on one hot budget, SQLite and PostgreSQL.

Limits, in the same run: the bare grpc.aio service answering the same message pattern with
no ledger (the ceiling), and the naive ledger (`bench/naive_ledger.py`: one transaction
per reserve and per commit) behind that same bare pattern. Each server keeps one crew of
load-generator processes for the whole measure. A repetition runs each shape in turn:
every budgetd between two runs of the bare server, held against their mean
(`bracketed_rep`), then the naive ledgers; the order is reversed on every other
repetition.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from bench import procs, profile
from bench.common import cpu_s, median, ratio, rounded
from bench.context import HUGE_LIMIT_TOKENS, Run, create_budgets
from bench.procs import Crew, Service, postgres_unavailable

TARGET_SHARE_OF_BARE = 0.60
TARGET_HOT_TIMES_NAIVE = 5.0
GUBERNATOR_PER_NODE_PER_S = 2000  # Gubernator's published figure, per node
HOT = "hot"
SHAPES = ("many", "hot")


def budgets_of(run: Run, shape: str) -> list[str]:
    return [HOT] if shape == HOT else [f"many-{i}" for i in range(run.settings.many_budgets)]


async def requests_once(run: Run, crew: Crew, server: Service, shape: str) -> dict[str, Any]:
    settings = run.settings
    command = {
        "phase": "run",
        "budgets": budgets_of(run, shape),
        "warmup_s": settings.requests_warmup_s,
        "duration_s": settings.requests_s,
    }
    cpu_before = cpu_s(server.pid)
    load_cpu_before = sum(cpu_s(pid) for pid in crew.pids)
    answers = await crew.command(command, 600)
    server_cpu_s = cpu_s(server.pid) - cpu_before
    load_cpu_s = sum(cpu_s(pid) for pid in crew.pids) - load_cpu_before
    completed = sum(a["completed"] for a in answers)
    window_s = answers[0]["window_s"]
    elapsed_s = window_s + settings.requests_warmup_s  # the window and its warm-up
    return {
        "rate_per_s": completed / window_s,
        "completed": completed,
        "errors": sum(a["errors"] for a in answers),
        "first_errors": [e for a in answers for e in a["first_errors"]][:3],
        "p50_ms": median([a["p50_ms"] for a in answers]),
        "p99_ms": max(a["p99_ms"] for a in answers),
        "server_cpu_share": server_cpu_s / elapsed_s,
        "load_cpu_share": load_cpu_s / elapsed_s,
    }


async def measure(run: Run) -> dict[str, Any]:
    settings = run.settings
    backends = list(settings.backends)
    skipped: dict[str, str] = {}
    if "postgres" in backends and (why := await postgres_unavailable()):
        backends.remove("postgres")
        skipped["postgres"] = why
    async with AsyncExitStack() as stack:
        starting = {"bare": run.bare(stack, "requests-bare")}
        for backend in backends:
            starting[f"budgetd-{backend}"] = run.budgetd(
                stack, backend, f"requests-budgetd-{backend}"
            )
            starting[f"naive-{backend}"] = run.naive(stack, backend, f"requests-naive-{backend}")
        servers = dict(zip(starting, await asyncio.gather(*starting.values()), strict=True))
        ids = [*budgets_of(run, "many"), HOT]
        await asyncio.gather(
            *(create_budgets(s, ids, HUGE_LIMIT_TOKENS) for n, s in servers.items() if n != "bare")
        )
        groups = [
            [
                {
                    "kind": "requests",
                    "address": server.address,
                    "api_key": server.api_key,
                    "streams": settings.requests_streams // settings.requests_workers,
                    "usage_messages": 10,
                }
            ]
            * settings.requests_workers
            for server in servers.values()
        ]
        started = await stack.enter_async_context(procs.crews(groups, run.log_dir))
        crews = {name: crew for name, (crew, _) in zip(servers, started, strict=True)}
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {
            (name, shape): [] for name in servers for shape in SHAPES
        }
        for rep in range(settings.reps):
            for shape in SHAPES if rep % 2 == 0 else SHAPES[::-1]:
                await bracketed_rep(run, crews, servers, shape, runs, reverse=rep % 2 == 1)
        profiles: dict[str, Any] = {}
        if run.profile_dir is not None:
            for name in ("bare", *(f"budgetd-{backend}" for backend in backends)):
                for shape in SHAPES:
                    label = f"{name.removeprefix('budgetd-')} {shape}"
                    profiles[label] = await profiled(
                        run, crews[name], servers[name], shape, f"requests-{name}-{shape}"
                    )
    rows = [summarize(backend, shape, runs) for backend in backends for shape in SHAPES]
    return {
        "description": "metered requests/s: open -> 10 usage -> finish -> committed, "
        f"{settings.requests_streams} concurrent streams",
        "rows": rows,
        "bare_rate_per_s": rounded(
            median([r["rate_per_s"] for s in SHAPES for r in runs[("bare", s)]]), 0
        ),
        "skipped": skipped,
        "profiles": profiles,
    }


async def bracketed_rep(
    run: Run,
    crews: dict[str, Crew],
    servers: dict[str, Service],
    shape: str,
    runs: dict[tuple[str, str], list[dict[str, Any]]],
    *,
    reverse: bool,
) -> None:
    """One repetition of one shape: every budgetd between two runs of the bare server,
    then the naive ledgers. The machine's speed drifts within minutes here (the bare
    service at 898 then 440 requests/s in one run), and a repetition of all servers takes
    about one: so each budgetd run is held against the mean of the bare runs just before
    and after it (`bare_beside_per_s`), which cancels a drift that is steady over the two."""
    budgetds = [name for name in servers if name.startswith("budgetd-")]
    naives = [name for name in servers if name.startswith("naive-")]
    if reverse:
        budgetds.reverse()
        naives.reverse()
    before = await requests_once(run, crews["bare"], servers["bare"], shape)
    runs[("bare", shape)].append(before)
    for name in budgetds:
        outcome = await requests_once(run, crews[name], servers[name], shape)
        after = await requests_once(run, crews["bare"], servers["bare"], shape)
        outcome["bare_beside_per_s"] = (before["rate_per_s"] + after["rate_per_s"]) / 2
        runs[(name, shape)].append(outcome)
        runs[("bare", shape)].append(after)
        before = after
    for name in naives:
        runs[(name, shape)].append(await requests_once(run, crews[name], servers[name], shape))


async def profiled(run: Run, crew: Crew, server: Service, shape: str, label: str) -> dict[str, Any]:
    """A profile of `budgetd` (or the bare server, to compare) under one more run of the
    load, not counted in the figures."""
    assert run.profile_dir is not None
    path = run.profile_dir / f"{label}.txt"
    settings = run.settings

    async def record() -> Any:
        await asyncio.sleep(settings.requests_warmup_s)
        return await profile.record(server.pid, settings.requests_s, path)

    recorded, outcome = await asyncio.gather(record(), requests_once(run, crew, server, shape))
    if recorded is None:
        return {"error": "py-spy is not installed"}
    report = profile.report(path)
    # The GIL's time per request, so that layers compare across servers in ms, not in %.
    held_s = report["samples"] / profile.RATE_PER_S
    requests = outcome["rate_per_s"] * profile.recorded_s(settings.requests_s)
    report["rate_per_s"] = rounded(outcome["rate_per_s"], 0)
    report["gil_ms_per_request"] = rounded(1000 * held_s / max(requests, 1), 3)
    return report


def summarize(
    backend: str, shape: str, runs: dict[tuple[str, str], list[dict[str, Any]]]
) -> dict[str, Any]:
    mine = runs[(f"budgetd-{backend}", shape)]
    naive = runs[(f"naive-{backend}", shape)]
    bare = runs[("bare", shape)]
    rate = median([r["rate_per_s"] for r in mine])
    share = median([ratio(m["rate_per_s"], m["bare_beside_per_s"]) for m in mine])
    times_naive = median(
        [ratio(m["rate_per_s"], n["rate_per_s"]) for m, n in zip(mine, naive, strict=True)]
    )
    checks = {
        "share_of_bare": share >= TARGET_SHARE_OF_BARE,
        "past_gubernator": rate > GUBERNATOR_PER_NODE_PER_S,
    }
    if shape == HOT:
        checks["times_naive"] = times_naive >= TARGET_HOT_TIMES_NAIVE
    errors = sum(r["errors"] for r in mine)
    cpu_ms = {"budgetd": cpu_ms_per_request(mine), "bare": cpu_ms_per_request(bare)}
    return {
        "backend": backend,
        "shape": shape,
        "budgetd_rate_per_s": rounded(rate, 0),
        "bare_rate_per_s": rounded(median([r["rate_per_s"] for r in bare]), 0),
        "naive_rate_per_s": rounded(median([r["rate_per_s"] for r in naive]), 0),
        "share_of_bare": rounded(share, 3),
        "times_naive": rounded(times_naive, 2),
        "budgetd_p50_ms": rounded(median([r["p50_ms"] for r in mine]), 1),
        "budgetd_p99_ms": rounded(median([r["p99_ms"] for r in mine]), 1),
        "budgetd_cpu_share": rounded(median([r["server_cpu_share"] for r in mine]), 2),
        "cpu_ms_per_request": {
            name: {"server": rounded(server, 3), "load_generators": rounded(load, 3)}
            for name, (server, load) in cpu_ms.items()
        },
        "cores_at_gubernator": {
            name: rounded((server + load) * GUBERNATOR_PER_NODE_PER_S / 1000, 2)
            for name, (server, load) in cpu_ms.items()
        },
        "budgetd_errors": errors,
        "first_errors": [e for r in mine for e in r["first_errors"]][:3],
        "runs": {
            "budgetd": mine,
            "naive": naive,
            "bare": bare,
        },
        "targets": {
            "share_of_bare": f">= {TARGET_SHARE_OF_BARE:.0%} of bare",
            "past_gubernator": f"> {GUBERNATOR_PER_NODE_PER_S}/s",
            **({"times_naive": f">= {TARGET_HOT_TIMES_NAIVE:.0f}x naive"} if shape == HOT else {}),
        },
        "checks": checks,
        "met": all(checks.values()) and errors == 0,
    }


def cpu_ms_per_request(runs: list[dict[str, Any]]) -> tuple[float, float]:
    """CPU per request of the server and of its load generators (medians over `runs`):
    what running this pattern at a given rate asks of the machine. The load generators
    are real gRPC clients and cost about as much as the bare server they load."""

    def per_request(share_key: str) -> float:
        return median([1000 * r[share_key] / r["rate_per_s"] for r in runs if r["rate_per_s"]])

    return per_request("server_cpu_share"), per_request("load_cpu_share")
