"""What the demo knows, fed by three sources and read by the renderer.

- the apps' reports (their stdout): per stream, tokens counted and how it ended;
- budgetd's WatchBudgets stream: commits, alerts, refusals, as the ledger records them;
- GetBudget, polled: the budget's spent / reserved / limit.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._types import Budget
from budget_client.demo._protocol import Report

LOG_LINES_MAX = 500
StreamOutcome = Literal["done", "aborted", "closed"]
_OUTCOMES: dict[str, StreamOutcome] = {"done": "done", "aborted": "aborted", "closed": "closed"}
AppPhase = Literal[
    "starting", "ready", "streaming", "done", "aborted", "closed", "waiting", "out", "stopped",
    "error",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One settled stream of one app."""

    number: int
    outcome: StreamOutcome
    output_tokens: int
    input_tokens: int
    grant_tokens: int
    charged_tokens: int
    overage_tokens: int
    request_id: str


@dataclass(slots=True)
class AppView:
    """One app instance as the demo shows it."""

    name: str
    reply_tokens: int
    phase: AppPhase = "starting"
    stream: int = 0
    """Number of the current (or last) stream."""
    output_tokens: int = 0
    """Tokens counted on the current (or last) stream."""
    grant_tokens: int = 0
    refusals: int = 0
    results: list[StreamResult] = field(default_factory=list)
    last_outcome: StreamOutcome | None = None
    exit_reason: str = ""
    """"budget" when it stopped because its budget was gone, "stop" when told to."""
    exit_code: int | None = None
    error: str = ""

    @property
    def running(self) -> bool:
        return self.exit_code is None

    @property
    def aborts(self) -> int:
        return sum(1 for r in self.results if r.outcome == "aborted")

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r.outcome == "done")

    @property
    def charged_tokens(self) -> int:
        return sum(r.charged_tokens for r in self.results)

    @property
    def overage_tokens(self) -> int:
        return sum(r.overage_tokens for r in self.results)


@dataclass(slots=True)
class LogLine:
    at_s: float
    source: str
    """"budgetd" for WatchBudgets events, else the app's name."""
    kind: str
    text: str
    repeats: int = 1
    """Identical consecutive lines are counted, not repeated."""


