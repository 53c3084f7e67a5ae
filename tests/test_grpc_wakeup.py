"""A busy app loop must not hold back the client's gRPC completions (_grpc_wakeup).

grpc.aio wakes the loop with a byte per completion and reads one per turn; on a loop whose
turns are long the bytes pile up until grpc's poller thread blocks writing them, and every
meter stream of the process goes silent until the loop has read most of them back, one
per turn (13 s in a bench run). A real client process with a busy loop, against a real
budgetd: with the client's fix the backlog never grows past a turn's worth of
completions; without it (the control, which shows the test can fail) the socket fills.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from budget_server.app import BudgetServer
from tests.support.ledger import assert_ledger_clean, create
from tests.support.processes import run_module_json
from tests.support.servers import Stubs

STREAMS = 16
TURN_MS = 20  # a loop turn of an app parsing chunks of many streams
SECONDS = 2.0  # without the fix the socket fills in well under a second
# A few hundred one-byte writes fill the socket (each is charged a whole buffer); with the
# fix a turn leaves at most the completions that arrived during it: one or two per stream.
FULL_AT_LEAST = 150
DRAINED_AT_MOST = 4 * STREAMS


async def busy_client(server: BudgetServer, tmp_path: Path, budget: str, drain: bool) -> dict:
    spec = {
        "address": server.address,
        "spool_dir": str(tmp_path / budget),
        "budget": budget,
        "streams": STREAMS,
        "turn_ms": TURN_MS,
        "seconds": SECONDS,
        "drain": drain,
    }
    result: dict = await run_module_json("tests.support.busy_client", json.dumps(spec))
    return result


@pytest.mark.parametrize("backend", ["sqlite"])  # the hand-over is gRPC's, not the ledger's
async def test_a_busy_loop_keeps_its_grpc_completions_flowing(
    server: BudgetServer, api: Stubs, tmp_path: Path
) -> None:
    await create(api, "busy:drained", 10**6)
    drained = await busy_client(server, tmp_path, "busy:drained", drain=True)
    assert drained["backlog_max"] <= DRAINED_AT_MOST, drained
    # Every token counted was charged: nothing was lost on the way.
    assert drained["charged"] == [drained["turns"]] * STREAMS

    await create(api, "busy:control", 10**6)
    control = await busy_client(server, tmp_path, "busy:control", drain=False)
    assert control["backlog_max"] >= FULL_AT_LEAST, control
    assert control["charged"] == [control["turns"]] * STREAMS
    await assert_ledger_clean(api)
