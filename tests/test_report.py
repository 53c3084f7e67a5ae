"""UsageReport against hand-computed totals, on SQLite and PostgreSQL, and `budgetctl report`.

The charges are made through the real API at chosen times (the ManualClock), on a small
hierarchy with a USD parent, so the totals below can be checked by hand:

    rep:org (tokens)         rep:solo (tokens)    rep:usd (USD)       zzz:other (tokens)
     ├── rep:org/a (tokens)                        └── rep:usd/t (tokens)
     └── rep:org/b (tokens)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import insert

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.config import ServerConfig
from budget_server.db.schema import ledger_entries, reservations
from budget_server.ledger.report import ChargeEntry, Totals, utc_day
from budget_server.ledger.usage import Usage
from tests.support.ledger import create
from tests.support.servers import Stubs, stubs

PRICED_MODEL = "report-test-model"  # $1 per 1M input tokens, $2 per 1M output


def at(text: str) -> int:
    """Microseconds since the epoch of a UTC time."""
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


DAY1 = at("2026-11-28T10:00:00")
DAY2_LAST_US = at("2026-11-29T23:59:59.999999")
DAY3 = at("2026-11-30T00:00:00")


async def _commit(
    api: Stubs,
    budget_id: str,
    hold: int,
    usage: pb.Usage,
    *,
    model: str,
    labels: dict[str, str] | None = None,
) -> None:
    held = await api.budget.Reserve(
        pb.ReserveRequest(budget_id=budget_id, amount=hold, model=model, labels=labels or {})
    )
    await api.budget.Commit(pb.CommitRequest(reservation_id=held.reservation.id, usage=usage))


async def record_charges(api: Stubs, clock: ManualClock) -> None:
    """The charges every report below is computed from (see each test's expectations)."""
    clock.set(DAY1)
    await create(api, "rep:org", 10_000_000)
    await create(api, "rep:org/a", 1_000_000, parent="rep:org")
    await create(api, "rep:org/b", 1_000_000, parent="rep:org")
    await create(api, "rep:solo", 1_000_000)
    await create(api, "rep:usd", 10**12, unit=pb.UNIT_USD)
    await create(api, "rep:usd/t", 1_000_000, parent="rep:usd")
    await create(api, "zzz:other", 1_000_000)
    await api.admin.SetPrice(
        pb.SetPriceRequest(
            price=pb.ModelPrice(
                model=PRICED_MODEL,
                input_nanousd_per_mtok=1_000_000_000,
                cached_input_nanousd_per_mtok=1_000_000_000,
                output_nanousd_per_mtok=2_000_000_000,
            )
        )
    )

    # Day 1: c1 charges 150 within its hold; c2 charges 400 on a hold of 100 (overage 300).
    await _commit(
        api, "rep:org/a", 200,
        pb.Usage(input_tokens=100, cached_input_tokens=20, output_tokens=50, reasoning_tokens=10),
        model="gpt-a", labels={"team": "search"},
    )  # fmt: skip
    await _commit(
        api, "rep:org/b", 100, pb.Usage(input_tokens=300, output_tokens=100),
        model="gpt-b", labels={"team": "ads"},
    )  # fmt: skip
    released = await api.budget.Reserve(pb.ReserveRequest(budget_id="rep:org/a", amount=500))
    await api.budget.Release(pb.ReleaseRequest(reservation_id=released.reservation.id))

    # Day 2, its last microsecond: c3 charges 15 on a hold of 5 (overage 10).
    clock.set(DAY2_LAST_US)
    await _commit(api, "rep:org/a", 5, pb.Usage(input_tokens=10, output_tokens=5), model="gpt-a")

    # Day 3, midnight: c4; c5 on a chain priced in USD above tokens; c6 outside "rep:".
    clock.set(DAY3)
    await _commit(
        api, "rep:solo", 1000, pb.Usage(input_tokens=1000),
        model="gpt-a", labels={"team": "search"},
    )  # fmt: skip
    c5_usage = pb.Usage(input_tokens=1000, output_tokens=500)
    held = await api.budget.Reserve(
        pb.ReserveRequest(
            budget_id="rep:usd/t", estimate=c5_usage, model=PRICED_MODEL, labels={"team": "search"}
        )
    )
    await api.budget.Commit(pb.CommitRequest(reservation_id=held.reservation.id, usage=c5_usage))
    await _commit(api, "zzz:other", 14, pb.Usage(input_tokens=7, output_tokens=7), model="gpt-a")

    # c7: expires uncharged (no usage reported), then its commit arrives late with 40 tokens.
    late = await api.budget.Reserve(
        pb.ReserveRequest(budget_id="rep:org/a", amount=100, ttl_ms=1000, model="gpt-a")
    )
    clock.advance(seconds=2)
    for _ in range(500):
        page = await api.admin.ListReservations(
            pb.ListReservationsRequest(budget_id="rep:org/a", state=pb.RESERVATION_STATE_EXPIRED)
        )
        if page.reservations:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the sweeper never expired c7")
    clock.advance(seconds=1)
    await api.budget.Commit(
        pb.CommitRequest(reservation_id=late.reservation.id, usage=pb.Usage(input_tokens=40))
    )


Row = tuple[str, str, str, str, str, int, int, int, int, int, int, int]


async def report(api: Stubs, *groups: int, **fields: Any) -> list[Row]:
    response = await api.admin.UsageReport(pb.UsageReportRequest(group_by=groups, **fields))
    return [
        (
            r.budget_id, r.model, r.label_value, r.day, pb.Unit.Name(r.unit).removeprefix("UNIT_"),
            r.charged, r.overage, r.calls,
            r.usage.input_tokens, r.usage.cached_input_tokens,
            r.usage.output_tokens, r.usage.reasoning_tokens,
        )
        for r in response.rows
    ]  # fmt: skip


BUDGET, MODEL, LABEL, DAY = (
    pb.REPORT_GROUP_BUDGET,
    pb.REPORT_GROUP_MODEL,
    pb.REPORT_GROUP_LABEL,
    pb.REPORT_GROUP_DAY,
)


async def test_totals_per_budget_model_label_and_day(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    await record_charges(api, clock)

    # Each budget its own charges in its own unit (columns: group keys, unit, charged,
    # overage, calls, input, cached, output, reasoning). rep:org/a: c1 150, c3 15 (10 over),
    # c7 expired at 0 then 40 late (overage; tokens and call counted once).
    by_budget = [
        ("rep:org", "", "", "", "TOKENS", 605, 350, 4, 450, 20, 155, 10),
        ("rep:org/a", "", "", "", "TOKENS", 205, 50, 3, 150, 20, 55, 10),
        ("rep:org/b", "", "", "", "TOKENS", 400, 300, 1, 300, 0, 100, 0),
        ("rep:solo", "", "", "", "TOKENS", 1000, 0, 1, 1000, 0, 0, 0),
        # 1000 input at 1,000 nano-USD each plus 500 output at 2,000 each.
        ("rep:usd", "", "", "", "USD", 2_000_000, 0, 1, 1000, 0, 500, 0),
        ("rep:usd/t", "", "", "", "TOKENS", 1500, 0, 1, 1000, 0, 500, 0),
    ]
    assert await report(api, budget_prefix="rep:") == by_budget  # BUDGET is the default
    assert await report(api, BUDGET, budget_prefix="rep:") == by_budget
    everything = await report(api, BUDGET)
    assert everything == [*by_budget, ("zzz:other", "", "", "", "TOKENS", 14, 0, 1, 7, 0, 7, 0)]

    # Without budgets, each call counts once, on the deepest budget of its chain.
    assert await report(api, MODEL, budget_prefix="rep:") == [
        ("", "gpt-a", "", "", "TOKENS", 1205, 50, 4, 1150, 20, 55, 10),
        ("", "gpt-b", "", "", "TOKENS", 400, 300, 1, 300, 0, 100, 0),
        ("", PRICED_MODEL, "", "", "TOKENS", 1500, 0, 1, 1000, 0, 500, 0),
    ]
    assert await report(api, LABEL, budget_prefix="rep:", label_key="team") == [
        ("", "", "", "", "TOKENS", 55, 50, 2, 50, 0, 5, 0),
        ("", "", "ads", "", "TOKENS", 400, 300, 1, 300, 0, 100, 0),
        ("", "", "search", "", "TOKENS", 2650, 0, 3, 2100, 20, 550, 10),
    ]
    assert await report(api, DAY, budget_prefix="rep:") == [
        ("", "", "", "2026-11-28", "TOKENS", 550, 300, 2, 400, 20, 150, 10),
        ("", "", "", "2026-11-29", "TOKENS", 15, 10, 1, 10, 0, 5, 0),
        ("", "", "", "2026-11-30", "TOKENS", 2540, 40, 3, 2040, 0, 500, 0),
    ]
    # Several groups: rows sort by the groups in the order asked for.
    assert await report(api, DAY, BUDGET, budget_prefix="rep:org/") == [
        ("rep:org/a", "", "", "2026-11-28", "TOKENS", 150, 0, 1, 100, 20, 50, 10),
        ("rep:org/b", "", "", "2026-11-28", "TOKENS", 400, 300, 1, 300, 0, 100, 0),
        ("rep:org/a", "", "", "2026-11-29", "TOKENS", 15, 10, 1, 10, 0, 5, 0),
        ("rep:org/a", "", "", "2026-11-30", "TOKENS", 40, 40, 1, 40, 0, 0, 0),
    ]
    assert await report(api, BUDGET, MODEL, budget_prefix="rep:usd") == [
        ("rep:usd", PRICED_MODEL, "", "", "USD", 2_000_000, 0, 1, 1000, 0, 500, 0),
        ("rep:usd/t", PRICED_MODEL, "", "", "TOKENS", 1500, 0, 1, 1000, 0, 500, 0),
    ]


async def test_time_range_and_prefix_filters(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    await record_charges(api, clock)

    # [since, until): day 2 alone holds c3, at its last microsecond; c4 at DAY3 is out.
    day2 = await report(api, budget_prefix="rep:", since_us=at("2026-11-29"), until_us=DAY3)
    assert day2 == [
        ("rep:org", "", "", "", "TOKENS", 15, 10, 1, 10, 0, 5, 0),
        ("rep:org/a", "", "", "", "TOKENS", 15, 10, 1, 10, 0, 5, 0),
    ]
    assert await report(api, since_us=DAY2_LAST_US, until_us=DAY2_LAST_US + 1) == day2
    assert await report(api, since_us=at("2026-11-29"), until_us=DAY2_LAST_US) == []
    assert await report(api, until_us=DAY2_LAST_US) == await report(
        api, since_us=1, until_us=at("2026-11-29")
    )
    # A late commit is reported when it happened; its expiry charged nothing but the call.
    assert await report(api, budget_prefix="rep:org/a", since_us=DAY3 + 2_500_000) == [
        ("rep:org/a", "", "", "", "TOKENS", 40, 40, 0, 40, 0, 0, 0),
    ]

    assert [row[0] for row in await report(api, budget_prefix="rep:org/")] == [
        "rep:org/a",
        "rep:org/b",
    ]
    assert [row[0] for row in await report(api, budget_prefix="rep:org")] == [
        "rep:org",
        "rep:org/a",
        "rep:org/b",
    ]
    assert await report(api, budget_prefix="rep:org/a/") == []
    assert await report(api, budget_prefix="nothing:") == []
    # A prefix that takes only part of a chain counts calls on the deepest budget it takes.
    assert await report(api, MODEL, budget_prefix="rep:org/b") == [
        ("", "gpt-b", "", "", "TOKENS", 400, 300, 1, 300, 0, 100, 0),
    ]


async def test_late_commit_tokens_count_once_after_a_charged_expiry(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    # A reservation that expired charged at 30 tokens of usage (the last the server knew),
    # then committed late at 50: 50 tokens and one call in all. Written directly, since
    # usage reaches an expiry only through a meter stream.
    clock.set(DAY1)
    await create(api, "late:a", 1000)
    assert server.db is not None
    expired_us, late_us = DAY1 + 5_000_000, DAY3
    entry = {
        "budget_id": "late:a",
        "reservation_id": "r_late",
        "reserved_delta": 0,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "model": "gpt-a",
        "labels": "{}",
        "actor": "test",
    }
    async with server.db.write() as conn:
        await conn.execute(
            insert(reservations).values(
                id="r_late", budget_id="late:a", state="COMMITTED", idempotency_key=None,
                model="gpt-a", labels="{}", input_tokens=30, cached_input_tokens=0,
                output_tokens=20, reasoning_tokens=0, grant_input_tokens=0,
                grant_output_tokens=0, charged=70, overage=20, expires_at_us=DAY1 + 1_000_000,
                created_at_us=DAY1, finished_at_us=expired_us,
            )
        )  # fmt: skip
        await conn.execute(
            insert(ledger_entries),
            [
                {**entry, "kind": "EXPIRE", "amount": 50, "spent_delta": 50, "overage_delta": 0,
                 "reserved_delta": -50, "input_tokens": 30, "output_tokens": 20,
                 "created_at_us": expired_us},
                {**entry, "kind": "COMMIT", "amount": 20, "spent_delta": 20, "overage_delta": 20,
                 "input_tokens": 30, "output_tokens": 40, "created_at_us": late_us},
            ],
        )  # fmt: skip
    assert await report(api, budget_prefix="late:") == [
        ("late:a", "", "", "", "TOKENS", 70, 20, 1, 30, 0, 40, 0),
    ]
    assert await report(api, DAY, budget_prefix="late:") == [
        ("", "", "", "2026-11-28", "TOKENS", 50, 0, 1, 30, 0, 20, 0),
        ("", "", "", "2026-11-30", "TOKENS", 20, 20, 0, 0, 0, 20, 0),
    ]


async def test_a_report_over_too_many_entries_is_refused(db_url: str, clock: ManualClock) -> None:
    config = ServerConfig(listen="127.0.0.1:0", db_url=db_url, insecure=True, report_entries_max=3)
    async with BudgetServer(config, clock=clock) as server, stubs(server.address) as api:
        await create(api, "big:a", 1000)
        start_us = clock.now_us()
        for _ in range(4):
            await _commit(api, "big:a", 1, pb.Usage(output_tokens=1), model="m")
            clock.advance(seconds=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await report(api)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "report_entries_max" in (caught.value.details() or "")
        assert "3" in (caught.value.details() or "")
        # Narrowed to three charges, it answers.
        assert await report(api, since_us=start_us + 1) == [
            ("big:a", "", "", "", "TOKENS", 3, 0, 3, 0, 0, 3, 0),
        ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"group_by": [pb.REPORT_GROUP_LABEL]}, "label_key is required"),
        ({"label_key": "team"}, "only used when grouping by label"),
        ({"since_us": 10, "until_us": 10}, "must be before until_us"),
        ({"since_us": -1}, "must not be negative"),
        ({"group_by": [99]}, "unknown value 99"),
        ({"group_by": [pb.REPORT_GROUP_UNSPECIFIED]}, "unknown value 0"),
        ({"budget_prefix": "no spaces"}, "budget_prefix"),
        ({"group_by": [pb.REPORT_GROUP_LABEL], "label_key": "k" * 65}, "label_key is 65"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    api: Stubs, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.UsageReport(pb.UsageReportRequest(**fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


def test_totals_without_sql() -> None:
    def entry(entry_id: int, budget_id: str, unit: str, at_us: int, **usage: int) -> ChargeEntry:
        return ChargeEntry(
            id=entry_id, budget_id=budget_id, reservation_id=f"r{entry_id}", kind="COMMIT",
            unit=unit, spent_delta=sum(usage.values()), overage_delta=0, reserved_delta=-1,
            usage=Usage(**usage), model="m", labels='{"team": "x", "n": 3}', created_at_us=at_us,
        )  # fmt: skip

    totals = Totals(("LABEL", "DAY"), label_key="team")
    totals.add(entry(1, "b", "USD", DAY3, output_tokens=2))
    totals.add(entry(2, "a", "TOKENS", DAY3, input_tokens=5))
    totals.add(entry(3, "a", "TOKENS", DAY1, input_tokens=1))
    rows = totals.rows()
    assert [(r.label_value, r.day, r.unit, r.charged, r.calls) for r in rows] == [
        ("x", "2026-11-28", "TOKENS", 1, 1),
        ("x", "2026-11-30", "TOKENS", 5, 1),
        ("x", "2026-11-30", "USD", 2, 1),
    ]
    assert Totals(("LABEL",), label_key="n").rows() == []
    numbers = Totals(("LABEL",), label_key="n")
    numbers.add(entry(4, "a", "TOKENS", DAY1, input_tokens=1))
    assert numbers.rows()[0].label_value == "3"
    assert utc_day(0) == "1970-01-01"
    assert utc_day(DAY3 - 1) == "2026-11-29"


# ---------------------------------------------------------------- budgetctl report


async def budgetctl(server: BudgetServer, *args: str) -> tuple[int, str, str]:
    """budgetctl as a child process, so the server in this event loop keeps serving."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETD_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "budget_server.ctl.main", "--server", server.address, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_budgetctl_report(server: BudgetServer, api: Stubs, clock: ManualClock) -> None:
    await record_charges(api, clock)
    as_json, per_day, by_label, refused = await asyncio.gather(
        budgetctl(
            server, "--json", "report", "--prefix", "rep:org/", "--by", "budget,day",
            "--since", "2026-11-28", "--until", "2026-11-30T00:00:00Z",
        ),
        budgetctl(server, "report", "--prefix", "rep:"),
        budgetctl(server, "report", "--by", "label:team,model", "--prefix", "rep:"),
        budgetctl(server, "report", "--by", "label"),
    )  # fmt: skip

    code, stdout, stderr = as_json
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["budget_prefix"] == "rep:org/"
    assert (doc["since_us"], doc["until_us"]) == (at("2026-11-28"), DAY3)
    assert doc["group_by"] == ["budget", "day"]
    assert [
        (r["budget_id"], r["day"], r["unit"], r["charged"], r["overage"], r["calls"])
        for r in doc["rows"]
    ] == [
        ("rep:org/a", "2026-11-28", "UNIT_TOKENS", 150, 0, 1),
        ("rep:org/a", "2026-11-29", "UNIT_TOKENS", 15, 10, 1),
        ("rep:org/b", "2026-11-28", "UNIT_TOKENS", 400, 300, 1),
    ]
    assert doc["rows"][0]["usage"] == {
        "input_tokens": 100,
        "cached_input_tokens": 20,
        "output_tokens": 50,
        "reasoning_tokens": 10,
    }

    code, stdout, stderr = per_day  # the default: one row per UTC day, then the total
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "usage of budgets starting 'rep:', the beginning .. now (UTC days)"
    assert lines[1].split() == [
        "DAY", "CHARGED", "OVERAGE", "CALLS", "INPUT", "CACHED", "OUTPUT", "REASONING",
    ]  # fmt: skip
    assert lines[2].split() == [
        "2026-11-28", "550", "tok", "300", "tok", "2", "400", "20", "150", "10",
    ]  # fmt: skip
    assert lines[3].split()[:3] == ["2026-11-29", "15", "tok"]
    assert lines[4].split()[:3] == ["2026-11-30", "2,540", "tok"]
    assert lines[5].split()[:3] == ["total", "3,105", "tok"]

    code, stdout, stderr = by_label
    assert code == 0, stderr
    assert "LABEL:TEAM" in stdout.splitlines()[1]
    assert any(line.split()[:3] == ["search", "gpt-a", "1,150"] for line in stdout.splitlines())

    code, _, stderr = refused
    assert code == 2
    assert "label:KEY" in stderr
