"""The ledger alone, in-process: reserve+commit per second on many budgets and on one hot
budget, SQLite and PostgreSQL, and how many batches shared a transaction (`ledger.group`).

    python -m bench.ledger_groups                      # 1,000 budgets, 256 callers, 5 s
    python -m bench.ledger_groups --db sqlite --budgets 100 --seconds 10

No gRPC and no other process: this isolates what the ledger's SQL path costs, which the
many-budgets rows of measure 2 pay on top of the gRPC stack. Many budgets should run
close to the hot budget's rate, since a group costs what one hot batch costs.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.common import run
from budget_server.clock import SystemClock
from budget_server.db.engine import open_database
from budget_server.db.migrate import upgrade_to_head
from budget_server.ledger.admin import BudgetSpec, create_budget
from budget_server.ledger.ledger import Ledger
from budget_server.ledger.model import CommitOp, ReserveOp
from budget_server.ledger.usage import Usage


async def _requests_per_s(
    ledger: Ledger, ids: list[str], callers: int, seconds: float
) -> tuple[float, float]:
    """Reserve then commit in a loop on `callers` tasks; (requests/s, CPU µs per request)."""
    done = 0
    stop = False

    async def caller(start: int) -> None:
        nonlocal done
        turn = start
        while not stop:
            budget_id = ids[turn % len(ids)]
            turn += callers
            reserve = ReserveOp(
                budget_id=budget_id,
                amount=0,
                estimate=Usage(input_tokens=100),
                model="gpt-4o",
                ttl_ms=60_000,
                idempotency_key=None,
                labels={},
                output_range=(1, 500),
                actor="meter",
            )
            result = await ledger.reserve(reserve)
            usage = Usage(input_tokens=100, output_tokens=300)
            commit = CommitOp(reservation_id=result.reservation.id, usage=usage, amount=0)
            await ledger.commit(commit)
            done += 1

    tasks = [asyncio.create_task(caller(k)) for k in range(callers)]
    await asyncio.sleep(1.0)  # warm-up
    started, cpu, before = time.perf_counter(), time.process_time(), done
    await asyncio.sleep(seconds)
    count, wall, cpu = done - before, time.perf_counter() - started, time.process_time() - cpu
    stop = True
    await asyncio.gather(*tasks)
    return count / wall, cpu / max(count, 1) * 1e6


async def measure(backend: str, budgets: int, callers: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="budgetd-groups-") as tmp:
        async with procs.fresh_database(backend, Path(tmp), "ledger-groups") as url:
            return await _measure_on(url, backend, budgets, callers, seconds)


async def _measure_on(
    url: str, backend: str, budgets: int, callers: int, seconds: float
) -> dict[str, Any]:
    db = open_database(url)
    try:
        await upgrade_to_head(db)
        clock = SystemClock()
        many = [f"many-{i}" for i in range(budgets)]
        for budget_id in [*many, "hot"]:
            spec = BudgetSpec(budget_id, None, "TOKENS", 2**50, "NONE", "UTC", "HARD", ())
            await create_budget(db, spec, clock.now_us())
        ledger = Ledger(db, clock)
        for budget_id in [*many, "hot"]:
            await ledger.chain_of(budget_id)  # cached, as in a warm server
        figures: dict[str, Any] = {"backend": backend}
        for shape, ids in (("many", many), ("hot", ["hot"])):
            rate, cpu_us = await _requests_per_s(ledger, ids, callers, seconds)
            figures[shape] = {
                "requests_per_s": round(rate),
                "cpu_us_per_request": round(cpu_us),
            }
        assert ledger.groups is not None
        figures["grouped_batches_per_group"] = round(
            ledger.groups.batches / max(ledger.groups.groups, 1), 1
        )
        figures["groups_gave_up"] = ledger.groups.gave_up
        figures["many_share_of_hot"] = round(
            figures["many"]["requests_per_s"] / figures["hot"]["requests_per_s"], 2
        )
        return figures
    finally:
        await db.close()


async def main(args: argparse.Namespace) -> None:
    backends = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    for backend in backends:
        figures = await measure(backend, args.budgets, args.callers, args.seconds)
        many, hot = figures["many"], figures["hot"]
        print(
            f"{backend:9} many ({args.budgets} budgets) {many['requests_per_s']:>6}/s "
            f"{many['cpu_us_per_request']:>5} µs CPU | hot {hot['requests_per_s']:>6}/s "
            f"{hot['cpu_us_per_request']:>5} µs CPU | many/hot {figures['many_share_of_hot']} | "
            f"batches per group {figures['grouped_batches_per_group']}, "
            f"gave up {figures['groups_gave_up']}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--budgets", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    run(main(parser.parse_args()))
