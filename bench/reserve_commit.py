"""Reserve+commit pairs per second against one budgetd process: one client process with
64 concurrent callers, each looping Reserve then Commit on one budget (the hot case).

    python -m bench.reserve_commit --db sqlite       # or --db postgres
    python -m bench.reserve_commit --db both --seconds 10 --budgets 1

Prints pairs/s per backend (median of --runs runs) and the server's batch sizes, which is
where group commit shows: many pairs share one SQL transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


async def _start(db_url: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "budget_server.cli", "serve", "--listen", "127.0.0.1:0",
        "--db", db_url, "--insecure", "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    match = re.search(rb"listening on (\S+)", line)
    if match is None:
        raise RuntimeError(f"budgetd did not start: {line!r}")
    return process, match.group(1).decode()


async def _pairs(address: str, budgets: int, callers: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        stub = pb_grpc.BudgetServiceStub(channel)
        ids = [f"bench:{secrets.token_hex(4)}:{i}" for i in range(budgets)]
        for budget_id in ids:
            await admin.CreateBudget(
                pb.CreateBudgetRequest(id=budget_id, unit=pb.UNIT_TOKENS, limit=2**60)
            )
        done = 0
        deadline = 0.0

        async def caller(index: int) -> None:
            nonlocal done
            budget_id = ids[index % len(ids)]
            while time.perf_counter() < deadline:
                held = await stub.Reserve(pb.ReserveRequest(budget_id=budget_id, amount=100))
                await stub.Commit(pb.CommitRequest(reservation_id=held.reservation.id, amount=90))
                done += 1

        deadline = time.perf_counter() + 1.0  # warm-up
        await asyncio.gather(*(caller(i) for i in range(callers)))
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(caller(i) for i in range(callers)))
        rate = done / (time.perf_counter() - started)
        verified = await admin.VerifyLedger(pb.VerifyLedgerRequest())
        assert verified.ok, verified
        return rate


async def _measure(backend: str, args: argparse.Namespace) -> list[float]:
    rates = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            name = ""
            if backend == "sqlite":
                db_url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
            else:
                name = f"bench_{secrets.token_hex(4)}"
                conn = await asyncpg.connect(PG_ADMIN)
                await conn.execute(f'CREATE DATABASE "{name}"')
                await conn.close()
                db_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
            process, address = await _start(db_url)
            try:
                rates.append(await _pairs(address, args.budgets, args.callers, args.seconds))
            finally:
                process.terminate()
                await process.wait()
                if name:
                    conn = await asyncpg.connect(PG_ADMIN)
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    await conn.close()
    return rates


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--budgets", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    results = {}
    for backend in backends:
        rates = await _measure(backend, args)
        results[backend] = {"pairs_per_s_median": round(statistics.median(rates)), "runs": rates}
        print(
            f"{backend:9s} {statistics.median(rates):8.0f} reserve+commit pairs/s "
            f"(median of {len(rates)}; {args.callers} callers, {args.budgets} budget(s))",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
