"""Drawing the demo: a live frame redrawn in place on a terminal, plain lines otherwise.

No curses and no dependencies: a frame is a list of lines, each a list of (text, style)
segments, so that it can be cut to the terminal's width without cutting an escape
sequence in half. The frame is redrawn by moving the cursor back up over the previous one
(not on the alternate screen), so the last frame and the summary stay in the scrollback.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from budget_client.demo._state import AppView, DemoState, LogLine
from budget_client.demo._summary import Summary

Segment = tuple[str, str]
"""Text and its SGR style ("1;32"), "" for none."""
Line = list[Segment]

BOLD, DIM = "1", "2"
RED, GREEN, YELLOW, BLUE, MAGENTA, CYAN = "31", "32", "33", "34", "35", "36"
EVENTS_SHOWN_MAX = 14
BAR_WIDTH_MAX = 60
APP_BAR_WIDTH = 10
WIDE_COLUMNS_MIN = 100
LINE_CHARS_UNCUT = 10_000
THRESHOLDS_PCT = (50, 70, 90, 100)


@dataclass(frozen=True, slots=True)
class Setting:
    """What the frame's header says about the demo's parts."""

    budgetd_address: str
    """host:port budgetd listens on."""
    openai_base_url: str
    """Base URL of the OpenAI-compatible server the apps stream from."""
    rate_tokens_per_s: float
    """How fast that server streams each reply; 0 for unpaced."""
    model: str
    """The model the apps ask for (it picks the tokenizer)."""


class Painter:
    def __init__(self, color: bool) -> None:
        self.color = color

    def line(self, segments: Sequence[Segment], width: int) -> str:
        """The segments as one line, cut to `width` visible characters."""
        out: list[str] = []
        left = width
        for text, style in segments:
            if left <= 0:
                break
            piece = text[:left]
            left -= len(piece)
            out.append(f"\x1b[{style}m{piece}\x1b[0m" if style and self.color else piece)
        return "".join(out)


def _width(segments: Sequence[Segment]) -> int:
    return sum(len(text) for text, _ in segments)


def _spread(left: Line, right: Line, width: int) -> Line:
    """`left` and `right` on one line, `right` flush with the edge when there is room."""
    gap = width - _width(left) - _width(right)
    return [*left, (" " * max(1, gap), ""), *right]


# ----------------------------------------------------------------------------- the frame


def frame(state: DemoState, setting: Setting, width: int, height: int) -> list[Line]:
    """The live view: header, the budget as a bar, one row per app, the latest events."""
    budget = state.budget
    header: list[Line] = [
        _spread(
            [
                (" budgetd demo ", "1;7"),
                (f"  {len(state.apps)} app processes share one HARD budget: ", BOLD),
                (state.budget_id, "1;36"),
            ],
            [(f"{state.elapsed_s():6.1f} s ", DIM)],
            width,
        ),
        [
            (
                f" budgetd {setting.budgetd_address} · fake OpenAI {setting.openai_base_url} · "
                f"{rate_text(setting.rate_tokens_per_s)} per stream · {setting.model}",
                DIM,
            )
        ],
        [],
    ]
    spent = budget.spent if budget else 0
    reserved = budget.reserved if budget else 0
    overage = budget.overage if budget else 0
    available = budget.available if budget else state.limit
    bar_width = max(10, min(BAR_WIDTH_MAX, width - 32))  # room for the ticks' legend
    used_pct = 100 * (spent + reserved) / state.limit if state.limit else 0.0
    budget_lines: list[Line] = [
        [
            (" budget ", BOLD),
            (f"{spent:,}", _pct_style(100 * spent / state.limit if state.limit else 0)),
            (" spent + ", ""),
            (f"{reserved:,}", CYAN),
            (" reserved of ", ""),
            (f"{state.limit:,}", BOLD),
            (" tokens", ""),
            (f" · {available:,} available · overage {overage:,}", DIM),
        ],
        [
            ("  ", ""),
            *_budget_bar(spent, reserved, state.limit, bar_width),
            (f" {used_pct:5.1f}%", BOLD),
        ],
        [("  ", ""), *_ticks(state, bar_width)],
        [],
    ]
    wide = width >= WIDE_COLUMNS_MIN
    table: list[Line] = [
        _cells([(title, size, align, "1;4") for title, size, align in _columns(wide)]),
        *(_app_row(app, wide) for app in state.apps),
        [],
    ]
    footer: list[Line] = [[(f" {state.status}", DIM), (" · Ctrl-C stops the demo", DIM)]]
    fixed = len(header) + len(budget_lines) + len(table) + 1 + len(footer)
    shown = max(0, min(EVENTS_SHOWN_MAX, height - 1 - fixed))
    events: list[Line] = [
        [
            (" events ", BOLD),
            ("budgetd WatchBudgets: commits, alerts, refusals · apps: aborts, stops", DIM),
        ]
    ]
    recent = list(state.log)[-shown:] if shown else []
    events.extend(_event_line(entry) for entry in recent)
    events.extend([] for _ in range(shown - len(recent)))  # a steady height: no jumping
    return [*header, *budget_lines, *table, *events, *footer]


def rate_text(tokens_per_s: float) -> str:
    return f"{tokens_per_s:g} tok/s" if tokens_per_s else "unpaced"


def _pct_color(pct: float) -> str:
    """Green, then yellow from 70 %, red from 90 %: the alert tiers."""
    if pct >= 90:
        return RED
    if pct >= 70:
        return YELLOW
    return GREEN


def _pct_style(pct: float) -> str:
    return f"{BOLD};{_pct_color(pct)}"


def _budget_bar(spent: int, reserved: int, limit: int, width: int) -> Line:
    """Spent, then reserved, then free, in `width` cells; past the limit the bar is full."""
    if limit <= 0:
        return [("[", DIM), ("?" * width, DIM), ("]", DIM)]
    spent_cells = min(width, math.floor(width * spent / limit))
    used_cells = min(width, math.ceil(width * (spent + reserved) / limit))
    reserved_cells = max(0, used_cells - spent_cells)
    free_cells = width - spent_cells - reserved_cells
    return [
        ("▕", DIM),
        ("█" * spent_cells, _pct_color(100 * spent / limit)),
        ("▓" * reserved_cells, CYAN),
        ("░" * free_cells, DIM),
        ("▏", DIM),
    ]


def _ticks(state: DemoState, width: int) -> Line:
    """The alert thresholds under the bar, marked once their alert has arrived."""
    segments: Line = [(" ", "")]  # under the bar's left edge
    cursor = 0
    for pct in THRESHOLDS_PCT:
        position = min(width - 1, round(width * pct / 100) - 1)
        fired = pct in state.alerts_s
        label = f"{'▲' if fired else '╵'}{pct}%"
        if position < cursor:
            continue
        segments.append((" " * (position - cursor), ""))
        segments.append((label, "1;33" if fired else DIM))
        cursor = position + len(label)
    segments.append(("  ▲ alert fired", DIM))
    return segments


_PHASES: dict[str, tuple[str, str]] = {
    "starting": ("… starting", DIM),
    "ready": ("… ready", DIM),
    "streaming": ("● streaming", "1;32"),
    "done": ("✓ done", GREEN),
    "aborted": ("✗ aborted by budget", "1;31"),
    "closed": ("■ closed by the demo", YELLOW),
    "waiting": ("◌ waiting for budget", YELLOW),
    "stopped": ("■ stopped", DIM),
    "error": ("! error", "1;31"),
}


def _state_text(app: AppView) -> tuple[str, str]:
    if app.phase == "out":
        last = "✗ aborted" if app.last_outcome == "aborted" else "✓ done"
        return f"{last} · no budget", MAGENTA
    return _PHASES[app.phase]


def _columns(wide: bool) -> list[tuple[str, int, str]]:
    """Title, width and alignment of the app table's columns; the token bar and the grant
    only when the terminal is wide enough, so that 80 columns keep the totals."""
    columns = [("app", 6, "<"), ("stream", 6, ">"), ("tokens", 6, ">"), ("/ reply", 8, "<")]
    if wide:
        columns += [("", APP_BAR_WIDTH, "<"), ("grant", 6, ">")]
    return [*columns, ("state", 22, "<"), ("streams", 7, ">"), ("aborts", 6, ">"),
            ("charged", 8, ">")]  # fmt: skip


def _cells(cells: Sequence[tuple[str, int, str, str]]) -> Line:
    """One table row: each cell padded to its column, one space apart."""
    line: Line = [(" ", "")]
    for index, (text, size, align, style) in enumerate(cells):
        if index:
            line.append((" ", ""))
        line.append((f"{text:{align}{size}}", style))
    return line


def _app_row(app: AppView, wide: bool) -> Line:
    state_text, state_style = _state_text(app)
    tokens = app.output_tokens
    columns = _columns(wide)
    values: list[tuple[str, str]] = [
        (app.name, BOLD),
        (f"#{app.stream}" if app.stream else "-", ""),
        (f"{tokens:,}", ""),
        (f"/ {app.reply_tokens:,}", DIM),
    ]
    if wide:
        values += [("", ""), (f"{app.grant_tokens:,}", DIM)]
    values += [
        (state_text, state_style),
        (str(len(app.results)), ""),
        (str(app.aborts), "1;31" if app.aborts else ""),
        (f"{app.charged_tokens:,}", ""),
    ]
    line = _cells(
        [
            (text, size, align, style)
            for (text, style), (_, size, align) in zip(values, columns, strict=True)
        ]
    )
    if wide:  # the token bar goes in its (blank) cell: tokens counted against the reply
        filled = min(APP_BAR_WIDTH, round(APP_BAR_WIDTH * tokens / app.reply_tokens))
        bar_style = {"streaming": GREEN, "aborted": RED}.get(app.phase, DIM)
        if app.phase == "out" and app.last_outcome == "aborted":
            bar_style = RED
        bar_at = 2 * 4 + 1  # the lead space and four cells with their separators
        line[bar_at : bar_at + 1] = [
            ("█" * filled, bar_style),
            ("·" * (APP_BAR_WIDTH - filled), DIM),
        ]
    return line


_KIND_STYLES = {
    "ALERT": "1;33",
    "COMMITTED": GREEN,
    "REFUSED": MAGENTA,
    "ABORTED": "1;31",
    "ERROR": "1;31",
}


def _event_line(entry: LogLine) -> Line:
    repeats = f" ×{entry.repeats}" if entry.repeats > 1 else ""
    return [
        (f"  {f'+{entry.at_s:.2f}s':>8} ", DIM),
        (f"{entry.source:<8} ", CYAN if entry.source == "budgetd" else BOLD),
        (f"{entry.kind:<10}", _KIND_STYLES.get(entry.kind, "")),
        (entry.text + repeats, ""),
    ]


# ----------------------------------------------------------------------------- outputs


class Output:
    """A text stream that may go away mid-demo (a closed terminal, `| head`): writes then
    stop quietly instead of raising, so the demo still stops its children in order."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.broken = True
            # Python flushes stdout again at exit and would complain about it there.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)


