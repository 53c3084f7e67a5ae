"""Malformed requests get a precise status and a readable message, and never touch the ledger."""

from __future__ import annotations

import base64

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.limits import AMOUNT_MAX, ID_LENGTH_MAX, LABELS_MAX
from tests.support.ledger import all_entries, assert_ledger_clean, create
from tests.support.servers import Stubs

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _raw_reserve(budget_id: str, amount_varint: int) -> bytes:
    """A ReserveRequest whose amount is any 64-bit pattern, as a hostile client may send."""
    encoded_id = budget_id.encode()
    return b"\x0a" + _varint(len(encoded_id)) + encoded_id + b"\x10" + _varint(amount_varint)


BAD_RESERVES = [
    (pb.ReserveRequest(budget_id="bad:x", amount=0), INVALID, "must be positive"),
    (pb.ReserveRequest(budget_id="bad:x", amount=-5), INVALID, "must be positive"),
    (pb.ReserveRequest(budget_id="bad:x", amount=AMOUNT_MAX + 1), INVALID, "above the maximum"),
    (pb.ReserveRequest(budget_id="", amount=5), INVALID, "budget_id is required"),
    (pb.ReserveRequest(budget_id="x" * (ID_LENGTH_MAX + 1), amount=5), INVALID, "maximum is 128"),
    (pb.ReserveRequest(budget_id="bad x", amount=5), INVALID, "may contain only"),
    (pb.ReserveRequest(budget_id="nope", amount=5), grpc.StatusCode.NOT_FOUND, "does not exist"),
    (
        pb.ReserveRequest(budget_id="bad:x", amount=5, ttl_ms=10),
        INVALID,
        "ttl_ms must be between",
    ),
    (
        pb.ReserveRequest(budget_id="bad:x", amount=5, estimate=pb.Usage(output_tokens=5)),
        INVALID,
        "not both",
    ),
    (
        pb.ReserveRequest(budget_id="bad:x", estimate=pb.Usage(input_tokens=-1)),
        INVALID,
        "must not be negative",
    ),
    (
        pb.ReserveRequest(
            budget_id="bad:x", estimate=pb.Usage(input_tokens=5, cached_input_tokens=9)
        ),
        INVALID,
        "cannot exceed",
    ),
    (
        pb.ReserveRequest(
            budget_id="bad:x", amount=5, labels={f"k{i}": "v" for i in range(LABELS_MAX + 1)}
        ),
        INVALID,
        "labels given",
    ),
    (
        pb.ReserveRequest(budget_id="bad:x", amount=5, idempotency_key="k" * 500),
        INVALID,
        "idempotency_key",
    ),
    # Control characters would forge lines of the server's log; PostgreSQL cannot store a NUL.
    (
        pb.ReserveRequest(budget_id="bad:x", amount=5, idempotency_key="k\x00"),
        INVALID,
        "idempotency_key 'k\\x00' contains control characters",
    ),
    (
        pb.ReserveRequest(budget_id="bad:x", amount=5, model="gpt\n2026 ERROR forged"),
        INVALID,
        "contains spaces",
    ),
    (
        pb.ReserveRequest(budget_id="bad:x", amount=5, model="gpt\x07"),
        INVALID,
        "contains control characters",
    ),
    (
        pb.ReserveRequest(budget_id="bad:x", amount=5, labels={"team": "a\nb"}),
        INVALID,
        "label 'team'",
    ),
]


@pytest.mark.parametrize(("request_", "code", "message"), BAD_RESERVES)
async def test_bad_reserve_is_refused_precisely(
    api: Stubs, request_: pb.ReserveRequest, code: grpc.StatusCode, message: str
) -> None:
    await create(api, "bad:x", 1000)
    before = await all_entries(api)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(request_)
    assert caught.value.code() == code
    assert message in (caught.value.details() or "")
    assert await all_entries(api) == before
    await assert_ledger_clean(api)


