"""BudgetService.Meter spoken raw over gRPC against a real server, on SQLite and PostgreSQL.

These pin the stream's promises from DESIGN.md ("The meter stream"): usage inside the
grant is memory work (no SQL, no reply), grants grow geometrically and shrink to exactly
what is left, the server aborts the moment usage reaches a grant that cannot grow (naming
the budget that binds), protocol errors are INVALID_ARGUMENT and leave the ledger as it
was, and a broken stream is either resumed or charged once at its last usage.
"""

from __future__ import annotations

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.ledger.sweeper import sweep_once
from budget_server.meter.policy import GrantPolicy
from tests.support.ledger import all_entries, assert_ledger_clean, create
from tests.support.meter import (
    MeterCall,
    background_tasks,
    finish_request,
    next_event,
    open_request,
    open_stream,
    refill_mark,
    reservation_row,
    sql_statements,
    usage_request,
    wait_entry,
    wait_session_usage,
    wait_until,
)
from tests.support.servers import Stubs

POLICY = GrantPolicy()
INITIAL = POLICY.initial_output_tokens  # 256
RESUME_WINDOW_US = POLICY.resume_window_ms * 1000


def kinds(entries: list[pb.LedgerEntry]) -> list[str]:
    return [pb.EntryKind.Name(e.kind).removeprefix("ENTRY_KIND_") for e in entries]


async def budget(api: Stubs, budget_id: str) -> pb.Budget:
    return (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id=budget_id))).budget


async def expect_event(call: MeterCall, kind: str) -> pb.MeterEvent:
    event = await next_event(call)
    assert event.WhichOneof("event") == kind, f"expected {kind}, got {event}"
    return event


async def committed_after_finish(call: MeterCall, request: pb.MeterRequest) -> pb.MeterCommitted:
    await call.write(request)
    event = await expect_event(call, "committed")
    assert await call.read() == grpc.aio.EOF
    return event.committed


# ----------------------------------------------------------------------------- usage in memory


async def test_usage_inside_the_grant_issues_no_sql_and_gets_no_reply(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "meter:quiet", 100_000)
    background = background_tasks()
    call, opened = await open_stream(api, open_request("meter:quiet", prompt_tokens=50))
    assert opened.granted_output_tokens == INITIAL
    last = refill_mark(INITIAL) - 1  # 191: the most output that stays below the refill mark
    with sql_statements(server, background) as statements:
        for output in range(1, last + 1):
            await call.write(usage_request(50, output))
        # No reply comes, so watch the server's session take the last message in.
        await wait_session_usage(server, "meter:quiet", opened.reservation_id, last)
    assert statements == [], f"{len(statements)} statements for {last} usage messages"

    # Any event sent for a usage message would arrive before this one.
    committed = await committed_after_finish(call, finish_request())
    assert committed.charged == 50 + last
    assert kinds(await all_entries(api, "meter:quiet")) == ["LIMIT", "RESERVE", "COMMIT"]
    await assert_ledger_clean(api)


# ----------------------------------------------------------------------------- grants


async def test_grants_double_while_the_budget_has_room(api: Stubs) -> None:
    await create(api, "meter:grow", 1_000_000)
    call, opened = await open_stream(api, open_request("meter:grow", prompt_tokens=100))
    grants = [opened.granted_output_tokens]
    # Each grant names the output count from which the server acts on usage (the client
    # reports usage below it seldom): its refill mark.
    marks = [opened.report_at_output_tokens]
    for _ in range(4):
        await call.write(usage_request(100, refill_mark(grants[-1]) - 1))  # memory only
        await call.write(usage_request(100, refill_mark(grants[-1])))
        granted = (await expect_event(call, "granted")).granted
        grants.append(granted.granted_output_tokens)
        marks.append(granted.report_at_output_tokens)
    assert grants == [256, 512, 1024, 2048, 4096]
    assert marks == [refill_mark(grant) for grant in grants] == [192, 384, 768, 1536, 3072]

    output = refill_mark(grants[-1]) - 1
    committed = await committed_after_finish(call, finish_request(100, output))
    assert (committed.charged, committed.overage) == (100 + output, 0)
    entries = await all_entries(api, "meter:grow")
    assert kinds(entries) == ["LIMIT", "RESERVE", "EXTEND", "EXTEND", "EXTEND", "EXTEND", "COMMIT"]
    assert [e.amount for e in entries[1:-1]] == [100 + 256, 256, 512, 1024, 2048]
    after = await budget(api, "meter:grow")
    assert (after.spent, after.reserved) == (100 + output, 0)
    await assert_ledger_clean(api)


