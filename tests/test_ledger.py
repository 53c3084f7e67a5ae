"""Reserve / extend / commit / release through a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.ledger.model import RecordUsageOp, ReserveOp
from budget_server.ledger.sweeper import sweep_once
from budget_server.ledger.usage import Usage
from tests.support.ledger import all_entries, assert_ledger_clean, create, exhausted_detail
from tests.support.servers import Stubs


async def test_reserve_commit_release_move_the_running_figures(api: Stubs) -> None:
    await create(api, "team:a", 1000)
    first = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:a", amount=400))
    assert first.reservation.state == pb.RESERVATION_STATE_PENDING
    assert first.reservation.granted == 400
    assert (first.budget.spent, first.budget.reserved, first.budget.available) == (0, 400, 600)

    committed = await api.budget.Commit(
        pb.CommitRequest(
            reservation_id=first.reservation.id, usage=pb.Usage(input_tokens=100, output_tokens=150)
        )
    )
    assert committed.charged == 250
    assert committed.overage == 0
    assert committed.reservation.state == pb.RESERVATION_STATE_COMMITTED
    assert (committed.budget.spent, committed.budget.reserved) == (250, 0)

    second = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:a", amount=700))
    released = await api.budget.Release(pb.ReleaseRequest(reservation_id=second.reservation.id))
    assert released.reservation.state == pb.RESERVATION_STATE_RELEASED
    assert (released.budget.spent, released.budget.reserved) == (250, 0)

    kinds = [pb.EntryKind.Name(e.kind) for e in await all_entries(api, "team:a")]
    assert kinds == [
        "ENTRY_KIND_LIMIT",
        "ENTRY_KIND_RESERVE",
        "ENTRY_KIND_COMMIT",
        "ENTRY_KIND_RESERVE",
        "ENTRY_KIND_RELEASE",
    ]
    await assert_ledger_clean(api)


async def test_exhausted_budget_refuses_with_the_amount_available(api: Stubs) -> None:
    await create(api, "team:b", 1000)
    await api.budget.Reserve(pb.ReserveRequest(budget_id="team:b", amount=900))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="team:b", amount=101))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    detail = exhausted_detail(caught.value)
    assert (detail.budget_id, detail.requested, detail.available) == ("team:b", 101, 100)
    assert detail.unit == pb.UNIT_TOKENS
    exact = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:b", amount=100))
    assert exact.budget.available == 0
    await assert_ledger_clean(api)


async def test_soft_budget_grants_past_the_limit(api: Stubs) -> None:
    await create(api, "team:soft", 100, mode=pb.MODE_SOFT)
    response = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:soft", amount=250))
    assert response.budget.reserved == 250
    assert response.budget.available == 0
    await assert_ledger_clean(api)


async def test_commit_above_the_grant_is_charged_and_recorded_as_overage(api: Stubs) -> None:
    await create(api, "team:c", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:c", amount=100))
    committed = await api.budget.Commit(
        pb.CommitRequest(reservation_id=held.reservation.id, usage=pb.Usage(output_tokens=130))
    )
    assert (committed.charged, committed.overage) == (130, 30)
    assert committed.reservation.overage == 30
    assert (committed.budget.spent, committed.budget.overage) == (130, 30)
    entry = (await all_entries(api, "team:c"))[-1]
    assert (entry.kind, entry.spent_delta, entry.reserved_delta, entry.overage_delta) == (
        pb.ENTRY_KIND_COMMIT,
        130,
        -100,
        30,
    )
    await assert_ledger_clean(api)


async def test_reserve_is_idempotent_by_key(api: Stubs) -> None:
    await create(api, "team:d", 1000)
    request = pb.ReserveRequest(budget_id="team:d", amount=300, idempotency_key="req-1")
    first = await api.budget.Reserve(request)
    again = await api.budget.Reserve(request)
    assert again.replayed
    assert not first.replayed
    assert again.reservation.id == first.reservation.id
    assert again.budget.reserved == 300  # charged once
    assert (
        len([e for e in await all_entries(api, "team:d") if e.kind == pb.ENTRY_KIND_RESERVE]) == 1
    )


async def test_concurrent_reserves_with_one_key_make_one_reservation(api: Stubs) -> None:
    import asyncio

    await create(api, "team:e", 1000)
    request = pb.ReserveRequest(budget_id="team:e", amount=10, idempotency_key="same")
    responses = await asyncio.gather(*(api.budget.Reserve(request) for _ in range(20)))
    assert len({r.reservation.id for r in responses}) == 1
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="team:e"))).budget
    assert budget.reserved == 10


async def test_repeated_commit_and_release_return_the_first_result(api: Stubs) -> None:
    await create(api, "team:f", 1000)
    one = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:f", amount=200))
    first = await api.budget.Commit(pb.CommitRequest(reservation_id=one.reservation.id, amount=120))
    repeat = await api.budget.Commit(pb.CommitRequest(reservation_id=one.reservation.id, amount=5))
    assert (first.charged, repeat.charged) == (120, 120)
    assert repeat.budget.spent == 120

    two = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:f", amount=200))
    await api.budget.Release(pb.ReleaseRequest(reservation_id=two.reservation.id))
    again = await api.budget.Release(pb.ReleaseRequest(reservation_id=two.reservation.id))
    assert again.reservation.state == pb.RESERVATION_STATE_RELEASED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Commit(pb.CommitRequest(reservation_id=two.reservation.id, amount=1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "released" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Release(pb.ReleaseRequest(reservation_id=one.reservation.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await assert_ledger_clean(api)


async def test_extend_grows_the_hold_and_is_checked_against_the_limit(api: Stubs) -> None:
    await create(api, "team:g", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:g", amount=500))
    grown = await api.budget.Extend(
        pb.ExtendRequest(reservation_id=held.reservation.id, amount=400)
    )
    assert grown.reservation.granted == 900
    assert grown.budget.reserved == 900
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Extend(pb.ExtendRequest(reservation_id=held.reservation.id, amount=101))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exhausted_detail(caught.value).available == 100
    committed = await api.budget.Commit(
        pb.CommitRequest(reservation_id=held.reservation.id, amount=850)
    )
    assert (committed.charged, committed.overage, committed.budget.reserved) == (850, 0, 0)
    await assert_ledger_clean(api)


async def test_a_grant_must_fit_every_ancestor(api: Stubs) -> None:
    await create(api, "org", 1000)
    await create(api, "org/team", 800, parent="org")
    await create(api, "org/team/app", 5000, parent="org/team")
    await create(api, "org/other", 5000, parent="org")
    await api.budget.Reserve(pb.ReserveRequest(budget_id="org/other", amount=300))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="org/team/app", amount=750))
    assert exhausted_detail(caught.value).budget_id == "org"  # root-first: the root refuses
    granted = await api.budget.Reserve(pb.ReserveRequest(budget_id="org/team/app", amount=700))
    chain = await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="org/team/app"))
    assert [b.id for b in chain.ancestors] == ["org/team", "org"]
    assert [b.reserved for b in (chain.budget, *chain.ancestors)] == [700, 700, 1000]
    await api.budget.Commit(pb.CommitRequest(reservation_id=granted.reservation.id, amount=650))
    chain = await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="org/team/app"))
    assert [b.spent for b in (chain.budget, *chain.ancestors)] == [650, 650, 650]
    assert chain.ancestors[1].reserved == 300
    await assert_ledger_clean(api)


async def test_frozen_budget_refuses_grants_but_accepts_commits(api: Stubs) -> None:
    await create(api, "team:h", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="team:h", amount=100))
    await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id="team:h", frozen=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="team:h", amount=1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "frozen" in (caught.value.details() or "")
    # Tokens already spent are still charged: a freeze must not lose usage.
    done = await api.budget.Commit(pb.CommitRequest(reservation_id=held.reservation.id, amount=40))
    assert done.budget.spent == 40
    await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id="team:h", frozen=False))
    await api.budget.Reserve(pb.ReserveRequest(budget_id="team:h", amount=1))
    await assert_ledger_clean(api)


async def test_lowering_a_limit_is_recorded_and_enforced(api: Stubs) -> None:
    await create(api, "team:i", 1000)
    await api.budget.Reserve(pb.ReserveRequest(budget_id="team:i", amount=600))
    updated = await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id="team:i", limit=500))
    assert updated.budget.limit == 500
    assert updated.budget.available == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="team:i", amount=1))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    limits = [e.amount for e in await all_entries(api, "team:i") if e.kind == pb.ENTRY_KIND_LIMIT]
    assert limits == [1000, 500]


async def test_mixed_unit_hierarchy_charges_each_budget_in_its_unit(api: Stubs) -> None:
    await create(api, "org:money", 10_000_000_000, unit=pb.UNIT_USD)  # $10
    await create(api, "org:money/team", 1_000_000, parent="org:money")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="org:money/team", amount=100))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mix units" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(
            pb.ReserveRequest(
                budget_id="org:money/team",
                estimate=pb.Usage(input_tokens=1000, output_tokens=500),
                model="no-such-model",
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no price" in (caught.value.details() or "")
    await assert_ledger_clean(api)


async def test_admin_listings_paginate(api: Stubs) -> None:
    for i in range(7):
        await create(api, f"list:{i}", 100)
    await create(api, "other", 100)
    seen: list[str] = []
    token = ""
    while True:
        page = await api.admin.ListBudgets(
            pb.ListBudgetsRequest(prefix="list:", page_size=3, page_token=token)
        )
        assert len(page.budgets) <= 3
        seen.extend(b.id for b in page.budgets)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"list:{i}" for i in range(7)]

    for i in range(5):
        await api.budget.Reserve(pb.ReserveRequest(budget_id="list:0", amount=10 + i))
    listed: list[int] = []
    token = ""
    while True:
        page = await api.admin.ListReservations(
            pb.ListReservationsRequest(
                budget_id="list:0",
                state=pb.RESERVATION_STATE_PENDING,
                page_size=2,
                page_token=token,
            )
        )
        listed.extend(r.granted for r in page.reservations)
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == [10, 11, 12, 13, 14]
    reserves = await api.admin.ListLedgerEntries(
        pb.ListLedgerEntriesRequest(budget_id="list:0", kind=pb.ENTRY_KIND_RESERVE)
    )
    assert [e.amount for e in reserves.entries] == [10, 11, 12, 13, 14]


async def test_an_expiry_whose_usage_cannot_be_charged_still_ends_the_reservation(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    """A meter stream's last usage is what its reservation is charged on expiry. Two
    streams that each reported 2**62 tokens: the first expiry is charged that; the second
    would push `spent` past int64, so it is charged what it held, and it ends. It used to
    stay PENDING, the sweeper retrying it every second and the hold blocking deletion."""
    await create(api, "expiry:absurd", 100_000)
    held = []
    for _ in range(2):
        reserved = await server.ledger.reserve(
            ReserveOp(
                budget_id="expiry:absurd",
                amount=256,
                estimate=None,
                model="",
                ttl_ms=1_000,
                idempotency_key=None,
                labels={},
            )
        )
        held.append(reserved.reservation.id)
        await server.ledger.record_usage(
            RecordUsageOp(reservation_id=reserved.reservation.id, usage=Usage(output_tokens=2**62))
        )
    clock.advance(seconds=2)
    assert await sweep_once(server.ledger, clock) == 2

    ended = {
        r.id: r
        for r in (
            await api.admin.ListReservations(pb.ListReservationsRequest(budget_id="expiry:absurd"))
        ).reservations
    }
    assert {ended[i].state for i in held} == {pb.RESERVATION_STATE_EXPIRED}
    assert sorted(ended[i].charged for i in held) == [256, 2**62]
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="expiry:absurd"))).budget
    assert (budget.spent, budget.reserved) == (2**62 + 256, 0)
    await assert_ledger_clean(api)
    await api.admin.DeleteBudget(pb.DeleteBudgetRequest(id="expiry:absurd"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="expiry:absurd"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "budget 'expiry:absurd' was deleted"


async def test_a_repeated_commit_or_release_says_it_was_a_replay(api: Stubs) -> None:
    """A retry of a commit whose answer was lost gets the first result; a second commit
    with another amount gets it too, and `replayed` tells its caller that its amount was
    not applied."""
    await create(api, "replay:c", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="replay:c", amount=300))
    rid = held.reservation.id
    first = await api.budget.Commit(pb.CommitRequest(reservation_id=rid, amount=200))
    again = await api.budget.Commit(pb.CommitRequest(reservation_id=rid, amount=50))
    assert (first.replayed, first.charged) == (False, 200)
    assert (again.replayed, again.charged) == (True, 200)

    other = await api.budget.Reserve(pb.ReserveRequest(budget_id="replay:c", amount=10))
    released = [
        await api.budget.Release(pb.ReleaseRequest(reservation_id=other.reservation.id))
        for _ in range(2)
    ]
    assert [r.replayed for r in released] == [False, True]
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="replay:c"))).budget
    assert (budget.spent, budget.reserved) == (200, 0)
    await assert_ledger_clean(api)