class DemoState:
    def __init__(self, budget_id: str, limit: int, apps: list[AppView]) -> None:
        self.budget_id = budget_id
        self.limit = limit
        self.apps = apps
        self.started_at = time.monotonic()
        self.budget: Budget | None = None
        self.log: deque[LogLine] = deque(maxlen=LOG_LINES_MAX)
        self.logged = 0
        """How many lines were ever logged (plain output prints the new ones)."""
        self.owners: dict[str, tuple[str, int]] = {}
        """reservation id -> (app, stream number), to name the stream behind a commit."""
        self.alerts_s: dict[int, float] = {}
        """threshold % -> when its alert arrived."""
        self.grants = 0
        self.commits = 0
        self.status = "starting"
        """One line about the demo itself, shown at the bottom."""
        self.by_name = {app.name: app for app in apps}

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def restart_clock(self) -> None:
        self.started_at = time.monotonic()

    def note(self, source: str, kind: str, text: str) -> None:
        last = self.log[-1] if self.log else None
        if last is not None and (last.source, last.kind, last.text) == (source, kind, text):
            last.repeats += 1
            last.at_s = self.elapsed_s()
            return
        self.log.append(LogLine(self.elapsed_s(), source, kind, text))
        self.logged += 1

    # ------------------------------------------------------------------ apps

    def apply_report(self, app: AppView, report: Report) -> None:
        kind = report.kind
        if kind == "ready":
            app.phase = "ready"
        elif kind == "start":
            app.phase = "streaming"
            app.stream = report.stream
            app.output_tokens = 0
            app.grant_tokens = report.grant_tokens
            if report.reservation_id:
                self.owners[report.reservation_id] = (app.name, report.stream)
        elif kind == "progress":
            if report.stream == app.stream:
                app.output_tokens = max(app.output_tokens, report.output_tokens)
                app.grant_tokens = report.grant_tokens
        elif (outcome := _OUTCOMES.get(kind)) is not None:
            app.phase = outcome
            app.last_outcome = outcome
            app.output_tokens = report.output_tokens
            app.grant_tokens = report.grant_tokens
            app.results.append(
                StreamResult(
                    number=report.stream,
                    outcome=outcome,
                    output_tokens=report.output_tokens,
                    input_tokens=report.input_tokens,
                    grant_tokens=report.grant_tokens,
                    charged_tokens=report.charged_tokens,
                    overage_tokens=report.overage_tokens,
                    request_id=report.request_id,
                )
            )
            if outcome == "aborted":
                self.note(
                    app.name,
                    "ABORTED",
                    f"#{report.stream} cut off at {report.output_tokens:,} tokens, "
                    f"{report.message or 'its budget'} exhausted (grant "
                    f"{report.grant_tokens:,}, charged {report.charged_tokens:,}, "
                    f"overage {report.overage_tokens:,})",
                )
        elif kind == "refused":
            app.refusals += 1
            app.phase = "waiting" if report.waiting else "out"
            if not report.waiting:
                self.note(
                    app.name,
                    "REFUSED",
                    f"new request refused ({report.available_tokens:,} tokens left, "
                    "none held by others): stopping",
                )
        elif kind == "exit":
            app.exit_reason = report.message
            if app.phase != "error":
                app.phase = "out" if report.message == "budget" else "stopped"
        elif kind == "error":
            app.phase = "error"
            app.error = report.message
            self.note(app.name, "ERROR", report.message)

    def app_exited(self, app: AppView, code: int, stderr_tail: str) -> None:
        app.exit_code = code
        if code != 0 and app.phase != "error":
            app.phase = "error"
            app.error = stderr_tail or f"exited with status {code}"
            self.note(app.name, "ERROR", app.error)
        elif app.phase not in ("out", "stopped", "error"):
            app.phase = "stopped"

    # ------------------------------------------------------------------ budgetd

    def set_budget(self, budget: Budget) -> None:
        self.budget = budget

    def apply_event(self, event: pb.BudgetEvent) -> None:
        kind = pb.BudgetEventKind.Name(event.kind).removeprefix("BUDGET_EVENT_KIND_")
        if kind == "RESERVED":
            self.grants += 1  # opens and extensions: too many to list, counted instead
            return
        figures = f"spent {event.spent:,} / {event.limit:,}" if event.limit else ""
        owner = self._owner(event.reservation_id)
        if kind == "COMMITTED":
            self.commits += 1
            text = f"{owner}: charged {event.amount:,} tokens · {figures}"
        elif kind == "ALERT":
            self.alerts_s.setdefault(event.threshold_pct, self.elapsed_s())
            text = f"{event.budget_id} crossed {event.threshold_pct}% · {figures}"
        elif kind == "REFUSED":
            text = event.message or f"{event.amount:,} tokens refused"
        elif kind == "ABORTED":
            text = f"{owner}: {event.message or 'aborted'}"
        else:
            parts = [owner if event.reservation_id else event.budget_id, event.message, figures]
            text = " · ".join(p for p in parts if p)
        self.note("budgetd", kind, text)

    def _owner(self, reservation_id: str) -> str:
        owner = self.owners.get(reservation_id)
        if owner is None:
            return reservation_id[:14] or "?"
        return f"{owner[0]} #{owner[1]}"

    # ------------------------------------------------------------------ totals

    @property
    def charged_tokens(self) -> int:
        return sum(app.charged_tokens for app in self.apps)

    @property
    def aborts(self) -> int:
        return sum(app.aborts for app in self.apps)

    @property
    def exhausted(self) -> bool:
        """Every app stopped because a new request was refused with nothing held."""
        return all(app.exit_reason == "budget" for app in self.apps)
