"""The benchmark suite runs end to end in its smoke mode and writes the JSON it promises.

No timing is asserted: this machine's figures belong in bench/results, not in a test. What
is checked is that every measure ran (budgetd, its limits, the load generators and the fake
OpenAI server all started, talked and stopped) and reported the fields the table and any
reader of the JSON rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MEASURES = (
    "usage_absorbed",
    "requests",
    "abort_latency",
    "overage",
    "client_cost",
    "open_streams",
)
ROOT = Path(__file__).resolve().parent.parent


def _no_nan(text: str) -> Any:
    raise ValueError(f"{text} is not valid JSON")


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from the repository, as a user runs a benchmark; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_smoke_mode_writes_every_measure(tmp_path: Path) -> None:
    done = run_bench(
        "bench.run", "--mode", "smoke", "--name", "smoke", "--results-dir", str(tmp_path)
    )
    document = json.loads((tmp_path / "smoke.json").read_text(), parse_constant=_no_nan)

    assert document["mode"] == "smoke"
    assert {"name", "started_at", "duration_s", "environment", "settings", "table"} <= set(document)
    assert document["environment"]["cpus"] >= 1
    measures = document["measures"]
    assert set(measures) == set(MEASURES)
    for name in MEASURES:
        assert "error" not in measures[name], measures[name].get("error")

    for row in measures["usage_absorbed"]["rows"]:
        assert row["budgetd_rate_per_s"] > 0
        assert row["bare_rate_per_s"] > 0
        assert row["verified"] is True  # every stream's committed carried its last usage
        assert isinstance(row["met"], bool)

    requests = measures["requests"]["rows"]
    assert {(r["backend"], r["shape"]) for r in requests} >= {("sqlite", "many"), ("sqlite", "hot")}
    for row in requests:  # a smoke window is short: a slow configuration may finish none
        assert row["budgetd_rate_per_s"] >= 0
        assert row["bare_rate_per_s"] > 0
        assert row["naive_rate_per_s"] >= 0
        assert row["budgetd_errors"] == 0, row["first_errors"]
        assert set(row["checks"]) >= {"share_of_bare", "past_gubernator"}
        # What 2,000 requests/s would ask of the machine, from CPU measured per request.
        bare_cpu = row["cpu_ms_per_request"]["bare"]
        assert bare_cpu["server"] > 0
        assert bare_cpu["load_generators"] > 0
        expected_cores = (bare_cpu["server"] + bare_cpu["load_generators"]) * 2
        assert abs(row["cores_at_gubernator"]["bare"] - expected_cores) < 0.01

    for row in measures["abort_latency"]["rows"]:
        assert row["budgetd"]["not_aborted"] == 0
        assert row["budgetd"]["upstream_saw_close"]["n"] > 0
        assert row["budgetd"]["client_counted_and_closed"]["n"] > 0
        # Each probe's grant is final: the client cuts the stream itself.
        assert row["budgetd"]["decided_by_client"] == row["budgetd"]["probes"]
        assert row["bare_rtt"]["n"] > 0
        assert row["raw_abort_rtt"]["budgetd"]["n"] > 0
        assert "p99_within_2x_bare_rtt" in row["checks"]

    overage = measures["overage"]
    assert overage["aborted"] > 0
    assert overage["ledger_verified"] is True
    assert set(overage["checks"]) == {
        "median_overage_0",
        "max_overage_2",
        "served_within_limit_plus_recorded_overage",
        "ledger_equals_sent",
    }
    assert overage["bare"]["aborted"] > 0
    assert overage["client_cpu_us_per_token"] > 0

    cost = measures["client_cost"]
    assert cost["incremental_us_per_chunk"] > 0
    assert cost["checks"]["exact"] is True

    streams = measures["open_streams"]
    assert streams["budgetd"]["committed"] == streams["streams"]
    assert streams["budgetd_kb_per_stream"] is not None
    assert streams["bare_kb_per_stream"] is not None

    assert document["table"][0].startswith("measure")
    assert "results:" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_client_path_compares_the_sdk_alone_with_the_metered_sdk(tmp_path: Path) -> None:
    """bench/client_path.py: each variant streams in a client process of its own, also from
    another checkout (here this one again, as --compare-with would name an older one)."""
    output = tmp_path / "client_path.json"
    done = run_bench(
        "bench.client_path",
        *("--rounds", "1", "--streams", "2", "--tokens", "30", "--rate", "300"),
        *("--compare-with", str(ROOT), "--json", str(output)),
    )
    figures = json.loads(output.read_text(), parse_constant=_no_nan)
    medians = figures["median_us_per_chunk"]
    assert set(medians) == {"sdk", "metered", f"metered@{ROOT}"}
    assert all(value > 0 for value in medians.values())
    assert set(figures["overhead_vs_sdk"]) == {"metered", f"metered@{ROOT}"}
    assert "over the SDK alone" in done.stdout