async def test_near_the_limit_the_grant_shrinks_to_what_is_left_then_aborts(api: Stubs) -> None:
    await create(api, "meter:edge", 1000)
    call, opened = await open_stream(api, open_request("meter:edge", prompt_tokens=100))
    assert opened.granted_output_tokens == 256
    assert not opened.grant_final
    await call.write(usage_request(100, refill_mark(256)))
    granted = (await expect_event(call, "granted")).granted
    assert (granted.granted_output_tokens, granted.final) == (512, False)
    await call.write(usage_request(100, refill_mark(512)))
    # Doubling would ask for 1024; exactly 1000 - 100 = 900 output tokens are left, and
    # the grant says it is the last, so a client may cut the stream at it by itself.
    granted = (await expect_event(call, "granted")).granted
    assert (granted.granted_output_tokens, granted.final, granted.capped_by) == (
        900,
        True,
        "meter:edge",
    )
    assert granted.report_at_output_tokens == 900  # a final grant: usage matters at it
    held = await budget(api, "meter:edge")
    assert (held.spent, held.reserved, held.available) == (0, 1000, 0)

    await call.write(usage_request(100, 899))  # inside the grant: nothing comes back
    await call.write(usage_request(100, 900))  # the grant is reached and cannot grow
    abort = (await expect_event(call, "abort")).abort
    assert abort.reason == pb.ABORT_REASON_EXHAUSTED
    assert abort.budget_id == "meter:edge"
    assert "meter:edge" in abort.message

    # Tokens the provider produced before the abort took effect are still charged.
    await call.write(usage_request(100, 905))
    committed = await committed_after_finish(call, finish_request())
    assert (committed.charged, committed.overage) == (1005, 5)
    assert committed.reservation.state == pb.RESERVATION_STATE_COMMITTED
    assert committed.reservation.usage.output_tokens == 905
    after = committed.budget
    assert (after.spent, after.reserved, after.overage) == (1005, 0, 5)
    commit = (await all_entries(api, "meter:edge"))[-1]
    assert (commit.kind, commit.spent_delta, commit.overage_delta) == (
        pb.ENTRY_KIND_COMMIT,
        1005,
        5,
    )
    await assert_ledger_clean(api)


async def test_open_grant_shrinks_to_what_is_left_and_provider_usage_is_committed(
    api: Stubs,
) -> None:
    await create(api, "meter:small", 300)
    call, opened = await open_stream(api, open_request("meter:small", prompt_tokens=100))
    assert opened.granted_output_tokens == 200  # not 256: only 200 fit after the prompt
    assert (opened.grant_final, opened.capped_by) == (True, "meter:small")
    assert opened.report_at_output_tokens == 200
    await call.write(usage_request(100, refill_mark(200)))  # an extension that cannot grow
    await call.write(usage_request(100, 200))
    abort = (await expect_event(call, "abort")).abort
    assert (abort.reason, abort.budget_id) == (pb.ABORT_REASON_EXHAUSTED, "meter:small")

    # The provider's own count wins over the client's, even below it.
    committed = await committed_after_finish(call, finish_request(98, 197, provider=True))
    assert (committed.charged, committed.overage) == (98 + 197, 0)
    assert (committed.budget.spent, committed.budget.reserved) == (295, 0)
    await assert_ledger_clean(api)


