"""budgetctl's operations commands against a real budgetd: freeze, unfreeze, delete, alerts, watch.

As in test_budgetctl.py, budgetctl is a child process driven through asyncio (the server
runs in the test's own loop). `watch` runs three ways: JSON lines on a pipe while the test
reserves and commits, its live view on a pseudo-terminal (drawn, then left on SIGINT or
SIGTERM with the terminal restored), and against a `budgetd serve` process that is killed.
The view's pieces (bar, colours, lines cut to the width) also get plain unit tests.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import signal
import socket
import struct
import sys
import termios
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.ctl import watch_cmd
from budget_server.ctl.main import main
from budget_server.ctl.watch_cmd import (
    LEAVE_SCREEN,
    Line,
    Snapshot,
    budget_lines,
    event_detail,
    level_colour,
    short_id,
    utilisation_bar,
)
from tests.support.ledger import create
from tests.support.meter import finish_request, next_event, open_request, open_stream, wait_until
from tests.support.servers import Stubs, start_server_process, stubs

RUN_TIMEOUT_S = 60
SUBPROCESS_ENV = {k: v for k, v in os.environ.items() if k not in ("BUDGETD_SERVER", "NO_COLOR")}


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, f"exit {self.code}: {self.stderr}"
        return json.loads(self.stdout)

    def lines(self) -> list[dict[str, Any]]:
        """watch's output: one JSON object per line, every line."""
        return [json.loads(line) for line in self.stdout.splitlines()]


async def start_budgetctl(
    server: str, *args: str, stdin: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    # stdin is not a terminal unless a test says so, whoever runs pytest.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "budget_server.ctl.main", "--server", server, *args,
        stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=SUBPROCESS_ENV,
    )  # fmt: skip


async def finish(process: asyncio.subprocess.Process, stdin: bytes | None = None) -> Run:
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), RUN_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def budgetctl(server: str, *args: str) -> Run:
    return await finish(await start_budgetctl(server, *args))


async def spend(api: Stubs, budget_id: str, amount: int) -> None:
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id=budget_id, amount=amount))
    await api.budget.Commit(pb.CommitRequest(reservation_id=held.reservation.id, amount=amount))


# ---------------------------------------------------------------- freeze, unfreeze, delete


async def test_freeze_aborts_an_open_stream_then_unfreeze_grants_again(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "ops:frz", 100_000)
    call, opened = await open_stream(api, open_request("ops:frz", prompt_tokens=100))

    frozen = await budgetctl(
        server.address, "--json", "budgets", "freeze", "ops:frz", "--reason", "incident 7"
    )
    budget = frozen.json()["budget"]
    assert (budget["id"], budget["frozen"]) == ("ops:frz", True)
    event = await next_event(call)
    assert event.WhichOneof("event") == "abort", event
    assert event.abort.reason == pb.ABORT_REASON_FROZEN
    assert event.abort.budget_id == "ops:frz"
    assert "incident 7" in event.abort.message
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.budget.Reserve(pb.ReserveRequest(budget_id="ops:frz", amount=1))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await call.write(finish_request(100, 0))  # what was granted still commits
    assert (await next_event(call)).committed.reservation.id == opened.reservation_id

    thawed = await budgetctl(server.address, "budgets", "unfreeze", "ops:frz")
    assert thawed.code == 0, thawed.stderr
    assert thawed.stdout.startswith("unfroze budget ops:frz: it grants again\n")
    assert "frozen     no" in thawed.stdout.splitlines()
    await api.budget.Reserve(pb.ReserveRequest(budget_id="ops:frz", amount=1))

    again = await budgetctl(server.address, "budgets", "freeze", "ops:frz")
    assert again.code == 0, again.stderr
    assert again.stdout.startswith("froze budget ops:frz: new grants are refused")
    assert "frozen     YES: every grant is refused" in again.stdout.splitlines()


async def test_freeze_refuses_an_unknown_budget_and_a_long_reason(server: BudgetServer) -> None:
    unknown, wordy = await asyncio.gather(
        budgetctl(server.address, "budgets", "freeze", "ops:nobody"),
        budgetctl(server.address, "budgets", "freeze", "ops:nobody", "--reason", "x" * 501),
    )
    assert unknown.code == 2
    assert "NOT_FOUND" in unknown.stderr
    assert wordy.code == 2
    assert "--reason is over 500 characters" in wordy.stderr