async def test_amounts_beyond_int64_are_refused(api: Stubs) -> None:
    await create(api, "bad:x", 1000)
    reserve = api.channel.unary_unary(
        "/budgetd.v1.BudgetService/Reserve",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ReserveResponse.FromString,
    )
    for pattern in (2**64 - 1, 2**63, 2**63 + 12345):  # decode as negative int64
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reserve(_raw_reserve("bad:x", pattern))
        assert caught.value.code() == INVALID
    garbage = api.channel.unary_unary(
        "/budgetd.v1.BudgetService/Reserve",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ReserveResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await garbage(b"\xff\xff\xff\xff")
    assert caught.value.code() == INVALID
    assert "not a valid budgetd.v1.ReserveRequest" in (caught.value.details() or "")
    assert [e.kind for e in await all_entries(api)] == [pb.ENTRY_KIND_LIMIT]


async def test_bad_reservation_calls(api: Stubs) -> None:
    await create(api, "bad:y", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="bad:y", amount=100))
    rid = held.reservation.id
    cases = [
        (api.budget.Commit(pb.CommitRequest(reservation_id="")), INVALID),
        (
            api.budget.Commit(pb.CommitRequest(reservation_id="r_" + "0" * 32)),
            grpc.StatusCode.NOT_FOUND,
        ),
        (api.budget.Commit(pb.CommitRequest(reservation_id="x" * 500)), INVALID),
        (api.budget.Commit(pb.CommitRequest(reservation_id=rid, amount=-1)), INVALID),
        (
            api.budget.Commit(
                pb.CommitRequest(reservation_id=rid, amount=3, usage=pb.Usage(output_tokens=3))
            ),
            INVALID,
        ),
        (api.budget.Extend(pb.ExtendRequest(reservation_id=rid, amount=0)), INVALID),
        (api.budget.Release(pb.ReleaseRequest(reservation_id="")), INVALID),
    ]
    before = await all_entries(api)
    for call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code, caught.value.details()
    assert await all_entries(api) == before
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="bad:y"))).budget
    assert (budget.reserved, budget.spent) == (100, 0)
    await assert_ledger_clean(api)


BAD_BUDGETS = [
    (pb.CreateBudgetRequest(id="", unit=pb.UNIT_TOKENS, limit=1), INVALID, "id is required"),
    (pb.CreateBudgetRequest(id="a", limit=1), INVALID, "unit is required"),
    (pb.CreateBudgetRequest(id="a", unit=pb.UNIT_TOKENS, limit=-1), INVALID, "negative"),
    (pb.CreateBudgetRequest(id="a", unit=pb.UNIT_TOKENS, limit=AMOUNT_MAX + 1), INVALID, "maximum"),
    (pb.CreateBudgetRequest(id="a", unit=99, limit=1), INVALID, "unknown value"),
    (
        pb.CreateBudgetRequest(id="a", unit=pb.UNIT_TOKENS, limit=1, time_zone="Mars/Base"),
        INVALID,
        "unknown time zone",
    ),
    # A directory of the zone database, and a name too long for a file: not UNAVAILABLE.
    (
        pb.CreateBudgetRequest(id="a", unit=pb.UNIT_TOKENS, limit=1, time_zone="America"),
        INVALID,
        "unknown time zone 'America'",
    ),
    (
        pb.CreateBudgetRequest(id="a", unit=pb.UNIT_TOKENS, limit=1, time_zone="x" * 300),
        INVALID,
        "unknown time zone",
    ),
    (
        pb.CreateBudgetRequest(id="a", unit=pb.UNIT_TOKENS, limit=1, alert_thresholds_pct=[0]),
        INVALID,
        "threshold",
    ),
    (
        pb.CreateBudgetRequest(id="a", unit=pb.UNIT_TOKENS, limit=1, parent_id="ghost"),
        grpc.StatusCode.NOT_FOUND,
        "ghost",
    ),
    (
        pb.CreateBudgetRequest(id="exists", unit=pb.UNIT_TOKENS, limit=1),
        grpc.StatusCode.ALREADY_EXISTS,
        "already exists",
    ),
]


