"""budgetctl as operators run it: a real subprocess against a real budgetd (SQLite, PostgreSQL).

The server runs in the test's event loop, so budgetctl runs through asyncio's subprocess API
(a blocking subprocess.run would stall the server it talks to); independent runs go
concurrently to keep the suite fast. The amount and time parsers get pure unit tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import update

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.ctl.amounts import (
    AmountError,
    format_percent,
    format_tokens,
    format_usd,
    parse_tokens,
    parse_usd,
)
from budget_server.ctl.failures import EXIT_UNREACHABLE, ServerRefused, from_status
from budget_server.ctl.main import main
from budget_server.ctl.render import enum_label
from budget_server.ctl.rpc import collect
from budget_server.ctl.times import EPOCH, format_time, parse_time
from budget_server.db.schema import budgets
from tests.support.ledger import create
from tests.support.servers import Stubs

RUN_TIMEOUT_S = 60


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code in (0, 1), f"exit {self.code}: {self.stderr}"
        return json.loads(self.stdout)


async def budgetctl(
    *args: str,
    server: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Run:
    """`python -m budget_server.ctl.main [--server S] ARGS...` as a child process.

    No BUDGETD_* variable of whoever runs pytest reaches it: each test sets its own.
    """
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETD_")}
    command = [sys.executable, "-m", "budget_server.ctl.main"]
    if server is not None:
        command += ["--server", server]
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base_env, **(env or {})},
        cwd=cwd,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def iso(us: int) -> str:
    """A time to the microsecond, as an operator could paste it from a log."""
    return (EPOCH + timedelta(microseconds=us)).isoformat()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------- against a real budgetd


async def test_create_usd_and_tokens_then_show_with_ancestors(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    # 9007199.254740993 dollars is 2**53 + 1 nano-dollars: a float would lose the last one.
    usd = await budgetctl(
        "--json", "budgets", "create", "org:ctl", "--unit", "usd", "--limit", "$9007199.254740993",
        "--period", "month", "--tz", "Europe/Paris", "--mode", "soft", "--thresholds", "50,90",
        server=server.address,
    )  # fmt: skip
    budget = usd.json()["budget"]
    assert budget["id"] == "org:ctl"
    assert budget["parent_id"] == ""
    assert budget["unit"] == "UNIT_USD"
    assert budget["limit"] == 2**53 + 1
    assert type(budget["limit"]) is int
    assert budget["period"] == "PERIOD_MONTH"
    assert budget["time_zone"] == "Europe/Paris"
    assert budget["mode"] == "MODE_SOFT"
    assert budget["alert_thresholds_pct"] == [50, 90]
    assert budget["frozen"] is False
    assert (budget["spent"], budget["reserved"], budget["overage"]) == (0, 0, 0)
    assert budget["available"] == 2**53 + 1
    assert budget["window_start_us"] <= clock.now_us() < budget["window_end_us"]
    assert budget["created_at_us"] == budget["updated_at_us"] == clock.now_us()
    assert list(budget) == [f.name for f in pb.Budget.DESCRIPTOR.fields]  # .proto order

    tokens = await budgetctl(
        "budgets", "create", "org:ctl/team:a", "--parent", "org:ctl", "--limit", "1.5M",
        server=server.address,
    )  # fmt: skip
    assert tokens.code == 0, tokens.stderr
    assert "created budget org:ctl/team:a" in tokens.stdout
    assert "1,500,000 tok" in tokens.stdout
    stored = (await api.admin.GetBudget(pb.GetBudgetRequest(budget_id="org:ctl/team:a"))).budget
    assert (stored.limit, stored.unit, stored.parent_id) == (1_500_000, pb.UNIT_TOKENS, "org:ctl")
    assert stored.mode == pb.MODE_HARD
    assert list(stored.alert_thresholds_pct) == [50, 70, 90, 100]

    as_json, for_people = await asyncio.gather(
        budgetctl("budgets", "show", "org:ctl/team:a", "--json", server=server.address),
        budgetctl("budgets", "show", "org:ctl/team:a", server=server.address),
    )
    shown = as_json.json()
    assert shown["budget"]["id"] == "org:ctl/team:a"
    assert shown["budget"]["limit"] == 1_500_000
    assert [a["id"] for a in shown["ancestors"]] == ["org:ctl"]
    assert shown["ancestors"][0]["limit"] == 2**53 + 1
    assert for_people.code == 0, for_people.stderr
    lines = for_people.stdout.splitlines()
    assert "limit      1,500,000 tok" in lines
    assert "parent     org:ctl" in lines
    ancestor_row = next(line for line in lines if line.startswith("org:ctl "))
    assert ancestor_row.split() == [
        "org:ctl", "usd", "$9,007,199.254740993", "$0.00", "$0.00", "$9,007,199.254740993",
        "0.0%", "soft", "month", "no",
    ]  # fmt: skip


async def test_list_follows_page_tokens(server: BudgetServer, api: Stubs) -> None:
    ids = [f"page:{n:02d}" for n in range(7)]
    for budget_id in ids:
        await create(api, budget_id, 1000)
    await create(api, "other:x", 1000)
    everything, first_page = await asyncio.gather(
        budgetctl(
            "--json", "budgets", "list", "--prefix", "page:", "--all", "--page-size", "3",
            server=server.address,
        ),
        budgetctl(
            "budgets", "list", "--prefix", "page:", "--page-size", "3", server=server.address
        ),
    )  # fmt: skip
    listed = everything.json()
    # Seven budgets at three per page: only a client that follows the tokens sees them all.
    assert [b["id"] for b in listed["budgets"]] == ids
    assert listed["more"] is False
    assert all(b["limit"] == 1000 and b["unit"] == "UNIT_TOKENS" for b in listed["budgets"])

    assert first_page.code == 0, first_page.stderr
    header, *rows, hint = first_page.stdout.splitlines()
    assert header.split() == [
        "ID", "UNIT", "LIMIT", "SPENT", "RESERVED", "AVAILABLE", "USED", "MODE", "PERIOD", "FROZEN"
    ]  # fmt: skip
    assert [row.split()[0] for row in rows] == ids[:3]
    assert rows[0].split()[2:6] == ["1,000", "tok", "0", "tok"]
    assert "--all" in hint


async def test_update_limit_freeze_and_unfreeze(server: BudgetServer, api: Stubs) -> None:
    await create(api, "upd:usd", 1_000_000_000, unit=pb.UNIT_USD)
    frozen = await budgetctl(
        "--json", "budgets", "update", "upd:usd", "--limit", "2.5", "--freeze",
        server=server.address,
    )  # fmt: skip
    budget = frozen.json()["budget"]
    assert (budget["limit"], budget["available"]) == (2_500_000_000, 2_500_000_000)
    assert budget["frozen"] is True

    thawed = await budgetctl(
        "budgets", "update", "upd:usd", "--unfreeze", "--mode", "soft", "--thresholds", "none",
        server=server.address,
    )  # fmt: skip
    assert thawed.code == 0, thawed.stderr
    assert "limit      $2.50" in thawed.stdout.splitlines()
    after = (await api.admin.GetBudget(pb.GetBudgetRequest(budget_id="upd:usd"))).budget
    assert (after.limit, after.frozen, after.mode) == (2_500_000_000, False, pb.MODE_SOFT)
    assert list(after.alert_thresholds_pct) == []


async def test_ledger_filters_and_reservations(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    await create(api, "led:a", 10_000)
    first = await api.budget.Reserve(pb.ReserveRequest(budget_id="led:a", amount=400, model="m1"))
    await api.budget.Commit(
        pb.CommitRequest(
            reservation_id=first.reservation.id, usage=pb.Usage(input_tokens=100, output_tokens=350)
        )
    )
    clock.advance(seconds=3600)
    later_us = clock.now_us()
    second = await api.budget.Reserve(pb.ReserveRequest(budget_id="led:a", amount=300))
    await api.budget.Release(pb.ReleaseRequest(reservation_id=second.reservation.id))
    pending = await api.budget.Reserve(pb.ReserveRequest(budget_id="led:a", amount=50))

    by_kind, since, until, table, held = await asyncio.gather(
        budgetctl("--json", "ledger", "led:a", "--kind", "commit", server=server.address),
        budgetctl("--json", "ledger", "led:a", "--since", iso(later_us), server=server.address),
        budgetctl(
            "--json", "ledger", "led:a", "--until", iso(later_us), "--limit", "2",
            "--page-size", "1", server=server.address,
        ),
        budgetctl("ledger", "led:a", server=server.address),
        budgetctl("--json", "reservations", "led:a", "--state", "pending", server=server.address),
    )  # fmt: skip

    commits = by_kind.json()
    assert commits["budget_id"] == "led:a"
    assert commits["unit"] == "UNIT_TOKENS"
    [commit] = commits["entries"]
    assert commit["kind"] == "ENTRY_KIND_COMMIT"
    assert commit["reservation_id"] == first.reservation.id
    assert (commit["amount"], commit["spent_delta"], commit["reserved_delta"]) == (450, 450, -400)
    assert commit["overage_delta"] == 50
    assert commit["usage"]["input_tokens"] == 100
    assert commit["usage"]["output_tokens"] == 350
    assert commit["model"] == "m1"
    assert commit["actor"] == "api"
    assert commits["more"] is False

    # --since is inclusive to the microsecond, --until exclusive.
    assert [e["kind"] for e in since.json()["entries"]] == [
        "ENTRY_KIND_RESERVE", "ENTRY_KIND_RELEASE", "ENTRY_KIND_RESERVE"
    ]  # fmt: skip
    assert all(e["created_at_us"] == later_us for e in since.json()["entries"])
    earlier = until.json()
    assert [e["kind"] for e in earlier["entries"]] == ["ENTRY_KIND_LIMIT", "ENTRY_KIND_RESERVE"]
    assert earlier["more"] is True  # the COMMIT before --until was left out by --limit 2

    assert table.code == 0, table.stderr
    commit_row = next(line for line in table.stdout.splitlines() if " commit " in line)
    assert commit_row.split()[3:10] == ["450", "tok", "+450", "tok", "-400", "tok", "+50"]
    assert format_time(later_us - 3_600_000_000) in commit_row

    [reservation] = held.json()["reservations"]
    assert reservation["id"] == pending.reservation.id
    assert reservation["state"] == "RESERVATION_STATE_PENDING"
    assert reservation["granted"] == 50
    assert reservation["expires_at_us"] > later_us


async def test_verify_exit_status_follows_the_ledger(server: BudgetServer, api: Stubs) -> None:
    await create(api, "ver:a", 1000)
    await api.budget.Reserve(pb.ReserveRequest(budget_id="ver:a", amount=10))
    clean = await budgetctl("verify", server=server.address)
    assert (clean.code, clean.stdout.strip()) == (0, "ledger clean: 1 budget, 2 entries checked")

    # Drift can only come from a bug or a hand edit; make one with a hand edit.
    assert server.db is not None
    async with server.db.write() as conn:
        await conn.execute(update(budgets).where(budgets.c.id == "ver:a").values(spent=7))
    text, as_json = await asyncio.gather(
        budgetctl("verify", "ver:a", server=server.address),
        budgetctl("--json", "verify", server=server.address),
    )
    assert text.code == 1, text.stderr
    assert "drift  ver:a  spent: recorded 7, recomputed 0 (off by +7)" in text.stdout
    result = as_json.json()
    assert as_json.code == 1
    assert result["ok"] is False
    assert (result["budgets_checked"], result["entries_checked"]) == (1, 2)
    assert result["drifts"] == [
        {"budget_id": "ver:a", "figure": "spent", "recorded": 7, "recomputed": 0}
    ]


async def test_server_errors_exit_2_with_the_status(server: BudgetServer, api: Stubs) -> None:
    await create(api, "err:tok", 1000)
    missing, orphan, fractional = await asyncio.gather(
        budgetctl("budgets", "show", "no:such", server=server.address),
        budgetctl(
            "budgets", "create", "err:child", "--parent", "no:parent", "--limit", "5",
            server=server.address,
        ),
        budgetctl("budgets", "update", "err:tok", "--limit", "1.5", server=server.address),
    )  # fmt: skip
    assert missing.code == 2
    assert missing.stderr.strip() == "budgetctl: NOT_FOUND: budget 'no:such' does not exist"
    assert missing.stdout == ""
    assert orphan.code == 2
    assert "budgetctl: NOT_FOUND: budget 'no:parent' does not exist" in orphan.stderr
    # The limit is read in the budget's unit, known only after asking budgetd.
    assert fractional.code == 2
    assert "whole tokens" in fractional.stderr
    assert "usage: budgetctl budgets update" in fractional.stderr
    unchanged = await api.admin.GetBudget(pb.GetBudgetRequest(budget_id="err:tok"))
    assert unchanged.budget.limit == 1000


async def test_resource_exhausted_reports_the_amount_available(api: Stubs) -> None:
    await create(api, "ex:usd", 2_500_000_000, unit=pb.UNIT_USD)
    await api.budget.Reserve(pb.ReserveRequest(budget_id="ex:usd", amount=2_000_000_000))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="ex:usd", amount=750_000_000))
    error = caught.value
    failure = from_status(error.code(), error.details(), tuple(error.trailing_metadata()), "here")
    assert isinstance(failure, ServerRefused)
    assert failure.exit_code == 2
    assert str(failure).startswith("RESOURCE_EXHAUSTED: ")
    assert "budget 'ex:usd' has $0.50 available (requested $0.75)" in str(failure)


async def test_budgetd_address_is_read_like_the_client_library(server: BudgetServer) -> None:
    # The client library's BUDGETD_ADDRESS is a list; budgetctl talks to its first address.
    nowhere = f"127.0.0.1:{free_port()}"
    from_list, server_wins = await asyncio.gather(
        budgetctl(
            "--json", "budgets", "list", env={"BUDGETD_ADDRESS": f"{server.address},{nowhere}"}
        ),
        budgetctl(
            "--json", "budgets", "list",
            env={"BUDGETD_SERVER": server.address, "BUDGETD_ADDRESS": nowhere},
        ),
    )  # fmt: skip
    assert from_list.json() == {"budgets": [], "more": False}
    assert server_wins.json() == {"budgets": [], "more": False}


async def test_a_refused_key_says_where_budgetctl_found_it(
    secured: tuple[BudgetServer, str], tmp_path: Path
) -> None:
    server, admin_key = secured
    key_id = admin_key.split("_")[1]
    wrong = f"bdk_{key_id}_{'x' * 43}"  # the admin key's id with another secret
    wrong_file = tmp_path / "wrong.key"
    wrong_file.write_text(wrong + "\n")
    elsewhere = tmp_path / "elsewhere"  # a directory without budgetd-admin.key
    elsewhere.mkdir()
    in_key_dir, none, by_flag, by_file, by_env = await asyncio.gather(
        budgetctl("--json", "budgets", "list", server=server.address, cwd=tmp_path),
        budgetctl("budgets", "list", server=server.address, cwd=elsewhere),
        budgetctl("--api-key", wrong, "budgets", "list", server=server.address, cwd=elsewhere),
        budgetctl(
            "budgets", "list", "--api-key-file", str(wrong_file), server=server.address,
            cwd=elsewhere,
        ),
        budgetctl(
            "budgets", "list", server=server.address, cwd=elsewhere,
            env={"BUDGETD_API_KEY": wrong},
        ),
    )  # fmt: skip
    # Run where budgetd wrote its admin key, budgetctl reads it from there.
    assert in_key_dir.json() == {"budgets": [], "more": False}

    assert none.code == 2
    first, hint = none.stderr.splitlines()
    assert first.startswith("budgetctl: UNAUTHENTICATED: no API key")
    for where in ("--api-key", "--api-key-file", "BUDGETD_API_KEY", "budgetd-admin.key"):
        assert where in hint
    assert str(elsewhere) in hint  # the current directory it looked in

    for run, source in [
        (by_flag, "--api-key"),
        (by_file, f"--api-key-file {wrong_file}"),
        (by_env, "BUDGETD_API_KEY"),
    ]:
        assert run.code == 2
        first, hint = run.stderr.splitlines()
        assert first == "budgetctl: UNAUTHENTICATED: the API key is not valid"
        assert f"from {source};" in hint
        assert "x" * 43 not in run.stderr  # the secret is never printed


# ---------------------------------------------------------------- without a server


async def test_unreachable_or_silent_server_exits_3() -> None:
    refused = f"127.0.0.1:{free_port()}"  # nothing listens there once the probe closed
    # A socket that accepts connections but never speaks: only the deadline ends the call.
    with socket.create_server(("127.0.0.1", 0)) as silent_socket:
        silent = f"127.0.0.1:{silent_socket.getsockname()[1]}"
        no_answer, too_slow = await asyncio.gather(
            budgetctl("budgets", "list", env={"BUDGETD_SERVER": refused}),
            budgetctl("--timeout", "0.5", "verify", server=silent),
        )
    assert no_answer.code == EXIT_UNREACHABLE
    assert f"budgetctl: cannot reach budgetd at {refused} (UNAVAILABLE" in no_answer.stderr
    assert no_answer.stdout == ""
    assert too_slow.code == EXIT_UNREACHABLE
    assert f"budgetctl: cannot reach budgetd at {silent} (DEADLINE_EXCEEDED" in too_slow.stderr


async def test_a_named_key_file_that_cannot_be_read_exits_2(tmp_path: Path) -> None:
    # Against an address where nothing listens: exit 2, not 3, shows no call was tried.
    address = f"127.0.0.1:{free_port()}"
    missing = tmp_path / "nope.key"
    by_flag, by_env, in_subcommand, default_absent = await asyncio.gather(
        budgetctl("--api-key-file", str(missing), "budgets", "list", server=address),
        budgetctl("verify", server=address, env={"BUDGETD_API_KEY_FILE": str(tmp_path)}),
        budgetctl("budgets", "list", "--api-key-file", str(missing), server=address),
        budgetctl("budgets", "list", server=address, cwd=tmp_path),
    )
    assert (by_flag.code, by_flag.stdout) == (2, "")
    assert by_flag.stderr == (
        f"budgetctl: cannot read the API key file {missing} (--api-key-file): "
        "No such file or directory\n"
    )
    assert (in_subcommand.code, in_subcommand.stderr) == (2, by_flag.stderr)
    assert by_env.code == 2
    assert by_env.stderr == (
        f"budgetctl: cannot read the API key file {tmp_path} (BUDGETD_API_KEY_FILE): "
        "Is a directory\n"
    )
    # ./budgetd-admin.key is only a default: without it budgetctl goes on without a key.
    assert default_absent.code == EXIT_UNREACHABLE, default_absent.stderr


async def test_server_needs_host_and_port() -> None:
    # Run through the environment: the error names the variable the bad address came from.
    from_env, from_list, well_formed = await asyncio.gather(
        budgetctl("budgets", "list", env={"BUDGETD_SERVER": "127.0.0.1"}),
        budgetctl("budgets", "list", env={"BUDGETD_ADDRESS": "budgetd.internal,10.0.0.2:50051"}),
        budgetctl("--timeout", "5", "budgets", "list", server=f"[::1]:{free_port()}"),
    )
    assert from_env.code == 2
    assert from_env.stderr.startswith("budgetctl: BUDGETD_SERVER: '127.0.0.1' is not HOST:PORT")
    assert len(from_env.stderr.splitlines()) == 1
    assert from_list.code == 2
    assert "BUDGETD_ADDRESS: 'budgetd.internal' is not HOST:PORT" in from_list.stderr
    assert well_formed.code == EXIT_UNREACHABLE, well_formed.stderr


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.0.0.1:", "localhost:http", ":50051", "::1:50051", "host:65536", "host:٥"],
)
def test_bad_server_addresses_exit_2(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    # gRPC would read "127.0.0.1" as port 443; budgetctl refuses it before any call.
    assert main(["--server", address, "budgets", "list"]) == 2
    captured = capsys.readouterr()
    assert f"argument --server: {address!r} is not HOST:PORT" in captured.err
    assert captured.out == ""


async def test_fractional_tokens_are_a_usage_error() -> None:
    # Against an address where nothing listens: exit 2, not 3, shows no call was tried.
    address = f"127.0.0.1:{free_port()}"
    run = await budgetctl("budgets", "create", "x", "--limit", "1.5", server=address)
    assert run.code == 2
    assert "usage: budgetctl budgets create" in run.stderr
    assert "'1.5' is 1.5 tokens: a budget counts whole tokens" in run.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["budgets", "create", "x", "--unit", "usd", "--limit", "12.3456789012"], "decimal places"),
        (["budgets", "create", "x", "--unit", "usd", "--limit", "1,000"], "no commas"),
        (["budgets", "create", "x", "--limit", "10", "--thresholds", "50,0"], "between 1 and"),
        (["ledger", "x", "--since", "yesterday"], "not an ISO 8601 time"),
        (["ledger", "x", "--since", "1970-01-01"], "not after 1970"),
        (["ledger", "x", "--limit", "0"], "1 or more"),
        (["budgets", "update", "x"], "nothing to update"),
        (["budgets", "update", "x", "--freeze", "--unfreeze"], "not allowed with"),
        (["budgets"], "required"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No server is needed: each of these is refused before any call is made.
    assert main(["--server", "127.0.0.1:1", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_help_lists_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["budgets", "create", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "budgetctl budgets create org:acme" in out
    assert "BUDGETD_ADDRESS" in out


# ---------------------------------------------------------------- amounts, times, paging


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("0", 0),
        ("1500000", 1_500_000),
        ("1_500_000", 1_500_000),
        ("1.5M", 1_500_000),
        ("250k", 250_000),
        ("1500K", 1_500_000),
        ("0.001M", 1000),
        ("2G", 2_000_000_000),
        (" 42 ", 42),
        ("4611686018427387904", 2**62),
    ],
)
def test_parse_tokens(text: str, tokens: int) -> None:
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize(
    "text",
    ["1.5", "0.0001k", "1.0000001M", "-5", "1e6", "1__000", "_1", "1,000", "$5", "5m", "", "k",
     "NaN", "inf", "4611686018427387905", "1" * 41],
)  # fmt: skip
def test_parse_tokens_refuses(text: str) -> None:
    with pytest.raises(AmountError):
        parse_tokens(text)


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("$0.000000001", 1),
        ("0.000000001", 1),
        ("12.50", 12_500_000_000),
        ("$12.50", 12_500_000_000),
        ("12.345678901", 12_345_678_901),  # nine places: the most a nano-dollar allows
        ("1.005", 1_005_000_000),  # float(1.005) * 1e9 truncates to 1004999999
        ("9007199.254740993", 2**53 + 1),  # beyond a double's integer precision
        ("1_000.25", 1_000_250_000_000),
        ("0", 0),
        ("$4611686018.427387904", 2**62),
    ],
)
def test_parse_usd_is_exact(text: str, nanos: int) -> None:
    assert parse_usd(text) == nanos


@pytest.mark.parametrize(
    "text",
    ["12.3456789012", "0.0000000001", "1.5000000000", "$-1", "-1", "1,000.00", "12,50", "1e3",
     "$$1", "1.", ".5", "1.5k", "NaN", "", "$", "$4611686018.427387905"],
)  # fmt: skip
def test_parse_usd_refuses(text: str) -> None:
    with pytest.raises(AmountError):
        parse_usd(text)


def test_format_amounts() -> None:
    assert format_tokens(1_234_567) == "1,234,567 tok"
    assert format_tokens(-5, signed=True) == "-5 tok"
    assert format_tokens(5, signed=True) == "+5 tok"
    assert format_usd(12_500_000_000) == "$12.50"
    assert format_usd(12_500_000_000, exact=True) == "$12.500000000"
    assert format_usd(1) == "$0.000000001"
    assert format_usd(0) == "$0.00"
    assert format_usd(1_234_000_000_000) == "$1,234.00"
    assert format_usd(-2_000_000_001, signed=True) == "-$2.000000001"
    assert format_usd(2**53 + 1) == "$9,007,199.254740993"
    for nanos in (1, 10, 999_999_999, 1_000_000_001, 2**62):
        assert parse_usd(format_usd(nanos).replace(",", "")) == nanos


def test_format_percent_rounds_down() -> None:
    assert format_percent(0, 1000) == "0.0%"
    assert format_percent(9997, 10000) == "99.9%"
    assert format_percent(1, 3) == "33.3%"
    assert format_percent(1500, 1000) == "150.0%"
    assert format_percent(5, 0) == "-"


def test_times_round_trip_to_the_microsecond() -> None:
    us = 1_796_104_201_260_348
    assert parse_time(iso(us)) == us
    assert parse_time("2026-12-01T06:50:01.260348+01:00") == us
    assert parse_time("2026-12-01T05:50:01.260348Z") == us
    assert parse_time("2026-12-01") == parse_time("2026-12-01T00:00:00Z")  # no offset: UTC
    assert format_time(us) == "2026-12-01T05:50:01Z"
    assert format_time(0) == "-"


def test_enum_labels() -> None:
    assert enum_label(pb.Unit.DESCRIPTOR, pb.UNIT_USD) == "usd"
    assert enum_label(pb.ReservationState.DESCRIPTOR, pb.RESERVATION_STATE_EXPIRED) == "expired"
    assert enum_label(pb.EntryKind.DESCRIPTOR, pb.ENTRY_KIND_ROLLOVER) == "rollover"
    assert enum_label(pb.Mode.DESCRIPTOR, 99) == "99"


def test_collect_stops_at_wanted_and_reports_more() -> None:
    rows = list(range(10))
    calls: list[tuple[str, int]] = []

    def fetch(token: str, size: int) -> tuple[list[int], str]:
        calls.append((token, size))
        start = int(token or 0)
        page = rows[start : start + size]
        end = start + len(page)
        return page, str(end) if end < len(rows) else ""

    assert collect(fetch, wanted=None, page_size=4) == (rows, False)
    assert calls == [("", 4), ("4", 4), ("8", 4)]
    calls.clear()
    assert collect(fetch, wanted=5, page_size=4) == (rows[:5], True)
    assert calls == [("", 4), ("4", 1)]  # the last page asks only for what is missing
    assert collect(fetch, wanted=10, page_size=100) == (rows, False)
