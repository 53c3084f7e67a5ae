"""Past every limit: RESOURCE_EXHAUSTED or INVALID_ARGUMENT naming the limit, the server
still serving and the ledger untouched."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from budget_client import BudgetClient
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.config import ServerConfig
from budget_server.limits import STREAMS_PER_CONNECTION_MAX
from budget_server.meter.policy import GrantPolicy
from tests.support.ledger import all_entries, assert_ledger_clean, create
from tests.support.servers import Stubs, stubs

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
async def limited(db_url: str) -> AsyncIterator[Stubs]:
    policy = GrantPolicy(usage_messages_per_s_max=2, streams_max=3)
    config = ServerConfig(listen="127.0.0.1:0", db_url=db_url, insecure=True, grant_policy=policy)
    async with BudgetServer(config) as server, stubs(server.address) as api:
        yield api


async def _open(api: Stubs, budget_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    call = api.budget.Meter(metadata=metadata)
    # A stream refused at admission can be ended before this write lands, and grpc.aio then
    # fails the write; the refusal is what the caller reads next either way.
    with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
        await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id=budget_id, model="m")))
    return call


async def test_usage_faster_than_the_stream_limit_is_refused(limited: Stubs) -> None:
    await create(limited, "lim:rate", 1_000_000)
    call = await _open(limited, "lim:rate")
    assert (await call.read()).WhichOneof("event") == "opened"  # type: ignore[attr-defined]
    # A burst of 4 is allowed, then 2/s: the fifth message at once is over the limit. It is
    # the last one written: a write after the server ended the call would fail on the
    # client's side and hide the server's answer behind INTERNAL.
    for output in range(1, 6):
        await call.write(  # type: ignore[attr-defined]
            pb.MeterRequest(usage=pb.MeterUsage(usage=pb.Usage(output_tokens=output)))
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()  # type: ignore[attr-defined]
    assert caught.value.code() == EXHAUSTED
    assert "usage_messages_per_s_max" in (caught.value.details() or "")
    # The server goes on serving, and nothing was charged for the refused messages.
    await limited.budget.Reserve(pb.ReserveRequest(budget_id="lim:rate", amount=1))
    await assert_ledger_clean(limited)


async def test_open_streams_per_process_are_bounded(limited: Stubs) -> None:
    await create(limited, "lim:streams", 1_000_000)
    calls = [await _open(limited, "lim:streams") for _ in range(3)]
    for call in calls:
        assert (await call.read()).WhichOneof("event") == "opened"  # type: ignore[attr-defined]
    refused = await _open(limited, "lim:streams")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused.read()  # type: ignore[attr-defined]
    assert caught.value.code() == EXHAUSTED
    assert "streams_max" in (caught.value.details() or "")
    await calls[0].write(pb.MeterRequest(finish=pb.MeterFinish()))  # type: ignore[attr-defined]
    assert (await calls[0].read()).WhichOneof("event") == "committed"  # type: ignore[attr-defined]
    await calls[0].done_writing()  # type: ignore[attr-defined]
    assert await calls[0].code() == grpc.StatusCode.OK  # type: ignore[attr-defined]
    again = await _open(limited, "lim:streams")
    assert (await again.read()).WhichOneof("event") == "opened"  # type: ignore[attr-defined]
    reserves = [
        e for e in await all_entries(limited, "lim:streams") if e.kind == pb.ENTRY_KIND_RESERVE
    ]
    assert len(reserves) == 4  # the refused stream reserved nothing


async def test_streams_per_key_are_bounded(db_url: str, tmp_path: Path) -> None:
    policy = GrantPolicy(streams_per_key_max=2)
    config = ServerConfig(
        listen="127.0.0.1:0",
        db_url=db_url,
        admin_key_file=str(tmp_path / "admin.key"),
        grant_policy=policy,
    )
    async with BudgetServer(config) as server, stubs(server.address) as api:
        admin = (("authorization", f"Bearer {(tmp_path / 'admin.key').read_text().strip()}"),)
        await api.admin.CreateBudget(
            pb.CreateBudgetRequest(id="lim:key", unit=pb.UNIT_TOKENS, limit=10**6), metadata=admin
        )
        keys = []
        for name in ("one", "two"):
            made = await api.admin.CreateKey(
                pb.CreateKeyRequest(name=name, scopes=["charge:lim:*"]), metadata=admin
            )
            keys.append((("authorization", f"Bearer {made.secret}"),))
        for _ in range(2):
            call = await _open(api, "lim:key", keys[0])
            assert (await call.read()).WhichOneof("event") == "opened"  # type: ignore[attr-defined]
        third = await _open(api, "lim:key", keys[0])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await third.read()  # type: ignore[attr-defined]
        assert caught.value.code() == EXHAUSTED
        assert "streams_per_key_max" in (caught.value.details() or "")
        other = await _open(api, "lim:key", keys[1])
        assert (await other.read()).WhichOneof("event") == "opened"  # type: ignore[attr-defined]


async def test_one_client_holds_more_streams_than_one_connection_allows(
    server: BudgetServer, api: Stubs, tmp_path: Path
) -> None:
    """budgetd lets one HTTP/2 connection have STREAMS_PER_CONNECTION_MAX streams open; the
    client has gRPC open more connections rather than queue its streams behind a full one
    (where an opening meter would wait for another stream to end)."""
    await create(api, "lim:wide", 10**9)
    count = STREAMS_PER_CONNECTION_MAX + 50
    async with BudgetClient(server.address, spool_dir=tmp_path) as client:
        meters = [client.meter("lim:wide", model="gpt-4o") for _ in range(count)]
        await asyncio.wait_for(asyncio.gather(*(m.open() for m in meters)), 60)
        assert server.sessions.open_streams == count
        for meter in meters:
            meter.add_output_tokens(3)
        committed = await asyncio.gather(*(m.finish() for m in meters))
    assert {c.charged for c in committed} == {3}
    await assert_ledger_clean(api)


async def test_oversized_requests_are_refused_and_the_server_stays_up(api: Stubs) -> None:
    await create(api, "lim:size", 100)
    huge = pb.ReserveRequest(budget_id="lim:size", amount=1, labels={"blob": "x" * (17 * 2**20)})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(huge)
    assert caught.value.code() == EXHAUSTED
    big_label = pb.ReserveRequest(budget_id="lim:size", amount=1, labels={"blob": "x" * 10_000})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(big_label)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum is 256" in (caught.value.details() or "")
    await api.budget.Reserve(pb.ReserveRequest(budget_id="lim:size", amount=1))
    await assert_ledger_clean(api)