async def test_an_extension_refused_early_marks_the_grant_final(api: Stubs) -> None:
    await create(api, "meter:taken", 700)
    call, opened = await open_stream(api, open_request("meter:taken", prompt_tokens=100))
    assert (opened.granted_output_tokens, opened.grant_final) == (256, False)
    # Another caller takes the rest, so the extension asked for at the refill mark finds
    # no room: the same grant comes back, now final, well before the stream reaches it.
    await api.budget.Reserve(pb.ReserveRequest(budget_id="meter:taken", amount=344))
    await call.write(usage_request(100, refill_mark(256)))
    granted = (await expect_event(call, "granted")).granted
    assert (granted.granted_output_tokens, granted.final, granted.capped_by) == (
        256,
        True,
        "meter:taken",
    )
    assert granted.report_at_output_tokens == 256
    await call.write(usage_request(100, 256))
    abort = (await expect_event(call, "abort")).abort
    assert (abort.reason, abort.budget_id) == (pb.ABORT_REASON_EXHAUSTED, "meter:taken")
    committed = await committed_after_finish(call, finish_request(100, 256))
    assert (committed.charged, committed.overage) == (356, 0)
    await assert_ledger_clean(api)


async def test_open_is_refused_when_not_even_the_prompt_fits(api: Stubs) -> None:
    await create(api, "meter:full", 50)
    call = api.budget.Meter()
    await call.write(open_request("meter:full", prompt_tokens=100))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_event(call)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert kinds(await all_entries(api, "meter:full")) == ["LIMIT"]
    await assert_ledger_clean(api)


# ----------------------------------------------------------------------------- protocol errors


