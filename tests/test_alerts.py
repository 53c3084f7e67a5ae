"""Tiered alerts, freezes and deletions: once per window, on every replica, to every listener."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.clock import ManualClock
from tests.support.ledger import assert_ledger_clean, create
from tests.support.servers import Stubs, server_processes, stubs


async def _spend(api: Stubs, budget_id: str, amount: int) -> None:
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id=budget_id, amount=amount))
    await api.budget.Commit(pb.CommitRequest(reservation_id=held.reservation.id, amount=amount))


async def _alerts(api: Stubs, budget_id: str) -> list[int]:
    page = await api.admin.ListAlerts(pb.ListAlertsRequest(budget_id=budget_id))
    return [a.threshold_pct for a in page.alerts]


class _Watcher:
    """Collects WatchBudgets events in the background."""

    def __init__(self, api: Stubs, prefix: str) -> None:
        self.call = api.admin.WatchBudgets(pb.WatchBudgetsRequest(prefix=prefix))
        self.events: list[pb.BudgetEvent] = []
        self._arrived = asyncio.Condition()
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.call:
            async with self._arrived:
                self.events.append(event)
                self._arrived.notify_all()

    async def wait_for(
        self, kind: int, count: int = 1, timeout_s: float = 5
    ) -> list[pb.BudgetEvent]:
        def matching() -> list[pb.BudgetEvent]:
            return [e for e in self.events if e.kind == kind]

        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(matching()) >= count)
        return matching()

    def close(self) -> None:
        self.call.cancel()


async def test_thresholds_fire_once_each(api: Stubs, caplog: pytest.LogCaptureFixture) -> None:
    await create(api, "alert:a", 1000)
    await api.admin.UpdateBudget(
        pb.UpdateBudgetRequest(
            id="alert:a", alert_thresholds_pct=[50, 70, 90], set_alert_thresholds=True
        )
    )
    watcher = _Watcher(api, "alert:")
    await asyncio.sleep(0.05)  # the subscription is in place before anything happens
    try:
        await _spend(api, "alert:a", 400)
        assert await _alerts(api, "alert:a") == []
        await _spend(api, "alert:a", 110)  # 51 %
        assert await _alerts(api, "alert:a") == [50]
        await _spend(api, "alert:a", 100)  # 61 %: nothing new
        await _spend(api, "alert:a", 300)  # 91 %: 70 and 90 at once, in order
        assert await _alerts(api, "alert:a") == [50, 70, 90]
        await _spend(api, "alert:a", 50)
        assert await _alerts(api, "alert:a") == [50, 70, 90]
        seen = await watcher.wait_for(pb.BUDGET_EVENT_KIND_ALERT, 3)
        assert [e.threshold_pct for e in seen] == [50, 70, 90]
        logged = [r for r in caplog.records if r.name == "budgetd.alerts"]
        assert [r.getMessage() for r in logged] == [
            f"budget alert:a crossed {pct} % of its limit" for pct in (50, 70, 90)
        ]
        assert [(r.levelname, getattr(r, "limit", None)) for r in logged] == [("WARNING", 1000)] * 3
        assert len({e.id for e in seen}) == 3
        assert seen[0].spent == 510
        committed = await watcher.wait_for(pb.BUDGET_EVENT_KIND_COMMITTED, 5)
        assert [e.amount for e in committed] == [400, 110, 100, 300, 50]
    finally:
        watcher.close()
    await assert_ledger_clean(api)


async def test_a_new_window_fires_again(api: Stubs, clock: ManualClock) -> None:
    await create(api, "alert:day", 100, period=pb.PERIOD_DAY)
    await _spend(api, "alert:day", 60)
    clock.advance(seconds=86_400)
    await _spend(api, "alert:day", 55)
    page = await api.admin.ListAlerts(pb.ListAlertsRequest(budget_id="alert:day"))
    assert [a.threshold_pct for a in page.alerts] == [50, 50]
    assert page.alerts[0].window_start_us != page.alerts[1].window_start_us


async def test_alerts_reach_open_meter_streams_and_freeze_aborts_them(api: Stubs) -> None:
    await create(api, "alert:org", 10_000)
    await create(api, "alert:org/team", 10_000, parent="alert:org")
    call = api.budget.Meter()
    await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id="alert:org/team", model="m")))
    opened = await call.read()
    assert opened.opened.reservation_id
    await _spend(api, "alert:org", 5_100)  # the parent crosses 50 %
    event = await asyncio.wait_for(call.read(), 5)
    assert event.WhichOneof("event") == "alert"
    assert (event.alert.budget_id, event.alert.threshold_pct) == ("alert:org", 50)

    watcher = _Watcher(api, "alert:")
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    frozen_at = loop.time()
    await api.admin.FreezeBudget(pb.FreezeBudgetRequest(id="alert:org", reason="incident 42"))
    event = await asyncio.wait_for(call.read(), 1)
    assert loop.time() - frozen_at < 1
    assert event.abort.reason == pb.ABORT_REASON_FROZEN
    assert event.abort.budget_id == "alert:org"
    assert "incident 42" in event.abort.message
    try:
        (frozen,) = await watcher.wait_for(pb.BUDGET_EVENT_KIND_FROZEN)
        (aborted,) = await watcher.wait_for(pb.BUDGET_EVENT_KIND_ABORTED)
        assert frozen.budget_id == aborted.budget_id == "alert:org"
        assert aborted.reservation_id == opened.opened.reservation_id
    finally:
        watcher.close()
    await call.write(pb.MeterRequest(finish=pb.MeterFinish()))
    assert (await call.read()).WhichOneof("event") == "committed"
    await api.admin.UnfreezeBudget(pb.UnfreezeBudgetRequest(id="alert:org"))
    await api.budget.Reserve(pb.ReserveRequest(budget_id="alert:org/team", amount=1))


async def test_lowering_a_limit_below_what_is_held_aborts_streams(api: Stubs) -> None:
    await create(api, "alert:low", 10_000)
    call = api.budget.Meter()
    await call.write(
        pb.MeterRequest(
            open=pb.MeterOpen(budget_id="alert:low", model="m", prompt_tokens_estimate=1_000)
        )
    )
    await call.read()
    await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id="alert:low", limit=9_000))  # fits
    await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id="alert:low", limit=500))  # does not
    event = await asyncio.wait_for(call.read(), 1)
    assert event.abort.reason == pb.ABORT_REASON_LIMIT_LOWERED
    call.cancel()


async def test_delete_is_refused_while_in_use_then_retires_the_id(api: Stubs) -> None:
    await create(api, "del:parent", 100)
    await create(api, "del:parent/child", 100, parent="del:parent")
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="del:parent/child", amount=5))
    for budget_id, words in (("del:parent", "child"), ("del:parent/child", "open reservation")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.admin.DeleteBudget(pb.DeleteBudgetRequest(id=budget_id))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert words in (caught.value.details() or "")
    await api.budget.Release(pb.ReleaseRequest(reservation_id=held.reservation.id))
    await api.admin.DeleteBudget(pb.DeleteBudgetRequest(id="del:parent/child"))
    for call in (
        api.admin.GetBudget(pb.GetBudgetRequest(budget_id="del:parent/child")),
        api.budget.Reserve(pb.ReserveRequest(budget_id="del:parent/child", amount=1)),
        api.admin.DeleteBudget(pb.DeleteBudgetRequest(id="del:parent/child")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(api, "del:parent/child", 10, parent="del:parent")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = await api.admin.ListBudgets(pb.ListBudgetsRequest(prefix="del:"))
    assert [b.id for b in listed.budgets] == ["del:parent"]
    await api.admin.DeleteBudget(pb.DeleteBudgetRequest(id="del:parent"))
    await assert_ledger_clean(api)


@pytest.mark.postgres
@pytest.mark.slow
async def test_two_processes_fire_each_alert_once_and_relay_freezes(postgres_url: str) -> None:
    async with (
        server_processes(postgres_url, 2) as servers,
        stubs(servers[0].address) as first,
        stubs(servers[1].address) as second,
    ):
        await create(first, "multi:alert", 10_000)
        watcher = _Watcher(second, "multi:")
        await asyncio.sleep(0.2)
        try:
            # 40 commits of 240 from both processes at once: 96 % crosses 50, 70 and 90.
            await asyncio.gather(
                *(_spend((first, second)[i % 2], "multi:alert", 240) for i in range(40))
            )
            assert await _alerts(first, "multi:alert") == [50, 70, 90]
            seen = await watcher.wait_for(pb.BUDGET_EVENT_KIND_ALERT, 3)
            assert sorted(e.threshold_pct for e in seen) == [50, 70, 90]
        finally:
            watcher.close()

        await create(first, "multi:freeze", 100_000)
        call = second.budget.Meter()
        await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id="multi:freeze", model="m")))
        await call.read()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await first.admin.FreezeBudget(pb.FreezeBudgetRequest(id="multi:freeze"))
        event = await asyncio.wait_for(call.read(), 1)
        assert event.abort.reason == pb.ABORT_REASON_FROZEN
        assert loop.time() - started < 1
        call.cancel()
        await assert_ledger_clean(first)