@pytest.mark.parametrize(("request_", "code", "message"), BAD_BUDGETS)
async def test_bad_budget_definitions(
    api: Stubs, request_: pb.CreateBudgetRequest, code: grpc.StatusCode, message: str
) -> None:
    await create(api, "exists", 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.CreateBudget(request_)
    assert caught.value.code() == code
    assert message in (caught.value.details() or "")
    listed = await api.admin.ListBudgets(pb.ListBudgetsRequest())
    assert [b.id for b in listed.budgets] == ["exists"]


async def test_bad_admin_queries(api: Stubs) -> None:
    cases = [
        api.admin.ListBudgets(pb.ListBudgetsRequest(page_token="%%%")),
        api.admin.ListLedgerEntries(pb.ListLedgerEntriesRequest(page_token="bm90LWEtbnVtYmVy")),
        api.admin.ListLedgerEntries(pb.ListLedgerEntriesRequest(page_size=-1)),
        api.admin.ListLedgerEntries(pb.ListLedgerEntriesRequest(since_us=10, until_us=5)),
        api.admin.UpdateBudget(pb.UpdateBudgetRequest(id="nothing-to-do")),
        api.admin.ListReservations(pb.ListReservationsRequest(state=42)),
        # Numbers past int64, and digits that are not ASCII ("²"): not tokens it issued.
        api.admin.ListLedgerEntries(pb.ListLedgerEntriesRequest(page_token=_token("9" * 23))),
        api.admin.ListLedgerEntries(pb.ListLedgerEntriesRequest(page_token=_token("²"))),
        api.admin.ListReservations(pb.ListReservationsRequest(page_token=_token("9" * 23 + ":x"))),
        api.admin.ListReservations(pb.ListReservationsRequest(page_token=_token("²:x"))),
        api.admin.ListAlerts(pb.ListAlertsRequest(page_token=_token(f'[{10**30}, "a", 50]'))),
    ]
    for call in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == INVALID, caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.GetBudget(pb.GetBudgetRequest(budget_id="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _token(text: str) -> str:
    return base64.b64encode(text.encode(), altchars=b"-_").decode()


async def test_charging_usage_of_no_tokens_is_refused(api: Stubs) -> None:
    await create(api, "bad:z", 1000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Charge(
            pb.ChargeRequest(budget_id="bad:z", usage=pb.Usage(), idempotency_key="zero")
        )
    assert caught.value.code() == INVALID
    assert "at least one token" in (caught.value.details() or "")
    assert [e.kind for e in await all_entries(api, "bad:z")] == [pb.ENTRY_KIND_LIMIT]


async def test_a_key_name_with_control_characters_is_refused(api: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.CreateKey(pb.CreateKeyRequest(name="k\x00", scopes=["read:*"]))
    assert caught.value.code() == INVALID
    assert "contains control characters" in (caught.value.details() or "")


async def test_listing_an_unknown_budget_is_not_found(api: Stubs) -> None:
    calls = [
        api.admin.ListReservations(pb.ListReservationsRequest(budget_id="typo")),
        api.admin.ListLedgerEntries(pb.ListLedgerEntriesRequest(budget_id="typo")),
        api.admin.ListAlerts(pb.ListAlertsRequest(budget_id="typo")),
        api.admin.VerifyLedger(pb.VerifyLedgerRequest(budget_id="typo")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_update_with_an_unspecified_mode_is_refused(api: Stubs) -> None:
    await create(api, "soft:keep", 10, mode=pb.MODE_SOFT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.UpdateBudget(
            pb.UpdateBudgetRequest(id="soft:keep", mode=pb.MODE_UNSPECIFIED)
        )
    assert caught.value.code() == INVALID
    budget = (await api.admin.GetBudget(pb.GetBudgetRequest(budget_id="soft:keep"))).budget
    assert budget.mode == pb.MODE_SOFT


async def test_an_idempotency_key_replays_only_the_kind_of_call_that_used_it(api: Stubs) -> None:
    """A Charge answered with a pending reservation's replay would report a charge that
    was never made; a Reserve answered with a finished charge would get no grant."""
    await create(api, "bad:keys", 1000)
    await api.budget.Reserve(
        pb.ReserveRequest(budget_id="bad:keys", amount=100, idempotency_key="r")
    )
    await api.budget.Charge(pb.ChargeRequest(budget_id="bad:keys", amount=7, idempotency_key="c"))
    before = await all_entries(api)
    calls = [
        api.budget.Charge(pb.ChargeRequest(budget_id="bad:keys", amount=7, idempotency_key="r")),
        api.budget.Reserve(pb.ReserveRequest(budget_id="bad:keys", amount=5, idempotency_key="c")),
    ]
    for call, used_by in zip(calls, ("a reservation", "a charge"), strict=True):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"already names {used_by}" in (caught.value.details() or "")
    replayed = await api.budget.Charge(
        pb.ChargeRequest(budget_id="bad:keys", amount=7, idempotency_key="c")
    )
    assert (replayed.replayed, replayed.charged) == (True, 7)
    assert await all_entries(api) == before
    await assert_ledger_clean(api)
