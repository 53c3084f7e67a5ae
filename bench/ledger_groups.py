"""The ledger alone, in-process: reserve+commit per second on many budgets and on one hot
budget, SQLite and PostgreSQL, and how many batches shared a transaction (`ledger.group`).

    python -m bench.ledger_groups                      # 1,000 budgets, 256 callers, 5 s
    python -m bench.ledger_groups --db sqlite --budgets 100 --seconds 10
    python -m bench.ledger_groups --db postgres --rounds 6 --seconds 8   # as tables grow

No gRPC and no other process: this isolates what the ledger's SQL path costs, which the
many-budgets rows of measure 2 pay on top of the gRPC stack. Many budgets should run
close to the hot budget's rate, since a group costs what one hot batch costs.

`--rounds N` measures each shape N times in a row on the same database, so a rate that
falls as the tables grow shows (a stale query plan did: docs/design.md); on PostgreSQL
each round also reports the WAL written per request, read from `pg_current_wal_lsn()`.
The summary line gives the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median
from typing import Any

from sqlalchemy import text

from bench import procs
from bench.common import run
from budget_server.clock import SystemClock
from budget_server.db.engine import open_database
from budget_server.db.migrate import upgrade_to_head
from budget_server.ledger.admin import BudgetSpec, create_budget
from budget_server.ledger.ledger import Ledger
from budget_server.ledger.model import CommitOp, ReserveOp
from budget_server.ledger.usage import Usage

WalPosition = Callable[[], Awaitable[int]]


async def _requests_per_s(
    ledger: Ledger, ids: list[str], callers: int, seconds: float, wal: WalPosition | None
) -> dict[str, Any]:
    """Reserve then commit in a loop on `callers` tasks: requests/s, CPU µs per request
    and, given the WAL position, WAL bytes per request over the same window."""
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
    wal_before = await wal() if wal else 0
    started, cpu, before = time.perf_counter(), time.process_time(), done
    await asyncio.sleep(seconds)
    count, wall, cpu = done - before, time.perf_counter() - started, time.process_time() - cpu
    wal_after = await wal() if wal else 0
    stop = True
    await asyncio.gather(*tasks)
    figures = {
        "requests_per_s": round(count / wall),
        "cpu_us_per_request": round(cpu / max(count, 1) * 1e6),
    }
    if wal:
        figures["wal_bytes_per_request"] = round((wal_after - wal_before) / max(count, 1))
    return figures


async def measure(
    backend: str, budgets: int, callers: int, seconds: float, rounds: int = 1
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="budgetd-groups-") as tmp:
        async with procs.fresh_database(backend, Path(tmp), "ledger-groups") as url:
            return await _measure_on(url, backend, budgets, callers, seconds, rounds)


async def _measure_on(
    url: str, backend: str, budgets: int, callers: int, seconds: float, rounds: int
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

        async def wal_position() -> int:
            async with db.engine.connect() as conn:
                lsn = await conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
                return int(lsn.scalar_one())

        wal = None if db.is_sqlite else wal_position
        for shape, ids in (("many", many), ("hot", ["hot"])):
            measured = [
                await _requests_per_s(ledger, ids, callers, seconds, wal) for _ in range(rounds)
            ]
            figures[f"{shape}_rounds"] = measured
            figures[shape] = {key: round(median(r[key] for r in measured)) for key in measured[0]}
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


def _round_line(backend: str, shape: str, number: int, figures: dict[str, Any]) -> str:
    wal = figures.get("wal_bytes_per_request")
    return (
        f"{backend:9} {shape:4} round {number}: {figures['requests_per_s']:>6}/s "
        f"{figures['cpu_us_per_request']:>5} µs CPU"
        + (f" {wal:>6} B WAL per request" if wal is not None else "")
    )


async def main(args: argparse.Namespace) -> None:
    backends = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    for backend in backends:
        figures = await measure(backend, args.budgets, args.callers, args.seconds, args.rounds)
        if args.rounds > 1:
            for shape in ("many", "hot"):
                for number, round_ in enumerate(figures[f"{shape}_rounds"], 1):
                    print(_round_line(backend, shape, number, round_))
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
    parser.add_argument("--rounds", type=int, default=1, help="measure each shape N times")
    run(main(parser.parse_args()))
