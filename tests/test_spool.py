"""Fail-open and fail-closed when budgetd cannot be reached (SQLite and PostgreSQL).

Fail open: the LLM call runs unmetered, its usage is spooled to disk under its
idempotency key, and replayed when budgetd is back, charged exactly once however often it
is replayed. A call that had a reservation before budgetd went away is spooled with it; if
the reservation expired meanwhile, the replayed Commit reconciles it to the real usage.
Fail closed: BudgetUnavailable before anything is sent to the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from budget_client import BudgetClient, BudgetUnavailable, Usage, wrap_openai
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._spool import SpoolEntry
from budget_client.testing import FakeOpenAIServer
from budget_server.clock import ManualClock
from budget_server.meter.policy import GrantPolicy
from tests.support.ledger import assert_ledger_clean, create
from tests.support.meter import wait_session_usage
from tests.support.metered import (
    TcpProxy,
    consume,
    free_port,
    histories,
    inprocess_server,
    wait_until,
)
from tests.support.servers import Stubs, stubs

REPLY_TOKENS = 300


@asynccontextmanager
async def _metered_openai(fake: FakeOpenAIServer, budgets: BudgetClient) -> AsyncIterator[Any]:
    async with (
        budgets,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0) as raw,
    ):
        yield wrap_openai(raw, budgets)


async def _create(oai: Any, budget_id: str, rate: float = 0) -> Any:
    return await oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Count to a few hundred, slowly."}],
        stream=True,
        budget=budget_id,
        extra_headers={"x-fake-tokens": str(REPLY_TOKENS), "x-fake-rate": str(rate)},
    )


async def _spent(api: Stubs, budget_id: str) -> pb.Budget:
    return (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id=budget_id))).budget


async def test_fail_open_spools_usage_and_replays_it_exactly_once(
    db_url: str, tmp_path: Path
) -> None:
    async with inprocess_server(db_url) as setup, stubs(setup.address) as api:
        await create(api, "spool:a", 1_000_000)
    port = free_port()  # budgetd will listen here; nothing does yet
    budgets = BudgetClient(
        f"127.0.0.1:{port}",
        spool_dir=tmp_path / "spool",
        connect_timeout_s=1.0,
        replay_interval_s=0.1,
    )
    async with FakeOpenAIServer() as fake, _metered_openai(fake, budgets) as oai:
        stream = await _create(oai, "spool:a")
        meter = stream.meter
        assert meter.state == "unmetered"  # budgetd is down: the call runs anyway
        outcome = await consume(stream)
        (record,) = fake.records
        assert record.completed
        assert outcome.text == record.text_sent
        expected = record.prompt_tokens + record.tokens_sent
        assert meter.committed is not None
        assert meter.committed.spooled
        ((path, entry),) = budgets.spool.entries()
        assert entry.reservation_id == ""
        assert entry.usage.input_tokens + entry.usage.output_tokens == expected
        spooled_text = path.read_text()

        async with inprocess_server(db_url, port=port) as server, stubs(server.address) as api:
            # The background replayer notices budgetd is back.
            await wait_until(
                lambda: not budgets.spool.entries(), timeout_s=10, what="the spool to drain"
            )
            assert (await _spent(api, "spool:a")).spent == expected
            # Replayed again (another process sharing the directory, a crash before the
            # file was removed): the Charge is idempotent by key, nothing more is charged.
            path.write_text(spooled_text)
            assert await budgets.replay_spool() == 1
            assert not budgets.spool.entries()
            budget = await _spent(api, "spool:a")
            assert budget.spent == expected
            assert budget.reserved == 0
            (history,) = (await histories(api, "spool:a")).values()
            assert history.kinds["COMMIT"] == 1, history.kinds
            assert history.reservation.charged == expected
            await assert_ledger_clean(api)


async def test_spooled_usage_of_an_expired_reservation_is_reconciled(
    db_url: str, tmp_path: Path
) -> None:
    """The stream had a reservation; budgetd became unreachable mid-stream and stayed so
    past finish_timeout_s, so the usage was spooled with the reservation id; meanwhile the
    reservation expired at the last usage budgetd knew. The replayed Commit charges the
    rest, exactly once."""
    clock = ManualClock(time.time_ns() // 1000)
    policy = GrantPolicy(ttl_ms=2_000, heartbeat_ms=500, resume_window_ms=500)
    async with (
        inprocess_server(db_url, clock=clock, policy=policy) as server,
        stubs(server.address) as api,
        TcpProxy(server.port) as proxy,
        FakeOpenAIServer() as fake,
    ):
        await create(api, "spool:b", 1_000_000)
        budgets = BudgetClient(
            proxy.address,
            spool_dir=tmp_path / "spool",
            finish_timeout_s=0.5,
            replay_interval_s=0.1,
        )
        async with _metered_openai(fake, budgets) as oai:
            stream = await _create(oai, "spool:b", rate=300)
            meter = stream.meter
            assert meter.state == "open"
            reading = asyncio.create_task(consume(stream))
            await wait_session_usage(server, "spool:b", meter.reservation_id, 100)
            await proxy.cut()
            outcome = await reading
            (record,) = fake.records
            expected = record.prompt_tokens + record.tokens_sent
            assert outcome.aborted is None
            assert meter.committed is not None
            assert meter.committed.spooled
            ((path, entry),) = budgets.spool.entries()
            assert entry.reservation_id == meter.reservation_id
            spooled_text = path.read_text()

            while True:  # budgetd's sweeper ends the reservation once its time is up
                found = (await histories(api, "spool:b"))[meter.reservation_id].reservation
                if found.state == pb.RESERVATION_STATE_EXPIRED:
                    break
                clock.set(max(clock.now_us(), found.expires_at_us + 1))
                await asyncio.sleep(0.025)
            assert 0 < found.charged < expected

            await proxy.open()  # reachable again: the background replayer settles the entry
            await wait_until(lambda: not budgets.spool.entries(), what="the spool to drain")
            path.write_text(spooled_text)  # and once more: still charged once
            assert await budgets.replay_spool() == 1

            history = (await histories(api, "spool:b"))[meter.reservation_id]
            assert history.reservation.state == pb.RESERVATION_STATE_COMMITTED
            assert history.reservation.charged == expected
            assert history.kinds["EXPIRE"] == 1, history.kinds
            assert history.kinds["COMMIT"] == 1, history.kinds
            assert history.charged_by_entries == expected
            budget = await _spent(api, "spool:b")
            assert budget.spent == expected
            assert budget.reserved == 0
            await assert_ledger_clean(api)


async def test_fail_closed_raises_before_the_request_is_sent(tmp_path: Path) -> None:
    budgets = BudgetClient(
        f"127.0.0.1:{free_port()}", fail_policy="closed", spool_dir=tmp_path / "spool"
    )
    async with FakeOpenAIServer() as fake, _metered_openai(fake, budgets) as oai:
        with pytest.raises(BudgetUnavailable):
            await _create(oai, "spool:c")
        assert fake.records == []  # nothing reached the provider
        assert not budgets.spool.entries()


async def test_a_spooled_call_that_used_no_tokens_is_settled_without_a_charge(
    api: Stubs, tmp_path: Path
) -> None:
    """budgetd refuses a Charge of no tokens; a spooled entry of none is settled by
    replay rather than refused (and retried, logged) for ever."""
    await create(api, "spool:zero", 1_000)
    async with BudgetClient(api.address, spool_dir=tmp_path / "spool") as budgets:
        budgets.spool.add(
            SpoolEntry(
                idempotency_key="zero-1", budget_id="spool:zero", model="gpt-4o", usage=Usage()
            )
        )
        assert await budgets.replay_spool() == 1
        assert not budgets.spool.entries()
    assert (await _spent(api, "spool:zero")).spent == 0
    await assert_ledger_clean(api)


async def test_a_meter_outliving_its_client_spools_its_usage_for_the_next(
    api: Stubs, tmp_path: Path
) -> None:
    """An app that closes its BudgetClient while a meter is still open: the meter's end
    used to raise RuntimeError("the BudgetClient is closed") and lose its usage. Now it is
    spooled, and the next client on the spool commits it."""
    await create(api, "spool:closed", 10_000)
    spool_dir = tmp_path / "spool"
    budgets = BudgetClient(api.address, spool_dir=spool_dir)
    async with budgets.meter("spool:closed", model="gpt-4o", prompt_tokens=9) as meter:
        meter.add_output_tokens(30)
        await budgets.close()
        meter.add_output_tokens(70)
    committed = meter.committed
    assert committed is not None
    assert committed.spooled
    async with BudgetClient(api.address, spool_dir=spool_dir) as later:
        await wait_until(lambda: not later.spool.entries(), what="the spool to drain")
    budget = await _spent(api, "spool:closed")
    assert (budget.spent, budget.reserved) == (9 + 100, 0)
    await assert_ledger_clean(api)
