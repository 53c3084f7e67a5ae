"""What metering costs an app per streamed chunk, end to end: the official openai SDK
alone, against the same SDK wrapped by `wrap_openai` and metered by a real budgetd.

Run: .venv/bin/python -m bench.client_path [--rounds 4] [--streams 16] [--tokens 600]
     [--rate 50] [--compare-with PATH]

budgetd (SQLite) and the fake OpenAI server run as processes of their own; each
measurement is a fresh client process (this file run as a script) streaming `--streams`
responses of `--tokens` tokens at `--rate` tokens/s each, reporting its own CPU
(time.process_time: every thread) per chunk received. Variants alternate within each
round, because this machine's speed drifts by tens of percent within minutes:

* `sdk`: the SDK alone (the wrapper passes a call without a budget straight through);
* `metered`: wrap_openai with a budget, as an app runs it;
* `metered@PATH` with --compare-with: the same from another checkout (a git worktree of an
  older commit, say), so a change to the client is measured against what it replaces.

Why it matters beyond the app's bill: a client that cannot keep up with its provider reads
behind it, and whatever it has not read when budgetd cuts the stream is overage (measure 4
runs 64 such streams in 4 processes on this 2-core machine, beside budgetd and the fake).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUDGET = "client-path"
SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent


# ----------------------------------------------------------------------------- client process


async def stream_all(args: argparse.Namespace) -> dict[str, Any]:
    """One client process: imports only openai, budget_client and bench.common (from
    PYTHONPATH, which every checkout since the benchmarks began has), so an older checkout
    can be measured with this same script."""
    import openai

    from budget_client import BudgetClient, wrap_openai

    async with (
        BudgetClient(args.budgetd, api_key=args.api_key or None, spool_dir=Path(args.spool)) as b,
        openai.AsyncOpenAI(base_url=args.base_url, api_key="fake", max_retries=0) as raw,
    ):
        oai = wrap_openai(raw, b)

        async def one(index: int, tokens: int) -> int:
            stream = await oai.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": f"Tell me story number {index}."}],
                stream=True,
                budget=args.budget or None,
                extra_headers={"x-fake-tokens": str(tokens), "x-fake-rate": str(args.rate)},
            )
            chunks = 0
            async for _ in stream:
                chunks += 1
            return chunks

        await asyncio.gather(*(one(i, 20) for i in range(4)))  # connections, encodings
        cpu_before, started = time.process_time(), time.perf_counter()
        chunks = sum(await asyncio.gather(*(one(i, args.tokens) for i in range(args.streams))))
        cpu_s, elapsed_s = time.process_time() - cpu_before, time.perf_counter() - started
    return {
        "us_per_chunk": round(cpu_s / chunks * 1e6, 1),
        "chunks": chunks,
        "cpu_share_of_a_core": round(cpu_s / elapsed_s, 2),
    }


# ----------------------------------------------------------------------------- driver


async def run_client(
    root: Path, args: argparse.Namespace, budgetd: Any, fake: Any, budget: str
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as spool:
        argv = [
            sys.executable,
            "-P",  # not this file's directory on sys.path: its modules would shadow others
            str(SCRIPT),
            "--client",
            "--budgetd", budgetd.address,
            "--api-key", budgetd.api_key or "",
            "--base-url", fake.address,
            "--budget", budget,
            "--spool", spool,
            "--streams", str(args.streams),
            "--tokens", str(args.tokens),
            "--rate", str(args.rate),
        ]  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, "PYTHONPATH": str(root)},
            cwd=root,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"client in {root} exited {process.returncode}: {stderr.decode()}")
    figures: dict[str, Any] = json.loads(stdout.decode().splitlines()[-1])
    return figures


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    from contextlib import AsyncExitStack

    from bench import procs
    from bench.context import create_budgets

    variants: dict[str, tuple[Path, str]] = {"sdk": (REPO, ""), "metered": (REPO, BUDGET)}
    for path in args.compare_with:
        variants[f"metered@{path}"] = (path, BUDGET)
    per_chunk: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as log_dir:
        async with AsyncExitStack() as stack:
            url = await stack.enter_async_context(
                procs.fresh_database("sqlite", Path(log_dir), "client-path")
            )
            budgetd = await procs.start_budgetd(url, Path(log_dir), "client-path")
            stack.push_async_callback(budgetd.stop)
            fake = await procs.start_fake_openai(Path(log_dir))
            stack.push_async_callback(fake.stop)
            await create_budgets(budgetd, [BUDGET], 10**15)
            for round_ in range(args.rounds):
                order = list(variants.items())
                if round_ % 2:
                    order.reverse()
                for name, (root, budget) in order:
                    figures = await run_client(root, args, budgetd, fake, budget)
                    per_chunk[name].append(figures["us_per_chunk"])
                    print(f"round {round_ + 1} {name}: {json.dumps(figures)}", flush=True)
    medians = {name: statistics.median(values) for name, values in per_chunk.items()}
    sdk = medians["sdk"]
    return {
        "description": f"{args.streams} streams x {args.tokens} tokens at {args.rate:g} "
        f"tokens/s per client process; {args.rounds} alternating rounds",
        "us_per_chunk": per_chunk,
        "median_us_per_chunk": medians,
        "overhead_vs_sdk": {
            name: round(value / sdk - 1, 3) for name, value in medians.items() if name != "sdk"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--compare-with", nargs="*", type=Path, default=[], metavar="PATH")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for name in ("--budgetd", "--api-key", "--base-url", "--budget", "--spool"):
        parser.add_argument(name, default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench.common import run  # uvloop, as the benchmark's other clients

    if args.client:
        print(json.dumps(run(stream_all(args))))
        return
    args.compare_with = [path.resolve() for path in args.compare_with]
    result = run(drive(args))
    for name, value in result["median_us_per_chunk"].items():
        overhead = result["overhead_vs_sdk"].get(name)
        extra = f"  (+{overhead:.0%} over the SDK alone)" if overhead is not None else ""
        print(f"{name:>24}: median {value:,.1f} us of client CPU per chunk{extra}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
