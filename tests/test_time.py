"""Expiry and calendar windows, with a clock the test moves."""

from __future__ import annotations

import asyncio
from datetime import datetime
from zoneinfo import ZoneInfo

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.clock import ManualClock
from tests.support.ledger import all_entries, assert_ledger_clean, create
from tests.support.servers import Stubs

NEW_YORK = ZoneInfo("America/New_York")


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


async def _state_of(api: Stubs, budget_id: str, reservation_id: str) -> pb.Reservation:
    page = await api.admin.ListReservations(pb.ListReservationsRequest(budget_id=budget_id))
    return next(r for r in page.reservations if r.id == reservation_id)


async def _wait_for_state(
    api: Stubs, budget_id: str, reservation_id: str, state: int
) -> pb.Reservation:
    for _ in range(200):
        reservation = await _state_of(api, budget_id, reservation_id)
        if reservation.state == state:
            return reservation
        await asyncio.sleep(0.02)
    raise AssertionError(f"reservation never reached {pb.ReservationState.Name(state)}")


async def test_sweeper_expires_a_reservation_after_its_ttl(api: Stubs, clock: ManualClock) -> None:
    await create(api, "ttl:a", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="ttl:a", amount=300, ttl_ms=5_000))
    other = await api.budget.Reserve(
        pb.ReserveRequest(budget_id="ttl:a", amount=200, ttl_ms=60_000)
    )
    clock.advance(seconds=4)
    await asyncio.sleep(0.3)  # several sweeps: nothing is due yet
    assert (
        await _state_of(api, "ttl:a", held.reservation.id)
    ).state == pb.RESERVATION_STATE_PENDING

    clock.advance(seconds=2)
    expired = await _wait_for_state(api, "ttl:a", held.reservation.id, pb.RESERVATION_STATE_EXPIRED)
    assert expired.charged == 0  # no usage was reported, so nothing is charged
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="ttl:a"))).budget
    assert (budget.reserved, budget.spent) == (200, 0)
    assert (
        await _state_of(api, "ttl:a", other.reservation.id)
    ).state == pb.RESERVATION_STATE_PENDING

    expire_entries = [e for e in await all_entries(api, "ttl:a") if e.kind == pb.ENTRY_KIND_EXPIRE]
    assert [(e.reserved_delta, e.spent_delta, e.actor) for e in expire_entries] == [
        (-300, 0, "sweeper")
    ]

    # A commit that arrives late reconciles: the real usage is charged, beyond no grant.
    late = await api.budget.Commit(
        pb.CommitRequest(reservation_id=held.reservation.id, usage=pb.Usage(output_tokens=40))
    )
    assert late.reservation.state == pb.RESERVATION_STATE_COMMITTED
    assert (late.charged, late.budget.spent, late.budget.overage) == (40, 40, 40)
    again = await api.budget.Commit(
        pb.CommitRequest(reservation_id=held.reservation.id, usage=pb.Usage(output_tokens=99))
    )
    assert (again.charged, again.budget.spent) == (40, 40)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Release(pb.ReleaseRequest(reservation_id=held.reservation.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await assert_ledger_clean(api)


async def test_extend_refreshes_the_ttl(api: Stubs, clock: ManualClock) -> None:
    await create(api, "ttl:b", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="ttl:b", amount=100, ttl_ms=5_000))
    clock.advance(seconds=4)
    await api.budget.Extend(
        pb.ExtendRequest(reservation_id=held.reservation.id, amount=1, ttl_ms=5_000)
    )
    clock.advance(seconds=4)
    await asyncio.sleep(0.3)
    assert (
        await _state_of(api, "ttl:b", held.reservation.id)
    ).state == pb.RESERVATION_STATE_PENDING
    clock.advance(seconds=2)
    await _wait_for_state(api, "ttl:b", held.reservation.id, pb.RESERVATION_STATE_EXPIRED)
    await assert_ledger_clean(api)


async def test_month_rolls_over_at_local_midnight_not_utc(api: Stubs, clock: ManualClock) -> None:
    clock.set(_us(datetime(2027, 1, 31, 18, 0, tzinfo=NEW_YORK)))  # 23:00 UTC
    created = await create(
        api, "month:ny", 1000, period=pb.PERIOD_MONTH, time_zone="America/New_York"
    )
    assert created.window_start_us == _us(datetime(2027, 1, 1, tzinfo=NEW_YORK))
    assert created.window_end_us == _us(datetime(2027, 2, 1, tzinfo=NEW_YORK))

    spent = await api.budget.Reserve(pb.ReserveRequest(budget_id="month:ny", amount=600))
    await api.budget.Commit(pb.CommitRequest(reservation_id=spent.reservation.id, amount=500))
    carried = await api.budget.Reserve(
        pb.ReserveRequest(budget_id="month:ny", amount=400, ttl_ms=86_400_000)
    )

    clock.set(_us(datetime(2027, 1, 31, 20, 0, tzinfo=NEW_YORK)))  # 01:00 UTC on Feb 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="month:ny", amount=200))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # still January in New York

    clock.set(_us(datetime(2027, 2, 1, 0, 30, tzinfo=NEW_YORK)))
    shown = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="month:ny"))).budget
    assert (shown.spent, shown.reserved) == (0, 400)  # pending reservations carry over
    assert shown.window_start_us == _us(datetime(2027, 2, 1, tzinfo=NEW_YORK))
    assert shown.window_end_us == _us(datetime(2027, 3, 1, tzinfo=NEW_YORK))

    fresh = await api.budget.Reserve(pb.ReserveRequest(budget_id="month:ny", amount=600))
    assert (fresh.budget.spent, fresh.budget.reserved) == (0, 1000)
    rollovers = [e for e in await all_entries(api, "month:ny") if e.kind == pb.ENTRY_KIND_ROLLOVER]
    assert [(e.amount, e.spent_delta) for e in rollovers] == [(500, -500)]

    done = await api.budget.Commit(
        pb.CommitRequest(reservation_id=carried.reservation.id, amount=350)
    )
    assert (done.budget.spent, done.budget.reserved) == (350, 600)  # charged to February
    await assert_ledger_clean(api)

    clock.set(_us(datetime(2027, 2, 15, tzinfo=NEW_YORK)))
    await api.budget.Reserve(pb.ReserveRequest(budget_id="month:ny", amount=1))
    rollovers = [e for e in await all_entries(api, "month:ny") if e.kind == pb.ENTRY_KIND_ROLLOVER]
    assert len(rollovers) == 1  # one rollover per window, however many operations follow


async def test_daily_window_in_a_dst_zone(api: Stubs, clock: ManualClock) -> None:
    # 2027-03-14: New York springs forward; that day has 23 hours.
    clock.set(_us(datetime(2027, 3, 14, 12, 0, tzinfo=NEW_YORK)))
    budget = await create(api, "day:ny", 10, period=pb.PERIOD_DAY, time_zone="America/New_York")
    assert budget.window_end_us - budget.window_start_us == 23 * 3600 * 1_000_000
