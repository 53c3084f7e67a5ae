"""Run budgetd's benchmarks: `python -m bench.run --mode full|quick|smoke`.

Every measure runs budgetd beside its own limit in the same run (a bare grpc.aio service,
the naive ledger, a bare round trip, the naive re-encode), repeated in alternating order,
and reports medians and ratios, because this machine is shared and noisy: absolute figures
move from run to run, ratios taken minutes apart on the same machine much less.

Prints a table and writes `bench/results/<name>.json` (every figure, each run's raw
numbers, and with --profile a py-spy profile summary of budgetd per measure). The process
exits 1 when a measure failed to run; a target that is missed is reported, not an error.

Measures: usage_absorbed, requests, abort_latency, overage, client_cost, open_streams.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from bench import abort_latency, open_streams, overage, request_rate, usage_rate
from bench.common import finite, rounded, run, uvloop_version
from bench.context import MODES, Run
from bench.procs import budgetd_has_api_keys
from bench.profile import gil_by_layer, py_spy

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLIENT_COST_TARGET_US = 10.0
CLIENT_COST_TARGET_RATIO = 100.0


async def client_cost(run: Run) -> dict[str, Any]:
    """Measure 5: bench/client_cost.py in its own process, its JSON folded in."""
    path = run.log_dir / "client_cost.json"
    settings = run.settings
    argv = [sys.executable, "-m", settings.client_cost_module, *settings.client_cost_args]
    process = await asyncio.create_subprocess_exec(
        *argv, "--json", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"client_cost exited {process.returncode}: {stderr.decode()[-2000:]}")
    figures: dict[str, Any] = json.loads(path.read_text())
    incremental = figures["incremental_us_per_chunk"]
    exact = figures.get("exact_after_every_chunk", figures.get("exact_at_samples"))
    checks = {
        "us_per_chunk": incremental <= CLIENT_COST_TARGET_US,
        "exact": bool(exact),
        "times_faster_than_naive": figures["ratio_at_end"] >= CLIENT_COST_TARGET_RATIO,
    }
    return {
        "description": "client CPU per streamed chunk: exact incremental count vs re-encoding "
        f"the whole response, at {figures['tokens']} tokens",
        "script": settings.client_cost_module,
        **figures,
        "output": stdout.decode(),
        "targets": {
            "us_per_chunk": f"<= {CLIENT_COST_TARGET_US:.0f} us per chunk",
            "exact": "exact after every chunk",
            "times_faster_than_naive": f">= {CLIENT_COST_TARGET_RATIO:.0f}x faster than naive "
            "(at the end of the response)",
        },
        "checks": checks,
        "met": all(checks.values()),
    }


MEASURES: dict[str, Callable[[Run], Awaitable[dict[str, Any]]]] = {
    "usage_absorbed": usage_rate.measure,
    "requests": request_rate.measure,
    "abort_latency": abort_latency.measure,
    "overage": overage.measure,
    "client_cost": client_cost,
    "open_streams": open_streams.measure,
}


# ----------------------------------------------------------------------------- table


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def _n(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value >= 100:
        value = round(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return f"{int(value):,}{unit}"
    return f"{value:g}{unit}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _x(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


Row = tuple[str, str, str, str, str, str, str]


def table_rows(results: dict[str, Any]) -> Iterator[Row]:
    """(measure, config, budgetd, limit, ratio, target, met) lines of the summary table."""
    usage = results.get("usage_absorbed", {})
    for row in usage.get("rows", []):
        yield (
            "1 usage msgs/s",
            f"{row['streams']} streams",
            _n(row["budgetd_rate_per_s"], "/s"),
            f"bare {_n(row['bare_rate_per_s'], '/s')}",
            _x(row["share_of_bare"]),
            row["target"],
            _yes(row["met"] and row["verified"]),
        )
    requests = results.get("requests", {})
    for row in requests.get("rows", []):
        config = f"{row['backend']} {row['shape']}"
        checks = row["checks"]
        targets = row["targets"]
        yield (
            "2 metered req/s",
            config,
            _n(row["budgetd_rate_per_s"], "/s"),
            f"bare {_n(row['bare_rate_per_s'], '/s')}",
            _x(row["share_of_bare"]),
            targets["share_of_bare"],
            _yes(checks["share_of_bare"] and row["budgetd_errors"] == 0),
        )
        if "times_naive" in checks:
            yield (
                "",
                config,
                "",
                f"naive {_n(row['naive_rate_per_s'], '/s')}",
                _x(row["times_naive"]),
                targets["times_naive"],
                _yes(checks["times_naive"]),
            )
        else:
            yield (
                "",
                config,
                "",
                f"naive {_n(row['naive_rate_per_s'], '/s')}",
                _x(row["times_naive"]),
                "(naive, for reference)",
                "",
            )
        # What 2,000/s would take of the machine: server and load generators, per request.
        cores = row.get("cores_at_gubernator", {})
        bare_cores = f"; bare {_n(cores.get('bare'))} cores" if cores else ""
        yield (
            "",
            config,
            f"2,000/s: {_n(cores.get('budgetd'))} cores" if cores else "",
            f"Gubernator 2,000/s{bare_cores}",
            "",
            targets["past_gubernator"],
            _yes(checks["past_gubernator"]),
        )
    if requests.get("skipped"):
        for backend, why in requests["skipped"].items():
            yield ("2 metered req/s", backend, "skipped", why[:40], "", "", "n/a")
    aborts = results.get("abort_latency", {})
    for row in aborts.get("rows", []):
        load = "idle" if not row["load"] else f"{row['load']:.0%} of peak"
        mine = row["budgetd"]["upstream_saw_close"]
        rtt = row["bare_rtt"]
        yield (
            "3 abort -> closed",
            load,
            f"p99 {_n(mine['p99_ms'], ' ms')} (p50 {_n(mine['p50_ms'])})",
            f"bare RTT p99 {_n(rtt['p99_ms'], ' ms')}",
            _x(row["p99_times_bare_rtt"]),
            row["targets"]["p99_within_2x_bare_rtt"],
            _yes(row["checks"]["p99_within_2x_bare_rtt"]),
        )
        if "p99_under_5ms" in row["checks"]:
            yield (
                "",
                load,
                "",
                "",
                "",
                row["targets"]["p99_under_5ms"],
                _yes(row["checks"]["p99_under_5ms"]),
            )
        raw = row["raw_abort_rtt"]
        yield (
            "",
            load,
            f"server side p99 {_n(raw['budgetd']['p99_ms'], ' ms')} "
            f"(p50 {_n(raw['budgetd']['p50_ms'])})",
            f"bare p99 {_n(raw['bare']['p99_ms'], ' ms')}",
            _x(_ratio(raw["budgetd"]["p99_ms"], raw["bare"]["p99_ms"])),
            "(raw gRPC: usage at the edge -> abort)",
            "",
        )
        returned = row["budgetd"]["client_counted_and_closed"]
        yield (
            "",
            load,
            f"counted the rest, closed p99 {_n(returned['p99_ms'], ' ms')} "
            f"(p50 {_n(returned['p50_ms'])})",
            "",
            "",
            f"({row['budgetd']['decided_by_client']} of {row['budgetd']['probes']} "
            "cut by the client at a final grant)",
            "",
        )
        bare_path = row["bare_client_path"]["upstream_saw_close"]
        yield (
            "",
            load,
            "",
            f"bare server, client path p99 {_n(bare_path['p99_ms'], ' ms')}",
            _x(_ratio(mine["p99_ms"], bare_path["p99_ms"])),
            "(same client path, bare server)",
            "",
        )
    over = results.get("overage", {})
    if "checks" in over:
        checks = over["checks"]
        bare = over.get("bare", {})
        yield (
            "4 overage tokens",
            f"{over['aborted']} aborted",
            f"median {_n(over['overage_tokens_median'])}, max {_n(over['overage_tokens_max'])}",
            f"bare median {_n(bare.get('overage_tokens_median'))}, "
            f"max {_n(bare.get('overage_tokens_max'))}",
            "",
            "median 0, max <= 2",
            _yes(checks["median_overage_0"] and checks["max_overage_2"]),
        )
        yield (
            "",
            "client CPU per token",
            _n(over.get("client_cpu_us_per_token"), " us"),
            f"bare server's clients {_n(bare.get('client_cpu_us_per_token'), ' us')}",
            "",
            "(keeping up with the provider)",
            "",
        )
        yield (
            "",
            "served / budget",
            f"{over['served_share_of_budget']}",
            f"1 + overage {over['allowed_share_of_budget']}",
            "",
            "<= 1.00 + recorded",
            _yes(checks["served_within_limit_plus_recorded_overage"]),
        )
        yield (
            "",
            "ledger vs sent",
            f"ledger {_n(over['ledger_spent'])}",
            f"sent {_n(over['served_tokens'])}",
            "",
            "equal",
            _yes(checks["ledger_equals_sent"]),
        )
    cost = results.get("client_cost", {})
    if "checks" in cost:
        yield (
            "5 client us/chunk",
            f"{cost['tokens']} tokens",
            f"{cost['incremental_us_per_chunk']} us",
            f"naive {cost['naive_us_per_chunk_at_end']} us",
            f"{cost['ratio_at_end']}x",
            "<= 10 us, exact, >= 100x",
            _yes(cost["met"]),
        )
    held = results.get("open_streams", {})
    if "checks" in held:
        mine = held["budgetd"]
        yield (
            "6 KB per open stream",
            f"{held['streams']:,} streams",
            f"{held['budgetd_kb_per_stream']} KB",
            f"bare {held['bare_kb_per_stream']} KB",
            _x(rounded(held["budgetd_kb_per_stream"] / held["bare_kb_per_stream"], 2)),
            held["targets"]["kb_per_stream"].split(" per")[0],
            _yes(held["checks"]["kb_per_stream"]),
        )
        rounds = ", ".join(f"{s:.2f}" for s in mine["usage_round_s"])
        bare_rounds = ", ".join(f"{s:.2f}" for s in held["bare"]["usage_round_s"])
        yield (
            "",
            "usage round",
            f"{rounds} s",
            f"bare {bare_rounds} s",
            "",
            "all committed, last usage",
            _yes(held["checks"]["usage_absorbed"]),
        )
        yield (
            "",
            "idle CPU, open",
            f"{mine['idle_cpu_share']:.0%} core",
            f"bare {held['bare']['idle_cpu_share']:.0%} core",
            "",
            "(heartbeats, for reference)",
            "",
        )
    for name, result in results.items():
        if "error" in result:
            yield (name, "FAILED", result["error"][:60], "", "", "", "NO")


def render_table(results: dict[str, Any]) -> str:
    header: Row = ("measure", "config", "budgetd", "limit (same run)", "ratio", "target", "met")
    rows = [header, *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


# ----------------------------------------------------------------------------- main


def environment(api_keys: bool) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "uvloop": uvloop_version(),
        "loadavg_at_start": os.getloadavg(),
        "budgetd_auth": "api-keys" if api_keys else "insecure",
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


async def run_measure(run_: Run, name: str) -> None:
    started = time.perf_counter()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        result = await MEASURES[name](run_)
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["duration_s"] = round(time.perf_counter() - started, 1)
    run_.results[name] = result
    print(f"[bench] {name} done in {result['duration_s']} s", file=sys.stderr, flush=True)


async def run_measures(run_: Run, names: list[str]) -> dict[str, Any]:
    if run_.settings.concurrent:  # smoke: the figures mean nothing, only that all runs
        await asyncio.gather(*(run_measure(run_, name) for name in names))
        return {name: run_.results[name] for name in names}
    for name in names:
        await run_measure(run_, name)
    return run_.results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--name", help="results file name (default: <mode>-<UTC time>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--only", nargs="+", choices=list(MEASURES), help="run only these measures")
    parser.add_argument("--skip", nargs="+", choices=list(MEASURES), default=[])
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile budgetd with py-spy during each measure (needs py-spy)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="run budgetd without API keys (--insecure)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = MODES[args.mode]
    started_at = datetime.datetime.now(datetime.UTC)
    name = args.name or f"{args.mode}-{started_at:%Y%m%dT%H%M%SZ}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    names = [m for m in (args.only or list(MEASURES)) if m not in args.skip]
    api_keys = not args.insecure and budgetd_has_api_keys()
    with tempfile.TemporaryDirectory(prefix="budgetd-bench-") as tmp:
        profile_dir = None
        if args.profile:
            if py_spy() is None:
                print("[bench] --profile: py-spy is not installed; no profiles", file=sys.stderr)
            else:
                profile_dir = Path(tmp) / "profiles"  # kept in the JSON (stacks, summary)
                profile_dir.mkdir()
        run_ = Run(settings, Path(tmp), profile_dir=profile_dir, api_keys=api_keys)
        env = environment(api_keys)
        wall = time.perf_counter()
        results = run(run_measures(run_, names))
        document = {
            "name": name,
            "mode": args.mode,
            "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
            "started_at": started_at.isoformat(),
            "duration_s": round(time.perf_counter() - wall, 1),
            "environment": env,
            "settings": dict(vars(settings)),
            "measures": results,
        }
        failed = [n for n, r in results.items() if "error" in r]
        if failed:  # keep the processes' logs: the temporary directory goes away
            log_dir = args.results_dir / f"{name}-logs"
            log_dir.mkdir(exist_ok=True)
            for log in Path(tmp).glob("*.log"):
                (log_dir / log.name).write_bytes(log.read_bytes())
            document["logs"] = str(log_dir)
        table = render_table(results)
        document["table"] = table.splitlines()
    path = args.results_dir / f"{name}.json"
    path.write_text(json.dumps(finite(document), indent=2, allow_nan=False, default=str) + "\n")
    print(
        f"\nbudgetd benchmarks, mode {args.mode}: {env['cpus']} CPUs, Python {env['python']}, "
        f"grpcio {env['grpcio']}, uvloop {env['uvloop']}, budgetd auth {env['budgetd_auth']}; "
        f"{document['duration_s']} s\n"
    )
    print(table)
    if by_layer := gil_by_layer(results):
        print(f"\n{by_layer}")
    print(f"\nresults: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