BAD_STREAMS: dict[str, tuple[list[pb.MeterRequest], str, int]] = {
    # name: (messages after a valid open, or the whole stream; expected text; usage kept)
    "usage before open": (
        [usage_request(10, 1)],
        "first message of a meter stream must be open",
        -1,
    ),
    "finish before open": ([finish_request()], "first message of a meter stream must be open", -1),
    "second open": ([usage_request(10, 3), open_request("meter:bad")], "send open only once", 3),
    "usage backwards": ([usage_request(10, 7), usage_request(10, 6)], "went backwards", 7),
    "cached above input": (
        [usage_request(10, 4), usage_request(10, 5, cached_input_tokens=11)],
        "cached_input_tokens cannot exceed input_tokens",
        4,
    ),
    "empty message": ([pb.MeterRequest()], "set open, usage or finish", 0),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
async def test_protocol_errors_are_invalid_argument_and_leave_the_ledger_alone(
    server: BudgetServer, api: Stubs, clock: ManualClock, case: str
) -> None:
    messages, expected, usage_kept = BAD_STREAMS[case]
    await create(api, "meter:bad", 10_000)
    call = api.budget.Meter()
    reservation_id = ""
    if usage_kept >= 0:  # the case starts from a valid open
        await call.write(open_request("meter:bad", prompt_tokens=10))
        reservation_id = (await expect_event(call, "opened")).opened.reservation_id
    for message in messages:
        await call.write(message)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_event(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (caught.value.details() or "")

    entries = await all_entries(api, "meter:bad")
    if not reservation_id:
        assert kinds(entries) == ["LIMIT"]
        assert (await budget(api, "meter:bad")).reserved == 0
    else:
        # The stream broke: its reservation waits out the resume window, holding its grant
        # and the last valid usage; the bad message changed nothing.
        assert kinds(entries) == ["LIMIT", "RESERVE"]
        row = await wait_until(
            lambda: _row_if_broken(server, reservation_id, clock.now_us() + RESUME_WINDOW_US),
            "the broken stream's reservation to be kept for the resume window",
        )
        assert (row.state, row.input_tokens, row.output_tokens) == (
            "PENDING",
            10 if usage_kept else 0,
            usage_kept,
        )
        assert (await budget(api, "meter:bad")).reserved == 10 + INITIAL
    await assert_ledger_clean(api)


async def _row_if_broken(server: BudgetServer, reservation_id: str, expires_at_us: int) -> object:
    row = await reservation_row(server, reservation_id)
    return row if row.expires_at_us == expires_at_us else None


# ----------------------------------------------------------------------------- broken streams


async def _break_stream_at(
    server: BudgetServer, api: Stubs, clock: ManualClock, budget_id: str, output: int
) -> str:
    """Open a stream with a 100-token prompt, report `output`, cancel it without finish,
    and wait until the server has persisted that usage for the resume window."""
    call, opened = await open_stream(api, open_request(budget_id, prompt_tokens=100))
    await call.write(usage_request(100, output))
    await wait_session_usage(server, budget_id, opened.reservation_id, output)
    call.cancel()
    row = await wait_until(
        lambda: _row_if_broken(server, opened.reservation_id, clock.now_us() + RESUME_WINDOW_US),
        "the cancelled stream's usage to be persisted",
    )
    assert (row.state, row.input_tokens, row.output_tokens) == ("PENDING", 100, output)
    return opened.reservation_id


async def test_a_cancelled_stream_expires_charged_at_its_last_usage(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    await create(api, "meter:cut", 10_000)
    reservation_id = await _break_stream_at(server, api, clock, "meter:cut", 150)

    clock.advance(seconds=9)  # still inside the resume window
    assert server.ledger is not None
    assert await sweep_once(server.ledger, clock) == 0
    assert (await reservation_row(server, reservation_id)).state == "PENDING"

    clock.advance(seconds=2)
    expire = await wait_entry(api, "meter:cut", pb.ENTRY_KIND_EXPIRE, reservation_id)
    assert expire.spent_delta == 100 + 150
    assert expire.reserved_delta == -(100 + INITIAL)
    assert (expire.usage.input_tokens, expire.usage.output_tokens) == (100, 150)
    assert expire.actor == "sweeper"
    row = await reservation_row(server, reservation_id)
    assert (row.state, row.charged) == ("EXPIRED", 250)
    after = await budget(api, "meter:cut")
    assert (after.spent, after.reserved) == (250, 0)
    assert kinds(await all_entries(api, "meter:cut")) == ["LIMIT", "RESERVE", "EXPIRE"]
    await assert_ledger_clean(api)


async def test_a_cancelled_stream_resumed_in_time_is_charged_once(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    await create(api, "meter:resume", 10_000)
    reservation_id = await _break_stream_at(server, api, clock, "meter:resume", 150)
    clock.advance(seconds=5)

    call, opened = await open_stream(
        api, open_request("meter:resume", resume_reservation_id=reservation_id)
    )
    assert opened.resumed
    assert opened.reservation_id == reservation_id
    assert (opened.usage.input_tokens, opened.usage.output_tokens) == (100, 150)
    assert opened.granted_output_tokens == INITIAL

    # Cumulative totals carry on from the server's; crossing the refill mark still extends.
    await call.write(usage_request(100, 180))
    await call.write(usage_request(100, refill_mark(INITIAL)))
    assert (await expect_event(call, "granted")).granted.granted_output_tokens == 2 * INITIAL
    committed = await committed_after_finish(call, finish_request(100, 240))
    assert (committed.charged, committed.overage) == (340, 0)
    assert committed.reservation.id == reservation_id

    clock.advance(seconds=11)  # past the old resume window: nothing is left to expire
    assert server.ledger is not None
    assert await sweep_once(server.ledger, clock) == 0
    entries = await all_entries(api, "meter:resume")
    assert kinds(entries) == ["LIMIT", "RESERVE", "EXTEND", "COMMIT"]
    assert sum(e.spent_delta for e in entries) == 340
    after = await budget(api, "meter:resume")
    assert (after.spent, after.reserved) == (340, 0)
    await assert_ledger_clean(api)


async def test_a_resumed_stream_cannot_report_less_than_the_server_knows(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    await create(api, "meter:resume-back", 10_000)
    reservation_id = await _break_stream_at(server, api, clock, "meter:resume-back", 150)
    call, _opened = await open_stream(
        api, open_request("meter:resume-back", resume_reservation_id=reservation_id)
    )
    await call.write(usage_request(100, 149))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_event(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "went backwards" in (caught.value.details() or "")
    await assert_ledger_clean(api)


# ----------------------------------------------------------------------------- hierarchy


@pytest.mark.parametrize(
    ("root_limit", "leaf_limit", "binding"),
    [(1000, 100_000, "org:h"), (100_000, 1000, "org:h/team:a")],
    ids=["ancestor binds", "leaf binds"],
)
async def test_a_leaf_stream_aborts_naming_the_budget_whose_limit_binds(
    api: Stubs, root_limit: int, leaf_limit: int, binding: str
) -> None:
    await create(api, "org:h", root_limit)
    await create(api, "org:h/team:a", leaf_limit, parent="org:h")
    call, opened = await open_stream(api, open_request("org:h/team:a", prompt_tokens=100))
    assert opened.granted_output_tokens == 256
    await call.write(usage_request(100, refill_mark(256)))
    assert (await expect_event(call, "granted")).granted.granted_output_tokens == 512
    await call.write(usage_request(100, refill_mark(512)))
    assert (await expect_event(call, "granted")).granted.granted_output_tokens == 900
    await call.write(usage_request(100, 900))
    abort = (await expect_event(call, "abort")).abort
    assert (abort.reason, abort.budget_id) == (pb.ABORT_REASON_EXHAUSTED, binding)

    committed = await committed_after_finish(call, finish_request())
    assert committed.charged == 1000
    for budget_id in ("org:h", "org:h/team:a"):
        figures = await budget(api, budget_id)
        assert (figures.spent, figures.reserved) == (1000, 0), budget_id
    await assert_ledger_clean(api)


# ----------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("frozen", ["org:ice", "org:ice/team:a"], ids=["ancestor", "leaf"])
async def test_freezing_aborts_an_open_stream_at_once_naming_the_frozen_budget(
    api: Stubs, frozen: str
) -> None:
    await create(api, "org:ice", 100_000)
    await create(api, "org:ice/team:a", 100_000, parent="org:ice")
    call, _opened = await open_stream(api, open_request("org:ice/team:a", prompt_tokens=100))
    await call.write(usage_request(100, 100))  # well inside the grant: no extension pending
    await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id=frozen, frozen=True))
    abort = (await expect_event(call, "abort")).abort
    assert (abort.reason, abort.budget_id) == (pb.ABORT_REASON_FROZEN, frozen)
    assert "frozen" in abort.message

    committed = await committed_after_finish(call, finish_request(100, 104))
    assert committed.charged == 204
    assert committed.budget.reserved == 0
    await assert_ledger_clean(api)


@pytest.mark.parametrize("frozen", ["org:ice", "org:ice/team:a"], ids=["ancestor", "leaf"])
async def test_an_extension_refused_by_a_freeze_aborts_with_frozen(
    server: BudgetServer, api: Stubs, clock: ManualClock, frozen: str
) -> None:
    """A stream that was not open when the freeze happened (broken, then resumed) meets it
    at its next extension, which happens at the refill mark."""
    await create(api, "org:ice", 100_000)
    await create(api, "org:ice/team:a", 100_000, parent="org:ice")
    reservation_id = await _break_stream_at(server, api, clock, "org:ice/team:a", 100)
    await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id=frozen, frozen=True))
    call, opened = await open_stream(
        api, open_request("org:ice/team:a", resume_reservation_id=reservation_id)
    )
    assert opened.resumed
    await call.write(usage_request(100, refill_mark(INITIAL)))  # the extension is refused
    abort = (await expect_event(call, "abort")).abort
    assert (abort.reason, abort.budget_id) == (pb.ABORT_REASON_FROZEN, frozen)

    committed = await committed_after_finish(call, finish_request())
    assert committed.charged == 100 + refill_mark(INITIAL)
    await assert_ledger_clean(api)
