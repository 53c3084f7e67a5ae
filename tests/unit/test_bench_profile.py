"""bench.profile's reading of py-spy's collapsed stacks: samples per thread and per layer."""

from __future__ import annotations

from pathlib import Path

from bench.profile import GRPC_AND_LOOP, summarize

LOOP = (
    "thread (11780): MainThread;<module> (budget_server/cli.py:203);"
    "Runner.run (asyncio/runners.py:118)"
)
WRITER = "thread (11790): budgetd-sqlite-writer_0;_worker (concurrent/futures/thread.py:81)"


def test_layers_put_each_sample_where_its_time_goes(tmp_path: Path) -> None:
    stacks = tmp_path / "stacks.txt"
    stacks.write_text(
        "\n".join(
            [
                f"{LOOP} 50",  # the loop's own C code (grpc, uvloop)
                f"{LOOP};MeterStreams._read (budget_server/api/meter_stream.py:96) 15",
                f"{LOOP};MeterStreams._read (budget_server/api/meter_stream.py:124);"
                "Outbox.send_last (budget_server/meter/outbox.py:65);"
                "Outbox._send (budget_server/meter/outbox.py:97) 5",  # awaiting context.write
                f"{WRITER};SqliteWriter._transaction (budget_server/db/sqlite_writer.py:170) 15",
                # metrics updated by an actor are metrics, not the actor
                f"{LOOP};BudgetActor._apply (budget_server/ledger/actors.py:125);"
                "Histogram.observe (prometheus_client/metrics.py:600) 5",
                f"{LOOP};BudgetActor._drain (budget_server/ledger/actors.py:101) 4",
                f"{LOOP};MeterSession.on_usage (budget_server/meter/session.py:180) 4",
                f"{LOOP};SessionRegistry.add (budget_server/meter/registry.py:40) 2",
            ]
        )
        + "\n"
    )
    summary = summarize(stacks)
    assert summary["samples"] == 100
    assert dict(summary["threads_pct"]) == {"MainThread": 85.0, "budgetd-sqlite-writer_": 15.0}
    assert dict(summary["layers_pct"]) == {
        GRPC_AND_LOOP: 70.0,
        "ledger: SQLite writer (its thread and queue)": 15.0,
        "metrics": 5.0,
        "ledger: actors": 4.0,
        "meter session": 4.0,
        "other": 2.0,
    }