class LiveScreen:
    """Redraws a frame in place: back up over the last frame, overwrite, clear the rest."""

    def __init__(self, out: Output, painter: Painter) -> None:
        self._out = out
        self._painter = painter
        self._height = 0

    def draw(self, state: DemoState, setting: Setting) -> None:
        size = shutil.get_terminal_size()
        width = size.columns - 1  # a full last column would wrap on some terminals
        lines = frame(state, setting, width, size.lines)
        # One line short of the screen: a frame taller than the screen would scroll, and
        # the cursor could not move back up over the lines that scrolled away.
        lines = lines[: max(1, size.lines - 1)]
        parts = ["\x1b[?25l"]  # hide the cursor while drawing
        if self._height:
            parts.append(f"\x1b[{self._height}F")
        for line in lines:
            parts.append(self._painter.line(line, width) + "\x1b[K\n")
        parts.append("\x1b[J")
        self._out.write("".join(parts))
        self._height = len(lines)

    def close(self) -> None:
        self._out.write("\x1b[?25h")


class PlainLines:
    """For a pipe or a log file: new events as they come, the figures every second."""

    def __init__(self, out: Output) -> None:
        self._out = out
        self._printed = 0

    def events(self, state: DemoState) -> None:
        new = state.logged - self._printed
        if new <= 0:
            return
        for entry in list(state.log)[-new:]:
            repeats = f" (x{entry.repeats})" if entry.repeats > 1 else ""
            self._out.write(
                f"[{entry.at_s:6.2f}s] {entry.source:<8} {entry.kind:<10}{entry.text}{repeats}\n"
            )
        self._printed = state.logged

    def status(self, state: DemoState) -> None:
        budget = state.budget
        spent = budget.spent if budget else 0
        reserved = budget.reserved if budget else 0
        apps = " | ".join(
            f"{app.name} #{app.stream} {app.phase} {app.output_tokens}" for app in state.apps
        )
        self._out.write(
            f"[{state.elapsed_s():6.2f}s] budget   spent {spent:,} + reserved {reserved:,} "
            f"of {state.limit:,} | {apps}\n"
        )


