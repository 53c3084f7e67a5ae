"""`make demo` (`python -m budget_client.demo`): budgetd, the fake OpenAI server and three
app processes share one budget until it is gone. The end-to-end test reads the demo's
`SUMMARY {json}` line and holds it to the ledger's rules; the others check, without
processes, that the app protocol round-trips and that a frame fits its terminal.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._types import Budget
from budget_client.demo._protocol import Report
from budget_client.demo._render import Painter, Setting, frame
from budget_client.demo._state import AppView, DemoState

DEMO_TIMEOUT_S = 90  # it takes about 10 s here; the demo stops itself at 60
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.slow
def test_demo_runs_the_shared_budget_out_and_accounts_for_every_token() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "budget_client.demo",
            "--budget",
            "1500",
            "--rate",
            "400",
            "--duration-limit",
            "60",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    output = f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert completed.returncode == 0, output
    assert "\x1b" not in completed.stdout, "stdout is not a terminal: plain lines only"
    lines = completed.stdout.splitlines()
    assert lines, output
    assert lines[-1].startswith("SUMMARY "), output
    summary: dict[str, Any] = json.loads(lines[-1].removeprefix("SUMMARY "))

    assert summary["ending"] == "exhausted", output
    assert summary["exhausted"] is True
    assert [app["exit_reason"] for app in summary["apps"]] == ["budget"] * 3
    assert summary["aborts"] >= 1
    assert any(" ABORTED " in line for line in lines), "aborts are shown as they happen"

    assert summary["verification"]["ok"] is True, summary["verification"]
    assert summary["reserved"] == 0, "every stream was committed"
    assert summary["charged_tokens"] == summary["spent"], "the apps were told what was charged"
    assert summary["charged_tokens"] <= summary["limit"] + summary["overage"]
    assert summary["available"] < 30, "exhausted: not even a prompt fits any more"

    # What the fake server really sent. How many tokens were in flight when a stream was
    # closed depends on how busy the machine is (tens on a loaded one), so the checks are
    # the ones that hold at any speed: the client never counts a token that was not sent,
    # and a cut-off stream really stopped the upstream before the end of its reply.
    upstream = summary["upstream"]
    assert upstream["requests"] == sum(app["streams"] for app in summary["apps"])
    assert upstream["completed"] + upstream["cut_off"] == upstream["requests"]
    assert upstream["prompt_tokens"] == upstream["input_tokens_charged"]
    assert upstream["unseen_tokens"] >= 0
    cuts = upstream["cut_streams"]
    assert len(cuts) == summary["aborts"]
    for cut in cuts:
        assert cut["counted_tokens"] <= cut["sent_tokens"] <= cut["reply_tokens"], cut
    longest = [cut for cut in cuts if cut["app"] == "app-3"]
    assert longest, "app-3's 1,500-token reply cannot fit a 1,500-token budget"
    assert not longest[0]["completed"]
    assert longest[0]["sent_tokens"] < longest[0]["reply_tokens"], "the upstream was closed"


def test_reports_round_trip_and_other_lines_are_ignored() -> None:
    report = Report("aborted", stream=2, output_tokens=515, charged_tokens=535, message="b")
    assert Report.from_line(report.to_line()) == report
    assert Report.from_line("Traceback (most recent call last):") is None
    assert Report.from_line('{"kind": "launch"}') is None
    assert Report.from_line('{"kind": "progress", "stream": "2"}') == Report("progress")


def _busy_state() -> DemoState:
    apps = [AppView("app-1", 300), AppView("app-2", 700), AppView("app-3", 1500)]
    state = DemoState("demo:team", 3000, apps)
    state.apply_report(apps[0], Report("start", stream=1, reservation_id="r1", grant_tokens=256))
    state.apply_report(apps[0], Report("progress", stream=1, output_tokens=120))
    state.apply_report(apps[1], Report("start", stream=1, reservation_id="r2"))
    state.apply_report(
        apps[1], Report("aborted", stream=1, output_tokens=690, charged_tokens=710, message="x")
    )
    state.apply_report(apps[2], Report("refused", waiting=False))
    state.apply_report(apps[2], Report("exit", message="budget"))
    state.apply_event(
        pb.BudgetEvent(
            kind=pb.BUDGET_EVENT_KIND_COMMITTED, reservation_id="r2", amount=710, limit=3000
        )
    )
    state.apply_event(pb.BudgetEvent(kind=pb.BUDGET_EVENT_KIND_ALERT, threshold_pct=50))
    budget = pb.Budget(id="demo:team", limit=3000, spent=1600, reserved=700, available=700)
    state.set_budget(Budget.from_pb(budget))
    return state


SETTING = Setting("127.0.0.1:50051", "http://127.0.0.1:8400/v1", 100.0, "gpt-4o")


def _visible(state: DemoState, width: int, height: int) -> list[str]:
    lines = [Painter(color=True).line(line, width) for line in frame(state, SETTING, width, height)]
    return [_ESCAPE.sub("", line) for line in lines]


@pytest.mark.parametrize(("width", "height"), [(120, 40), (80, 24), (60, 16)])
def test_a_frame_fits_its_terminal(width: int, height: int) -> None:
    lines = _visible(_busy_state(), width, height)
    assert len(lines) <= height - 1, "taller than the screen, it could not be redrawn in place"
    assert all(len(line) <= width for line in lines)


def test_eighty_columns_show_every_app_state_and_total() -> None:
    text = "\n".join(_visible(_busy_state(), 80, 24))
    assert "● streaming" in text
    assert "✗ aborted by budget" in text
    assert "✓ done · no budget" in text
    assert re.search(r"app-2 +#1 +690 / 700 +✗ aborted by budget +1 +1 +710", text)
    assert "app-2 #1: charged 710 tokens" in text, "a commit names the app and stream"
    assert "▲50%" in text, "a fired alert is marked on the bar"


def test_without_color_there_are_no_escapes() -> None:
    state = _busy_state()
    lines = frame(state, SETTING, 120, 40)
    assert not any("\x1b" in Painter(color=False).line(line, 120) for line in lines)
