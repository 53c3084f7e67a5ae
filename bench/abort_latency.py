"""Measure 3: abort latency, from the client handing over the usage that crosses the limit
to the upstream HTTP stream being closed; idle and at a share of budgetd's peak load.

The real client path: `wrap_openai(openai.AsyncOpenAI(base_url=fake))` with a BudgetClient,
against the fake OpenAI server in its own process. Each probe streams on its own budget
sized to its prompt plus `abort_grant_tokens` output tokens, so budgetd grants exactly that,
marked final, and the client cuts the stream when its count reaches it (budgetd aborts its
side on the same totals). The server-decided path (a grant that was not final: an extension
refused at the edge, a freeze) is the raw gRPC row and the bare server's client path, whose
grants are never final. Per probe:

* abort_ms: crossing usage handed to the meter -> the abort: decided by the client itself
  when its grant was final (`decided_by_client`), else the server's `abort` event;
* disconnect_ms: -> the fake server saw the disconnect (its record, `time.time()`): the
  upstream HTTP stream closed, as the provider sees it. This is the figure held to the
  targets: the client shuts the socket in its abort callback, so the connection is gone
  before the openai SDK's own close() has finished its bookkeeping;
* close_ms: -> the upstream stream's close() returned, after the client has read and
  counted what the provider sent before it saw the cut (reported beside it: this is when
  the app gets its BudgetExceeded).

Limits in the same run, at the same background load on the bare server: a bare gRPC round
trip (usage out, reply back, on a bare echo stream), and the same client path against the
bare server, which sends `abort` at the same token count knowing nothing else.

The background load is raw meter streams sending usage at `load x peak` messages/s in
total, peak being budgetd's absorbed rate at 64 streams from measure 1 of the same run.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from bench import procs, profile, usage_rate
from bench.common import median, percentile, ratio, rounded
from bench.context import HUGE_LIMIT_TOKENS, Run, create_budgets, fake_records
from bench.procs import Crew, Service
from bench.worker import PROMPT_TOKENS_RAW

TARGET_TIMES_BARE_RTT = 2.0
TARGET_P99_AT_LOAD_MS = 5.0
LOAD_BUDGET = "load"
ECHO_STREAMS = 4
ECHO_INTERVAL_S = 0.01  # per stream: about ECHO_STREAMS / ECHO_INTERVAL_S round trips/s
PROBE_TOKENS = 400  # longer than any grant, so every probe is cut off


async def peak_rate(run: Run, stack: AsyncExitStack, budgetd: Service) -> tuple[float, str]:
    """budgetd's absorbed usage rate at 64 streams: from measure 1, else measured now."""
    for row in run.results.get("usage_absorbed", {}).get("rows", []):
        if row["streams"] == 64 and row["budgetd_rate_per_s"]:
            return float(row["budgetd_rate_per_s"]), "measure 1 (64 streams)"
    spec = {
        "kind": "flood",
        "address": budgetd.address,
        "api_key": budgetd.api_key,
        "streams": 32,
        "budgets": [LOAD_BUDGET],
    }
    crew, _ = await stack.enter_async_context(procs.crew([spec, spec], run.log_dir))
    outcome = await usage_rate.flood_once(run, crew, budgetd, LOAD_BUDGET)
    return outcome["rate_per_s"], "measured here (64 streams)"


def latency(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": rounded(percentile(values, 50), 2),
        "p99_ms": rounded(percentile(values, 99), 2),
        "max_ms": rounded(max(values), 2) if values else None,
    }