def summary_lines(summary: Summary, painter: Painter) -> list[str]:
    """The summary for people, in lines of about 80 columns, never cut (the SUMMARY json
    line is printed after it)."""
    elapsed = f"{summary.elapsed_s:.1f} s"
    headline, why = {
        "exhausted": (
            f"budget {summary.budget_id} exhausted after {elapsed}",
            "every app's next request was refused, and no stream held any budget",
        ),
        "duration-limit": (
            f"stopped by --duration-limit after {elapsed}",
            "the budget had not run out",
        ),
        "interrupted": (f"interrupted after {elapsed}", "the apps closed their streams"),
        "error": (f"stopped after {elapsed} by an error", "see the errors below"),
    }[summary.ending]
    lines: list[Line] = [[(" summary ", "1;7"), (f"  {headline}", BOLD)], [(f" {why}", DIM)], []]
    header = [
        ("app", 6, "<"), ("reply", 6, ">"), ("streams", 7, ">"), ("done", 5, ">"),
        ("aborted", 7, ">"), ("refused", 7, ">"), ("output", 7, ">"), ("input", 6, ">"),
        ("charged", 8, ">"), ("overage", 7, ">"),
    ]  # fmt: skip
    lines.append(_cells([(title, size, align, "1;4") for title, size, align in header]))

    def row(values: Sequence[str], style: str, aborted: int) -> Line:
        cells = [
            (v, size, align, style) for v, (_, size, align) in zip(values, header, strict=True)
        ]
        if aborted:
            cells[4] = (cells[4][0], cells[4][1], cells[4][2], "1;31")
        return _cells(cells)

    for app in summary.apps:
        values = [
            app.name, f"{app.reply_tokens:,}", str(app.streams), str(app.completed),
            str(app.aborted), str(app.refused), f"{app.output_tokens:,}",
            f"{app.input_tokens:,}", f"{app.charged_tokens:,}", f"{app.overage_tokens:,}",
        ]  # fmt: skip
        lines.append(row(values, "", app.aborted))
    apps = summary.apps
    totals = [
        "total", "", str(sum(a.streams for a in apps)), str(sum(a.completed for a in apps)),
        str(summary.aborts), str(sum(a.refused for a in apps)),
        f"{sum(a.output_tokens for a in apps):,}", f"{sum(a.input_tokens for a in apps):,}",
        f"{summary.charged_tokens:,}", f"{sum(a.overage_tokens for a in apps):,}",
    ]  # fmt: skip
    lines.append(row(totals, BOLD, 0))
    lines.append([])

    def check(label: str, text: str, ok: bool) -> Line:
        return [(f" {label:<9} ", BOLD), (text, ""), (" ✓" if ok else " ✗", GREEN if ok else RED)]

    lines.append(
        [
            (" ledger    ", BOLD),
            (
                f"spent {summary.spent:,} of {summary.limit:,} tokens · reserved "
                f"{summary.reserved:,} · overage {summary.overage:,}",
                "",
            ),
        ]
    )
    lines.append(
        check(
            "",
            f"charged to the apps: {summary.charged_tokens:,} (= spent)",
            summary.charged_tokens == summary.spent,
        )
    )
    lines.append(
        check(
            "",
            f"spent <= limit + overage: {summary.spent:,} <= {summary.limit + summary.overage:,}",
            summary.spent <= summary.limit + summary.overage,
        )
    )
    verification = summary.verification
    if verification is None:
        lines.append(check("", "VerifyLedger: not run", False))
    else:
        verdict = "ok" if verification.ok else "DRIFT: " + "; ".join(verification.drifts)
        lines.append(
            check(
                "",
                f"VerifyLedger: {verdict} ({verification.entries_checked} entries recomputed)",
                verification.ok,
            )
        )
    alerts = ", ".join(f"{p}%" for p in summary.alerts_pct) or "none"
    lines.append([(" alerts    ", BOLD), (alerts, "")])
    upstream = summary.upstream
    if upstream is not None:
        lines.append(
            [
                (" upstream  ", BOLD),
                (
                    f"fake OpenAI server: {upstream.requests} requests, {upstream.completed} "
                    f"completed, {upstream.cut_off} cut off by the client",
                    "",
                ),
            ]
        )
        for text in (
            f"sent {upstream.output_tokens_sent:,} output tokens, counted "
            f"{upstream.prompt_tokens:,} prompt tokens",
            f"charged {upstream.output_tokens_charged:,} output + "
            f"{upstream.input_tokens_charged:,} input tokens",
            f"{_tokens(upstream.unseen_tokens)} sent but never charged (in flight at a cut-off)",
        ):
            lines.append([(" " * 11, ""), (text, "")])
        for cut in upstream.cut_streams:
            lines.append(
                [
                    (" " * 13, ""),
                    (
                        f"{cut.app} #{cut.stream}: grant {cut.grant_tokens:,}, sent "
                        f"{cut.sent_tokens:,}, counted and charged {cut.counted_tokens:,} "
                        f"(overage {cut.overage_tokens:,})"
                        + (" · the reply had ended" if cut.completed else ""),
                        DIM,
                    ),
                ]
            )
    for error in summary.errors:
        lines.append([(" error     ", "1;31"), (error, "")])
    return [painter.line(line, LINE_CHARS_UNCUT) for line in lines]


def _tokens(count: int) -> str:
    return f"{count:,} output token was" if count == 1 else f"{count:,} output tokens were"
