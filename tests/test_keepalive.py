"""An idle meter stream outlives the client's keepalive pings.

The client pings every 10 s while a stream is quiet (a slow first token, a long pause),
so that a dead connection is noticed. gRPC servers by default take a ping without data
at most every 5 minutes and answer the third early one with GOAWAY "too_many_pings",
which broke every idle meter stream about every 30 s (seen by an audit of the client).
This test pings every 6 s, above budgetd's allowed 5 s and below gRPC's default, and
keeps a stream idle past the third ping.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_client._rpc import CHANNEL_OPTIONS
from budget_server.app import BudgetServer
from budget_server.limits import PING_INTERVAL_WITHOUT_DATA_MIN_MS
from tests.support.ledger import create
from tests.support.meter import finish_request, next_event, open_request
from tests.support.servers import Stubs

pytestmark = pytest.mark.slow

TEST_PING_MS = 6_000
IDLE_S = 4 * TEST_PING_MS / 1000 + 2  # past the third ping, with room


def test_budgetd_accepts_pings_as_often_as_the_client_sends_them() -> None:
    client_ping_ms = dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"]
    assert isinstance(client_ping_ms, int)
    assert client_ping_ms // 2 >= PING_INTERVAL_WITHOUT_DATA_MIN_MS  # jitter is no strike
    assert PING_INTERVAL_WITHOUT_DATA_MIN_MS < TEST_PING_MS <= client_ping_ms


@pytest.mark.parametrize("backend", ["sqlite"])  # gRPC's transport is under test
async def test_an_idle_meter_stream_survives_keepalive_pings(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "keepalive:a", 10_000)
    options = [(k, v) for k, v in CHANNEL_OPTIONS if k != "grpc.keepalive_time_ms"]
    options.append(("grpc.keepalive_time_ms", TEST_PING_MS))
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        call = pb_grpc.BudgetServiceStub(channel).Meter()
        await call.write(open_request("keepalive:a", prompt_tokens=10))
        opened = await next_event(call)
        assert opened.WhichOneof("event") == "opened"
        await asyncio.sleep(IDLE_S)  # nothing sent: only pings on the connection
        await call.write(finish_request(10, 5))
        committed = await next_event(call)
        assert committed.WhichOneof("event") == "committed", committed
        assert committed.committed.charged == 15