async def measure(run: Run) -> dict[str, Any]:
    settings = run.settings
    conditions: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        budgetd, bare, fake = await asyncio.gather(
            run.budgetd(stack, "sqlite", "abort-budgetd"),
            run.bare(stack, "abort-bare"),
            run.fake_openai(stack),
        )
        await create_budgets(budgetd, [LOAD_BUDGET], HUGE_LIMIT_TOKENS)
        peak, peak_source = 0.0, "not needed (idle only)"
        if any(settings.abort_loads):
            peak, peak_source = await peak_rate(run, stack, budgetd)
        servers = {"budgetd": budgetd, "bare": bare}
        groups: list[list[dict[str, Any]]] = []
        for server in servers.values():  # the client path: a BudgetClient per server
            spec: dict[str, Any] = {"budgetd": server.address, "base_url": fake.address}
            groups.append([{"kind": "abort", "api_key": server.api_key, **spec}])
        for server in servers.values():  # the server's side alone, over raw gRPC
            spec = {"address": server.address, "api_key": server.api_key, "channels": 2}
            groups.append([{"kind": "raw_abort", **spec}])
        for server in servers.values():  # background load
            spec = {
                "kind": "paced",
                "address": server.address,
                "api_key": server.api_key,
                "streams": settings.paced_streams // settings.paced_workers,
                "budgets": [LOAD_BUDGET],
            }
            groups.append([spec] * settings.paced_workers)
        groups.append(
            [
                {
                    "kind": "echo",
                    "address": bare.address,
                    "streams": ECHO_STREAMS,
                    "budgets": ["echo"],
                }
            ]
        )
        started = await stack.enter_async_context(procs.crews(groups, run.log_dir))
        clients = {"budgetd": started[0][0], "bare": started[1][0]}
        prompt_tokens = started[0][1][0]["prompt_tokens"]
        raws = {"budgetd": started[2][0], "bare": started[3][0]}
        pacers = {"budgetd": started[4][0], "bare": started[5][0]}
        echo = started[6][0]

        grant = settings.abort_grant_tokens
        blocks = settings.abort_blocks
        per_block = max(1, settings.abort_probes // blocks)
        client_command = {
            "phase": "probe",
            "tokens": PROBE_TOKENS,
            "rate": settings.abort_rate,
            "concurrency": settings.abort_concurrency,
        }
        raw_command = {
            "phase": "probe",
            "before": grant * 3 // 4 + 1,  # past the refill point: the extension is refused
            "at": grant,
            "pause_s": 0.2,
            "concurrency": settings.abort_concurrency,
        }
        for load in settings.abort_loads:
            rate = load * peak
            tag = f"{round(load * 100)}pct"
            samples: dict[str, list[dict[str, Any]]] = {"budgetd": [], "bare": []}
            raw_rtts: dict[str, list[float]] = {"budgetd": [], "bare": []}
            echo_rtts: list[float] = []
            achieved: dict[str, list[float]] = {"budgetd": [], "bare": []}
            for block in range(blocks):
                # Budgets sized to the prompt plus `grant` output tokens, one per probe.
                prefix = f"{tag}-{block}"
                client_ids = [f"abort-{prefix}-{i}" for i in range(per_block)]
                raw_ids = [f"raw-{prefix}-{i}" for i in range(per_block)]
                await create_budgets(budgetd, client_ids, prompt_tokens + grant)
                await create_budgets(budgetd, raw_ids, PROMPT_TOKENS_RAW + grant)
                order = ["budgetd", "bare"] if block % 2 == 0 else ["bare", "budgetd"]
                for name in order:
                    if rate:  # the same background load, on the server under test
                        await pacers[name].command({"phase": "open"}, 120)
                        await pacers[name].command(
                            {"phase": "start", "rate_per_s": rate / settings.paced_workers}, 60
                        )
                    if name == "budgetd":
                        client_budgets, raw_budgets = client_ids, raw_ids
                    else:  # the bare server aborts at the count its budget id names
                        client_budgets = [f"abort-at-{grant}-{b}" for b in client_ids]
                        raw_budgets = [f"abort-at-{grant}-{b}" for b in raw_ids]
                    answer = (
                        await clients[name].command(
                            {**client_command, "budgets": client_budgets}, 600
                        )
                    )[0]
                    if answer["errors"]:
                        raise RuntimeError(f"abort probes failed: {answer['first_errors']}")
                    samples[name].extend(answer["probes"])
                    answer = (
                        await raws[name].command({**raw_command, "budgets": raw_budgets}, 600)
                    )[0]
                    if answer["errors"]:
                        raise RuntimeError(f"raw abort probes failed: {answer['first_errors']}")
                    raw_rtts[name].extend(answer["rtt_ms"])
                    if name == "bare":
                        await echo.command({"phase": "open"}, 60)
                        echo_command = {
                            "phase": "echo",
                            "duration_s": settings.echo_s / blocks,
                            "interval_s": ECHO_INTERVAL_S,
                        }
                        echo_rtts.extend((await echo.command(echo_command, 300))[0]["rtt_ms"])
                    if rate:
                        stopped = await pacers[name].command({"phase": "stop"}, 300)
                        achieved[name].append(sum(s["rate_per_s"] for s in stopped))
            if run.profile_dir is not None and rate:
                profiles[tag] = await profiled(
                    run,
                    budgetd,
                    pacers["budgetd"],
                    clients["budgetd"],
                    client_command,
                    tag,
                    prompt_tokens,
                    rate,
                )
            conditions.append(
                {
                    "load": load,
                    "background_rate_per_s": rounded(rate, 0),
                    "background_achieved_per_s": {
                        k: rounded(median(v), 0) for k, v in achieved.items()
                    },
                    "samples": samples,
                    "raw_rtts": raw_rtts,
                    "echo_rtts": echo_rtts,
                }
            )
        records = {r["request_id"]: r for r in await fake_records(fake)}
    rows = [summarize(condition, records) for condition in conditions]
    return {
        "description": "abort latency, crossing usage handed over -> upstream closed "
        "(wrap_openai over the openai SDK against the fake OpenAI server)",
        "peak_usage_rate_per_s": rounded(peak, 0),
        "peak_source": peak_source,
        "grant_tokens": settings.abort_grant_tokens,
        "stream_rate_tokens_per_s": settings.abort_rate,
        "blocks": blocks,
        "rows": rows,
        "profiles": profiles,
    }


async def profiled(
    run: Run,
    budgetd: Service,
    pacer: Crew,
    prober: Crew,
    probe_command: dict[str, Any],
    tag: str,
    prompt_tokens: int,
    rate: float,
) -> dict[str, Any]:
    """budgetd under the background load while probes run, with py-spy attached."""
    assert run.profile_dir is not None
    path = run.profile_dir / f"abort-{tag}.txt"
    ids = [f"abort-{tag}-profile-{i}" for i in range(max(8, run.settings.abort_probes // 4))]
    await create_budgets(budgetd, ids, prompt_tokens + run.settings.abort_grant_tokens)
    await pacer.command({"phase": "open"}, 120)
    await pacer.command({"phase": "start", "rate_per_s": rate / run.settings.paced_workers}, 60)
    recorded, _ = await asyncio.gather(
        profile.record(budgetd.pid, 3, path),
        prober.command({**probe_command, "budgets": ids}, 600),
    )
    await pacer.command({"phase": "stop"}, 300)
    if recorded is None:
        return {"error": "py-spy is not installed"}
    return profile.report(path)


def path_latencies(
    probes: list[dict[str, Any]], records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    abort = [p["abort_ms"] for p in probes if "abort_ms" in p]
    close = [p["close_ms"] for p in probes if "close_ms" in p]
    disconnect = []
    for p in probes:
        record = records.get(p.get("request_id", ""))
        if record and record.get("disconnected_at") and "cross_at" in p:
            disconnect.append((record["disconnected_at"] - p["cross_at"]) * 1000)
    return {
        "probes": len(probes),
        "not_aborted": sum(1 for p in probes if not p["aborted"]),
        "decided_by_client": sum(1 for p in probes if p.get("local")),
        "abort_decided": latency(abort),
        "upstream_saw_close": latency(disconnect),
        "client_counted_and_closed": latency(close),
    }


def summarize(condition: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    budgetd = path_latencies(condition["samples"]["budgetd"], records)
    bare_client = path_latencies(condition["samples"]["bare"], records)
    rtt = latency(condition["echo_rtts"])
    raw = {name: latency(values) for name, values in condition["raw_rtts"].items()}
    p99 = budgetd["upstream_saw_close"]["p99_ms"]
    times_rtt = ratio(p99 if p99 is not None else float("nan"), rtt["p99_ms"] or float("nan"))
    checks = {"p99_within_2x_bare_rtt": times_rtt <= TARGET_TIMES_BARE_RTT}
    if condition["load"] > 0:
        checks["p99_under_5ms"] = p99 is not None and p99 < TARGET_P99_AT_LOAD_MS
    return {
        "load": condition["load"],
        "background_rate_per_s": condition["background_rate_per_s"],
        "background_achieved_per_s": condition["background_achieved_per_s"],
        "budgetd": budgetd,
        "bare_client_path": bare_client,
        "bare_rtt": rtt,
        "raw_abort_rtt": raw,
        "p99_times_bare_rtt": rounded(times_rtt, 2),
        "targets": {
            "p99_within_2x_bare_rtt": f"p99 <= {TARGET_TIMES_BARE_RTT:.0f}x bare RTT p99",
            **(
                {"p99_under_5ms": f"p99 < {TARGET_P99_AT_LOAD_MS:.0f} ms"}
                if condition["load"] > 0
                else {}
            ),
        },
        "checks": checks,
        "met": all(checks.values()) and budgetd["not_aborted"] == 0,
    }