async def test_delete_needs_yes_waits_for_open_reservations_then_retires_the_id(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "ops:del", 1000)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="ops:del", amount=10))

    unconfirmed, as_json, in_use = await asyncio.gather(
        budgetctl(server.address, "budgets", "delete", "ops:del"),
        budgetctl(server.address, "--json", "budgets", "delete", "ops:del"),
        budgetctl(server.address, "budgets", "delete", "ops:del", "--yes"),
    )
    for run in (unconfirmed, as_json):  # no terminal to ask on: --yes or nothing
        assert run.code == 2
        assert "add --yes to confirm" in run.stderr
    assert in_use.code == 2
    assert "FAILED_PRECONDITION" in in_use.stderr
    assert "1 open reservation" in in_use.stderr
    await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="ops:del"))  # still there

    await api.budget.Release(pb.ReleaseRequest(reservation_id=held.reservation.id))
    deleted = await budgetctl(server.address, "--json", "budgets", "delete", "ops:del", "--yes")
    assert deleted.json() == {"deleted": "ops:del"}
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="ops:del"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    twice = await budgetctl(server.address, "budgets", "delete", "ops:del", "--yes")
    assert twice.code == 2
    assert "NOT_FOUND" in twice.stderr


@contextmanager
def pseudo_terminal(rows: int = 30, columns: int = 120) -> Iterator[tuple[int, int]]:
    """(controller, terminal) file descriptors of a new pty of that size."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    try:
        yield controller, terminal
    finally:
        for fd in (controller, terminal):
            with suppress(OSError):  # closed already
                os.close(fd)


@pytest.mark.parametrize(("answer", "deleted"), [("n", False), ("", False), ("yes", True)])
async def test_delete_asks_on_a_terminal(
    server: BudgetServer, api: Stubs, answer: str, deleted: bool
) -> None:
    await create(api, "ops:ask", 1000)
    with pseudo_terminal() as (controller, terminal):
        process = await start_budgetctl(
            server.address, "budgets", "delete", "ops:ask", stdin=terminal
        )
        os.write(controller, answer.encode() + b"\n")  # the terminal keeps the line for it
        run = await finish(process)
    assert "Delete budget 'ops:ask' (spent 0 tok of 1,000 tok)?" in run.stderr
    assert "[y/N]" in run.stderr
    if deleted:
        assert run.code == 0, run.stderr
        assert run.stdout.startswith("deleted budget ops:ask")
    else:
        assert run.code == 2
        assert "budget ops:ask not deleted" in run.stderr
        await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="ops:ask"))


# ---------------------------------------------------------------- alerts


async def test_alerts_after_crossing_half_the_limit(server: BudgetServer, api: Stubs) -> None:
    await create(api, "ops:al/tok", 1000)
    await create(api, "ops:al/usd", 10 * 10**9, unit=pb.UNIT_USD)
    await spend(api, "ops:al/tok", 400)
    assert (await budgetctl(server.address, "--json", "alerts", "ops:al/tok")).json()[
        "alerts"
    ] == []
    await spend(api, "ops:al/tok", 110)  # 51 %
    await spend(api, "ops:al/usd", 7_250_000_000)  # 72.5 %: 50 and 70 at once

    one, everything, table = await asyncio.gather(
        budgetctl(server.address, "--json", "alerts", "ops:al/tok"),
        budgetctl(server.address, "alerts", "--json"),
        budgetctl(server.address, "alerts"),
    )
    doc = one.json()
    assert doc["budget_id"] == "ops:al/tok"
    assert doc["more"] is False
    assert doc["units"] == {"ops:al/tok": "UNIT_TOKENS"}
    (alert,) = doc["alerts"]
    assert (alert["budget_id"], alert["threshold_pct"]) == ("ops:al/tok", 50)
    assert (alert["spent"], alert["limit"]) == (510, 1000)
    assert alert["event_id"].startswith("ev_")
    assert alert["fired_at_us"] > 0
    assert list(alert) == [f.name for f in pb.Alert.DESCRIPTOR.fields]

    listed = everything.json()
    assert [(a["budget_id"], a["threshold_pct"]) for a in listed["alerts"]] == [
        ("ops:al/tok", 50),
        ("ops:al/usd", 50),
        ("ops:al/usd", 70),
    ]
    assert listed["units"] == {"ops:al/tok": "UNIT_TOKENS", "ops:al/usd": "UNIT_USD"}

    assert table.code == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["FIRED", "BUDGET", "THRESHOLD", "SPENT", "LIMIT", "USED", "WINDOW"]
    assert rows[0].split()[1:] == ["ops:al/tok", "50%", "510", "tok", "1,000", "tok", "51.0%", "-"]
    assert rows[2].split()[1:] == ["ops:al/usd", "70%", "$7.25", "$10.00", "72.5%", "-"]


async def test_alerts_follow_pages_and_outlive_their_budget(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "ops:pg", 100)
    await api.admin.UpdateBudget(
        pb.UpdateBudgetRequest(
            id="ops:pg", alert_thresholds_pct=[10, 20, 30], set_alert_thresholds=True
        )
    )
    await spend(api, "ops:pg", 35)
    two, three = await asyncio.gather(
        budgetctl(server.address, "--json", "alerts", "ops:pg", "--limit", "2", "--page-size", "1"),
        budgetctl(server.address, "--json", "alerts", "ops:pg", "--page-size", "1"),
    )
    assert [a["threshold_pct"] for a in two.json()["alerts"]] == [10, 20]
    assert two.json()["more"] is True
    assert [a["threshold_pct"] for a in three.json()["alerts"]] == [10, 20, 30]
    assert three.json()["more"] is False

    await api.admin.DeleteBudget(pb.DeleteBudgetRequest(id="ops:pg"))
    as_json, table, by_id = await asyncio.gather(
        budgetctl(server.address, "--json", "alerts"),
        budgetctl(server.address, "alerts"),
        budgetctl(server.address, "alerts", "ops:pg"),
    )
    # The alerts stay; the unit went with the budget, so the amounts show as stored.
    assert as_json.json()["units"] == {"ops:pg": "UNIT_UNSPECIFIED"}
    assert len(as_json.json()["alerts"]) == 3
    assert table.stdout.splitlines()[1].split()[1:] == ["ops:pg", "10%", "35", "100", "35.0%", "-"]
    assert by_id.code == 2
    assert "NOT_FOUND" in by_id.stderr


async def test_no_alerts(server: BudgetServer, api: Stubs) -> None:
    await create(api, "ops:quiet", 100)
    for_one, for_all = await asyncio.gather(
        budgetctl(server.address, "alerts", "ops:quiet"), budgetctl(server.address, "alerts")
    )
    assert for_one.stdout == "no alerts for budget ops:quiet\n"
    assert for_all.stdout == "no alerts\n"


# ---------------------------------------------------------------- watch: JSON lines


async def wait_for_watcher(server: BudgetServer) -> None:
    """budgetd publishes reservations and commits only while someone watches."""
    await wait_until(lambda: server.events.has_subscribers, "budgetctl watch to subscribe", 30)


async def test_watch_prints_snapshots_and_events_as_json_lines(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "ops:w/a", 10_000)
    await create(api, "ops:w/usd", 10**9, unit=pb.UNIT_USD)
    await create(api, "ops:other", 10_000)
    assert not server.events.has_subscribers
    # Not --json: stdout is a pipe, which is enough to get JSON lines.
    process = await start_budgetctl(
        server.address, "watch", "--prefix", "ops:w/", "--duration", "3", "--interval", "0.2"
    )
    await wait_for_watcher(server)
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="ops:w/a", amount=700))
    kept = await api.budget.Reserve(pb.ReserveRequest(budget_id="ops:w/a", amount=50))
    await api.budget.Commit(pb.CommitRequest(reservation_id=held.reservation.id, amount=600))
    await spend(api, "ops:other", 5)  # another prefix: not watched
    run = await finish(process)

    assert run.code == 0, run.stderr
    lines = run.lines()
    assert lines[-1]["type"] == "end"
    assert lines[-1]["reason"] == "duration"
    assert {line["type"] for line in lines} == {"snapshot", "event", "end"}
    snapshots = [line for line in lines if line["type"] == "snapshot"]
    events = [line["event"] for line in lines if line["type"] == "event"]
    assert lines[-1]["snapshots"] == len(snapshots) >= 2
    assert lines[-1]["events"] == len(events)

    first = snapshots[0]["budgets"]
    assert [b["id"] for b in first] == ["ops:w/a", "ops:w/usd"]
    assert (first[1]["unit"], first[1]["limit"]) == ("UNIT_USD", 10**9)
    last = snapshots[-1]
    (a, _) = last["budgets"]
    assert (a["spent"], a["reserved"], a["available"]) == (600, 50, 9350)
    assert last["open_reservations"] == {"ops:w/a": 1, "ops:w/usd": 0}
    assert last["more"] is False

    kinds = [(e["kind"], e["reservation_id"], e["amount"]) for e in events]
    assert kinds == [
        ("BUDGET_EVENT_KIND_RESERVED", held.reservation.id, 700),
        ("BUDGET_EVENT_KIND_RESERVED", kept.reservation.id, 50),
        ("BUDGET_EVENT_KIND_COMMITTED", held.reservation.id, 600),
    ]
    assert all(e["budget_id"] == "ops:w/a" for e in events)
    committed = events[-1]
    assert (committed["spent"], committed["limit"]) == (600, 10_000)
    await wait_until(lambda: not server.events.has_subscribers, "the watcher to leave")


async def test_watch_json_ends_with_one_line_and_sees_freezes(
    server: BudgetServer, api: Stubs
) -> None:
    await create(api, "ops:wj", 1000)
    process = await start_budgetctl(
        server.address, "--json", "watch", "--prefix", "ops:wj", "--duration", "2"
    )
    await wait_for_watcher(server)
    await api.admin.FreezeBudget(pb.FreezeBudgetRequest(id="ops:wj", reason="drill"))
    await api.admin.UpdateBudget(pb.UpdateBudgetRequest(id="ops:wj", limit=2000))
    run = await finish(process)
    lines = run.lines()  # --json too: every line is one object, the last one included
    assert lines[-1]["type"] == "end"
    events = [line["event"] for line in lines if line["type"] == "event"]
    assert [(e["kind"], e["message"]) for e in events] == [
        ("BUDGET_EVENT_KIND_FROZEN", "drill"),
        ("BUDGET_EVENT_KIND_LIMIT_CHANGED", ""),
    ]
    assert events[1]["amount"] == 2000


async def test_watch_exits_3_when_budgetd_goes_away(db_url: str) -> None:
    budgetd = await start_server_process(db_url)
    try:
        async with stubs(budgetd.address) as api:
            await create(api, "ops:gone", 10)
        process = await start_budgetctl(
            budgetd.address, "watch", "--interval", "0.2", "--reconnect", "1"
        )
        assert process.stdout is not None
        first = json.loads(await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT_S))
        assert first["type"] == "snapshot"
        assert [b["id"] for b in first["budgets"]] == ["ops:gone"]
        budgetd.kill()
        await budgetd.process.wait()
        run = await finish(process)
    finally:
        if budgetd.process.returncode is None:
            budgetd.kill()
            await budgetd.process.wait()
    assert run.code == 3, run.stderr
    assert "budgetctl: lost budgetd (retried for 1 s)" in run.stderr
    assert f"cannot reach budgetd at {budgetd.address}" in run.stderr
    statuses = [line["status"] for line in run.lines() if line["type"] == "status"]
    assert "unreachable" in statuses
    assert "reachable" not in statuses


async def test_watch_exits_3_at_once_when_budgetd_was_never_there() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    run = await budgetctl(address, "watch")
    assert run.code == 3
    assert f"budgetctl: cannot reach budgetd at {address}" in run.stderr
    assert run.stdout == ""
    assert loop.time() - started_s < 10  # not the --reconnect wait meant for outages


# ---------------------------------------------------------------- watch: the live view


class TerminalOutput:
    """Everything a child writes to a pty, collected as it comes."""

    def __init__(self, controller: int) -> None:
        self.data = bytearray()
        self.closed = asyncio.Event()
        self._fd = controller
        self._loop = asyncio.get_running_loop()
        os.set_blocking(controller, False)
        self._loop.add_reader(controller, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the child's side is closed
            chunk = b""
        if chunk:
            self.data += chunk
            return
        self._loop.remove_reader(self._fd)
        self.closed.set()

    async def wait_for(self, needle: bytes) -> None:
        await wait_until(lambda: needle in self.data, f"{needle!r} on the terminal", 30)

    def stop(self) -> None:
        self._loop.remove_reader(self._fd)


@pytest.mark.parametrize(
    ("leave", "no_color"), [(signal.SIGINT, False), (signal.SIGTERM, True)], ids=["int", "term"]
)
async def test_watch_draws_in_place_and_restores_the_terminal(
    server: BudgetServer, api: Stubs, leave: signal.Signals, no_color: bool
) -> None:
    await create(api, "ops:tty/a", 1000)
    await create(api, "ops:tty/b", 1000)
    await spend(api, "ops:tty/b", 950)  # 95 %: red
    env = {**SUBPROCESS_ENV, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    if no_color:
        env["NO_COLOR"] = "1"
    a_bar = ("" if no_color else watch_cmd.GREEN) + "██" + "░" * 18  # 10 %: green
    with pseudo_terminal(rows=30, columns=120) as (controller, terminal):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "budget_server.ctl.main", "--server", server.address,
            "watch", "--prefix", "ops:tty/", "--interval", "0.2",
            stdin=terminal, stdout=terminal, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        os.close(terminal)  # the child holds it now; EOF once the child exits
        screen = TerminalOutput(controller)
        try:
            await wait_for_watcher(server)
            await spend(api, "ops:tty/a", 100)
            await screen.wait_for(b"100 tok charged")
            await screen.wait_for(a_bar.encode())  # a snapshot after the commit
            process.send_signal(leave)
            code = await asyncio.wait_for(process.wait(), RUN_TIMEOUT_S)
            await asyncio.wait_for(screen.closed.wait(), RUN_TIMEOUT_S)
        finally:
            screen.stop()
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.stderr is not None
    stderr = (await process.stderr.read()).decode()
    assert code == 0, stderr
    output = screen.data.decode()
    drawn, _, after = output.rpartition(LEAVE_SCREEN)
    assert drawn.startswith("\x1b[?1049h")  # the alternate screen, left on exit
    assert "watched 2 budgets for" in after
    assert "\x1b[H" in drawn  # redrawn from the top, not scrolled
    assert "ops:tty/a" in drawn
    assert "ops:tty/b" in drawn
    assert "committed" in drawn
    assert "██" in drawn  # b's bar
    if no_color:
        assert "\x1b[31m" not in drawn
        assert "\x1b[32m" not in drawn
        assert "█" * 19 + "░ " in drawn  # 95 % of 20 cells, rounded
    else:
        assert "\x1b[31m" + "█" * 19 + "░" in drawn  # b: red from 90 %


# ---------------------------------------------------------------- the view's pieces


def test_utilisation_bar_shows_spent_reserved_and_free() -> None:
    assert utilisation_bar(0, 0, 1000) == "░" * 20
    assert utilisation_bar(500, 250, 1000) == "█" * 10 + "▓" * 5 + "░" * 5
    assert utilisation_bar(1000, 0, 1000) == "█" * 20
    assert utilisation_bar(1500, 10, 1000) == "█" * 20  # soft budgets overspend
    assert utilisation_bar(24, 0, 1000) == "░" * 20  # under half a cell
    assert utilisation_bar(25, 0, 1000) == "█" + "░" * 19
    assert utilisation_bar(0, 0, 0) == "░" * 20
    assert utilisation_bar(1, 0, 0) == "█" * 20
    assert utilisation_bar(2**62, 2**62, 2**62, width=4) == "████"  # no float overflow


def test_colour_follows_spent_and_reserved() -> None:
    green, yellow, red = watch_cmd.GREEN, watch_cmd.YELLOW, watch_cmd.RED
    assert level_colour(0, 0, 100) == green
    assert level_colour(69, 0, 100) == green
    assert level_colour(50, 20, 100) == yellow  # held counts: it cannot be granted again
    assert level_colour(89, 0, 100) == yellow
    assert level_colour(90, 0, 100) == red
    assert level_colour(0, 0, 0) == green
    assert level_colour(1, 0, 0) == red


def test_use_colour_honours_no_color() -> None:
    assert watch_cmd.use_colour({"TERM": "xterm"})
    assert watch_cmd.use_colour({"TERM": "xterm", "NO_COLOR": ""})  # set but empty: ignored
    assert not watch_cmd.use_colour({"TERM": "xterm", "NO_COLOR": "1"})
    assert not watch_cmd.use_colour({"TERM": "dumb"})


def test_lines_are_cut_to_the_width_before_colouring() -> None:
    line = Line()
    line.add("id  ")
    line.add("████", watch_cmd.RED)
    line.add("  12%")
    assert line.render(100, colour=False) == "id  ████  12%"
    assert line.render(100, colour=True) == "id  \x1b[31m████\x1b[0m  12%"
    assert line.render(6, colour=True) == "id  \x1b[31m██\x1b[0m"
    assert line.render(3, colour=True) == "id "


def test_short_ids_keep_their_tail() -> None:
    assert short_id("org:acme", 12) == "org:acme"
    assert short_id("org:acme/team:search", 12) == "…team:search"


def test_budget_table_fits_the_rows_it_is_given() -> None:
    budgets = [
        pb.Budget(id=f"b:{n}", unit=pb.UNIT_TOKENS, limit=100, spent=n, reserved=1)
        for n in range(10)
    ]
    snapshot = Snapshot(0, budgets, False, {"b:0": 3, "b:1": 100}, frozenset({"b:1"}))
    lines = [line.text for line in budget_lines(snapshot, 120, rows_max=4)]
    assert lines[0].split() == [
        "BUDGET", "UTILISATION", "SPENT", "RESERVED", "LIMIT", "OPEN", "FROZEN"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:4]] == ["b:0", "b:1", "b:2"]
    assert lines[1].split()[-1] == "3"
    assert lines[2].split()[-1] == "100+"
    assert lines[3].split()[-1] == "-"  # not counted
    assert lines[4] == "… and 7 more: a taller terminal or a narrower --prefix"
    everything = budget_lines(Snapshot(0, budgets[:2], True, {}), 120, rows_max=10)
    assert everything[-1].text == "… and more under the prefix than --limit fetched"
    assert "  " + "░" * 20 + "   1.0%  " in everything[2].text  # b:1, 1 % of 20 cells
    half = pb.Budget(id="b:half", unit=pb.UNIT_TOKENS, limit=100, spent=50, reserved=25)
    narrow = budget_lines(Snapshot(0, [half], False, {}), 60, rows_max=10)
    assert narrow[1].text.split()[1] == "████▓▓░░"  # the bar shrinks first
    assert narrow[1].spans[0][1] - narrow[1].spans[0][0] == 8


def test_event_details_in_the_budget_unit() -> None:
    committed = pb.BudgetEvent(
        kind=pb.BUDGET_EVENT_KIND_COMMITTED,
        budget_id="b",
        reservation_id="r_1",
        amount=1_500_000_000,
        spent=2 * 10**9,
        limit=10 * 10**9,
    )
    assert event_detail(committed, pb.UNIT_USD) == "$1.50 charged (spent $2.00 of $10.00)  r_1"
    assert event_detail(committed, pb.UNIT_UNSPECIFIED).startswith("1,500,000,000 charged")
    alert = pb.BudgetEvent(kind=pb.BUDGET_EVENT_KIND_ALERT, threshold_pct=90, spent=910, limit=1000)
    assert event_detail(alert, pb.UNIT_TOKENS) == "90% crossed: spent 910 tok of 1,000 tok"
    aborted = pb.BudgetEvent(
        kind=pb.BUDGET_EVENT_KIND_ABORTED,
        reservation_id="r_2",
        amount=42,
        message="ABORT_REASON_FROZEN: drill",
    )
    assert event_detail(aborted, pb.UNIT_USD) == (
        "stream aborted at 42 tok output: ABORT_REASON_FROZEN: drill  r_2"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["watch", "--interval", "0.01"], "refresh at most every 0.1 s"),
        (["watch", "--reconnect", "-1"], "between 0 and 3600"),
        (["watch", "--limit", "5000"], "watch at most 1000 budgets"),
        (["watch", "--duration", "0"], "not a positive number of seconds"),
        (["alerts", "--limit", "0"], "not a whole number of 1 or more"),
    ],
)
def test_bad_arguments_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", "127.0.0.1:1", *args]) == 2
    assert message in capsys.readouterr().err
