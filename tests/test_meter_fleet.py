"""64 concurrent streams from 4 processes share one budget (SQLite and PostgreSQL).

Each process (tests/support/meter_fleet.py) runs 16 streams through the official openai
SDK and wrap_openai against one fake OpenAI server run here, each asking for its own
length and pace; budgetd runs as a `budgetd serve` process. The budget is about 40 % of
what the streams would use, so it runs out mid-stream and budgetd aborts streams.

What the fake server recorded is the truth each stream is checked against; the ledger
must show no drift, one COMMIT per reservation, and nothing past the limit but recorded
overage, each abort's overage no more than the tokens that were in flight.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import Any

import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._tokenizer import count_text, get_encoding_for_model
from budget_client.testing import FakeOpenAIServer
from tests.support.ledger import assert_ledger_clean, create
from tests.support.metered import histories
from tests.support.processes import run_module_json
from tests.support.servers import start_server_process, stubs

pytestmark = pytest.mark.slow

PROCESSES = 4
STREAMS_PER_PROCESS = 16
TOKENS = (200, 2_000)  # reply length per stream, uniform
RATES = (100, 300)  # tokens per second per stream, uniform
LIMIT = 30_000  # about 40 % of the ~72,000 tokens the 64 streams would use

# Once the abort reaches the client, the wrapper reads nothing more: at most the chunk
# already being read is counted (the fake sends one token per chunk; re-tokenizing the
# text a token ends can move the count by one more).
AFTER_ABORT_TOKENS_MAX = 2
# From the client's count reaching its grant to budgetd's abort arriving: one usage
# message and one abort on loopback, milliseconds when idle. While all 64 streams run this
# test saturates both cores (the openai SDK alone parses a chunk in ~200 µs; 64 streams
# send ~12,800 chunks/s), and we measured medians of 0.06-0.3 s and maxima up to 1.6 s
# (tens of tokens of overage per abort). A sanity bound under that load, not a target.
ABORT_LATENCY_MAX_S = 3.0


async def _run_fleet(address: str, fake: FakeOpenAIServer, spool_dir: Path) -> list[Any]:
    results = await asyncio.gather(
        *(
            run_module_json(
                "tests.support.meter_fleet",
                "--budgetd",
                address,
                "--base-url",
                fake.base_url,
                "--budget",
                "fleet:shared",
                "--spool-dir",
                str(spool_dir / f"p{seed}"),
                "--streams",
                str(STREAMS_PER_PROCESS),
                "--seed",
                str(seed),
                "--tokens",
                f"{TOKENS[0]},{TOKENS[1]}",
                "--rates",
                f"{RATES[0]},{RATES[1]}",
                timeout_s=110,
            )
            for seed in range(PROCESSES)
        )
    )
    return [stream for result in results for stream in result["streams"]]


async def test_64_streams_from_4_processes_share_one_budget(db_url: str, tmp_path: Path) -> None:
    encoding = get_encoding_for_model("gpt-4o")
    server = await start_server_process(db_url)
    try:
        async with FakeOpenAIServer() as fake, stubs(server.address) as api:
            await create(api, "fleet:shared", LIMIT)
            streams = await _run_fleet(server.address, fake, tmp_path)
            records = {record.request_id: record for record in fake.records}
            budget = (
                await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="fleet:shared"))
            ).budget
            found = await histories(api, "fleet:shared")
            await assert_ledger_clean(api)
    finally:
        server.kill()
        await server.process.wait()

    assert len(streams) == PROCESSES * STREAMS_PER_PROCESS
    refused = [s for s in streams if s["refused"]]
    metered = [s for s in streams if not s["refused"]]
    aborted = [s for s in metered if s["aborted"]]
    assert aborted, "the budget must run out mid-stream for this test to mean anything"
    assert len(aborted) < len(metered), "some streams should fit in the budget"
    assert len(records) == len(metered)  # a refused stream sent nothing to the provider

    # The ledger: nothing past the limit but recorded overage; every reservation ended by
    # exactly one COMMIT, and the figures are the sums of what the streams were told.
    assert budget.reserved == 0
    assert budget.spent <= budget.limit + budget.overage
    assert budget.spent == sum(s["charged"] for s in metered)
    assert budget.overage == sum(s["overage"] for s in metered)
    assert len(found) == len(metered)
    for history in found.values():
        assert history.kinds["COMMIT"] == 1, history.kinds
        assert history.kinds["EXPIRE"] == 0, history.kinds

    in_flight: list[int] = []
    latencies_s: list[float] = []
    read_after_abort: list[int] = []  # tokens counted after the abort reached the client
    for stream in metered:
        record = records[stream["request_id"]]
        history = found[stream["reservation_id"]]
        reservation = history.reservation
        assert not stream["spooled"]
        assert stream["charged"] == reservation.charged == history.charged_by_entries
        assert stream["overage"] == reservation.overage
        # The prompt estimate is exact here, so input never adds overage.
        assert stream["prompt_estimate"] == record.prompt_tokens
        assert reservation.grant_input_tokens == record.prompt_tokens
        sent_tokens = count_text(encoding, record.text_sent)
        if not stream["aborted"]:
            # Ran to the end: charged the provider's own usage, which is what was sent.
            assert record.completed
            assert stream["received_text"] == record.text_sent
            assert sent_tokens == record.tokens_sent == stream["tokens_requested"]
            assert stream["charged"] == record.prompt_tokens + record.tokens_sent
            continue
        # Aborted: the client charged what it counted, an exact count of what it received,
        # which is what the fake server sent less the tokens still in flight when the
        # connection closed.
        # (The app may not see the last chunk counted: it arrived with the abort.)
        counted_text = stream["counted_text"]
        assert counted_text.startswith(stream["received_text"])
        assert record.text_sent.startswith(counted_text)
        assert stream["counted_output"] == count_text(encoding, counted_text)
        assert stream["charged"] == record.prompt_tokens + stream["counted_output"]
        assert 0 <= sent_tokens - stream["counted_output"] <= record.tokens_sent
        in_flight.append(record.tokens_sent - stream["counted_output"])
        # Overage: the tokens counted beyond the grant, which is no more than what was
        # really sent beyond it, and no more than what was counted while the abort was
        # on its way (plus the chunk being read when it arrived).
        granted = reservation.grant_output_tokens
        assert stream["overage"] == max(0, stream["counted_output"] - granted)
        assert stream["overage"] <= max(0, record.tokens_sent - granted)
        assert stream["output_at_abort"] is not None
        after_abort = stream["counted_output"] - stream["output_at_abort"]
        assert after_abort >= 0
        if after_abort > AFTER_ABORT_TOKENS_MAX:
            read_after_abort.append(after_abort)
        if stream["reached_grant_at"] is not None:
            latencies_s.append(stream["abort_at"] - stream["reached_grant_at"])
    assert max(latencies_s, default=0.0) < ABORT_LATENCY_MAX_S
    overages = [s["overage"] for s in aborted]
    print(
        f"fleet: {len(metered)} streams, {len(refused)} refused at open, {len(aborted)} "
        f"aborted; spent {budget.spent} of {budget.limit} with overage {budget.overage}; "
        f"per abort overage max {max(overages)} median {statistics.median(overages)}; "
        f"abort latency max {max(latencies_s, default=0):.3f} s median "
        f"{statistics.median(latencies_s) if latencies_s else 0:.3f} s; tokens in flight "
        f"at close max {max(in_flight)} median {statistics.median(in_flight)}"
    )
    # Once the abort reaches the client it reads nothing more (the chunk ready with it is
    # counted, not read on from): a client behind its provider must not drain its buffer.
    assert not read_after_abort, f"streams read on after the abort: {read_after_abort}"
