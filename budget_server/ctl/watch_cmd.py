"""`budgetctl watch`: budgets' figures and events, live.

On a terminal it draws a view in place, on the alternate screen as `top` does: a row per
budget under --prefix, refreshed every --interval (ListBudgets), with a utilisation bar
(█ spent, ▓ reserved, ░ free: green, yellow from 70 %, red from 90 % of the limit spent
or reserved; no colour with NO_COLOR), spent, reserved and limit in the budget's unit,
the open reservations and the frozen flag; under it, the last events of budgetd's
WatchBudgets stream. Ctrl-C (or SIGTERM) leaves and restores the terminal: exit 0.

Otherwise (stdout not a terminal, or --json) it prints one JSON object per line, flushed
as it happens, so that scripts can follow along (messages in render.py's JSON form):

    {"type": "snapshot", "at_us": int, "budgets": [Budget, ...], "more": bool,
     "open_reservations": {budget_id: int}}                         every --interval
    {"type": "event", "event": BudgetEvent}                            as budgetd sends it
    {"type": "status", "at_us": int, "status": str, "message": str}    stream_lost,
        resubscribed, unreachable, reachable or events_dropped
    {"type": "end", "at_us": int, "reason": str, "snapshots": int, "events": int}
        last: after --duration ("duration"), Ctrl-C ("interrupted"), or when the reader
        of stdout left ("reader_gone")

`open_reservations` counts the PENDING reservations made on each budget (meter streams and
Reserve holds; a parent's count leaves out its children's), for the first
OPEN_COUNTED_MAX budgets, and stops at OPEN_COUNT_MAX: that figure means "so many or more".
Figures are every replica's (they come from the database); of the events, alerts,
freezes, limit changes and deletions come from every replica, reservations and commits
from the replica this connection reached.

When the event stream breaks, budgetctl subscribes again with back-off (events in the gap
are lost; the next snapshot has the figures right). When budgetd stops answering for
--reconnect seconds, or does not answer the first call, watch gives up: exit 3.

One background thread reads the stream and hands events over through a bounded queue;
the main thread alone calls ListBudgets and writes, so output is never interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType, TracebackType
from typing import Any, Final, Literal, Protocol, TextIO

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import parser as cli
from budget_server.ctl import render
from budget_server.ctl.amounts import format_amount, format_percent, format_tokens
from budget_server.ctl.commands import Result
from budget_server.ctl.failures import CtlError, ServerRefused, Unreachable
from budget_server.ctl.rpc import PAGE_SIZE_MAX, Admin, EventStream

if sys.platform != "win32":
    import termios  # echo off during the view; elsewhere it just echoes

INTERVAL_DEFAULT_S: Final = 1.0
INTERVAL_MIN_S: Final = 0.1
"""Each refresh is up to 1 + OPEN_COUNTED_MAX calls; faster than this only loads budgetd."""
RECONNECT_DEFAULT_S: Final = 10.0
RECONNECT_MAX_S: Final = 3600.0
RETRY_S: Final = 1.0
"""While budgetd does not answer, ask again this often (or every --interval if shorter)."""
BUDGETS_DEFAULT: Final = 100
BUDGETS_MAX: Final = 1000
OPEN_COUNTED_MAX: Final = 50
OPEN_COUNT_MAX: Final = 100
EVENT_QUEUE_MAX: Final = 10_000
"""Events waiting for the main thread; beyond this they are dropped, and counted."""
DRAIN_MAX: Final = 1000
"""Events handled per pass of the main loop, so a storm cannot starve refreshes."""
EVENTS_KEPT: Final = 200
BACKOFF_MIN_S: Final = 0.2
BACKOFF_MAX_S: Final = 5.0
STOP_WAIT_S: Final = 2.0
REDRAW_MIN_S: Final = 0.1
"""An event redraws the screen at most this often; a refresh redraws at once."""
UNITS_CACHED_MAX: Final = 10_000
BAR_WIDTH: Final = 20
BAR_WIDTH_MIN: Final = 8
PERCENT_WIDTH: Final = 7
"""` 100.0%` after the bar."""
WARN_PCT: Final = 70
ALARM_PCT: Final = 90
EVENT_LINES_MIN: Final = 5
ID_WIDTH_MIN: Final = 12

_RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # budgetd drops a watcher that lags far behind
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

# ANSI escapes (ECMA-48 and xterm's private modes), understood by every terminal in use.
ENTER_SCREEN: Final = "\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J"  # alternate screen, hide cursor
LEAVE_SCREEN: Final = "\x1b[0m\x1b[?25h\x1b[?1049l"
HOME: Final = "\x1b[H"
CLEAR_LINE_END: Final = "\x1b[K"
CLEAR_SCREEN_END: Final = "\x1b[J"
RESET: Final = "\x1b[0m"
BOLD: Final = "\x1b[1m"
DIM: Final = "\x1b[2m"
RED: Final = "\x1b[31m"
GREEN: Final = "\x1b[32m"
YELLOW: Final = "\x1b[33m"

SPENT_CELL: Final = "█"
RESERVED_CELL: Final = "▓"
FREE_CELL: Final = "░"


def now_us() -> int:
    return time.time_ns() // 1000


# ---------------------------------------------------------------- the event stream


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The feed sent a WatchBudgets call (budgetd confirms nothing until the first event)."""


@dataclass(frozen=True, slots=True)
class StreamLost:
    """The call ended: `error` None when budgetd ended it, `fatal` when retrying is futile."""

    error: CtlError | None
    """What the call failed with."""
    fatal: bool
    """A refusal (bad key, no permission, unknown method): the feed has stopped."""


FeedItem = pb.BudgetEvent | Subscribed | StreamLost
StreamState = Literal["pending", "live", "lost"]


def retryable(error: CtlError) -> bool:
    if isinstance(error, Unreachable):
        return True
    return isinstance(error, ServerRefused) and error.code in _RETRYABLE


class EventFeed:
    """WatchBudgets read on a background thread, subscribed again after each break."""

    def __init__(self, admin: Admin, prefix: str) -> None:
        self._admin = admin
        self._prefix = prefix
        self._queue: queue.Queue[FeedItem] = queue.Queue(EVENT_QUEUE_MAX)
        self._stopping = threading.Event()
        self._wake = threading.Event()  # cuts a back-off short: stop() or resubscribe()
        self._lock = threading.Lock()
        self._stream: EventStream | None = None  # the call being read, to cancel
        self._restart = False  # the call was cancelled to subscribe again, not lost
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="watch-events", daemon=True)

    def __enter__(self) -> EventFeed:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel the call and wait (briefly: the thread is a daemon) for the thread."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT_S)

    def resubscribe(self) -> None:
        """Drop the call and make a new one now.

        After an outage the old call may still be open on a budgetd that is draining
        (it keeps streams through its shutdown grace while refusing new calls): silent,
        while a new budgetd on the same address already answers.
        """
        with self._lock:
            stream = self._stream
            self._restart = stream is not None
        self._wake.set()
        if stream is not None:
            stream.cancel()

    def get(self, timeout_s: float) -> FeedItem | None:
        """The next item, waiting up to timeout_s; None when there is none yet."""
        try:
            if timeout_s <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def take_dropped(self) -> int:
        """Events dropped on a full queue since the last call."""
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def _run(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # a bug must end the watch, not leave it silently stale
            self._hand(StreamLost(CtlError(f"the event stream failed: {exc!r}"), fatal=True))

    def _follow(self) -> None:
        backoff_s = BACKOFF_MIN_S
        while not self._stopping.is_set():
            self._wake.clear()
            stream = self._admin.watch_budgets(self._prefix)
            with self._lock:
                self._stream, self._restart = stream, False
            if self._stopping.is_set():  # stop() ran before the call was stored
                stream.cancel()
                return
            self._hand(Subscribed())
            error: CtlError | None = None
            try:
                for event in stream:
                    backoff_s = BACKOFF_MIN_S
                    self._offer(event)
            except CtlError as exc:
                error = exc
            with self._lock:
                self._stream = None
                restart, self._restart = self._restart, False
            if self._stopping.is_set():
                return
            if restart:
                continue
            fatal = error is not None and not retryable(error)
            self._hand(StreamLost(error, fatal))
            if fatal:
                return
            self._wake.wait(backoff_s)
            backoff_s = min(2 * backoff_s, BACKOFF_MAX_S)

    def _offer(self, event: pb.BudgetEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def _hand(self, item: FeedItem) -> None:
        """Control items are never dropped: wait for room (the main thread drains)."""
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


# ---------------------------------------------------------------- figures


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Budgets' figures at one refresh."""

    at_us: int
    """When budgetctl took it (this machine's clock)."""
    budgets: Sequence[pb.Budget]
    """In id order, at most --limit."""
    more: bool
    """More budgets under the prefix than --limit."""
    open_reservations: Mapping[str, int]
    """PENDING reservations per counted budget, capped at OPEN_COUNT_MAX."""
    open_more: frozenset[str] = frozenset()
    """Budgets with more than OPEN_COUNT_MAX open reservations."""


def take_snapshot(admin: Admin, prefix: str, budgets_max: int) -> Snapshot:
    at_us = now_us()
    budgets, more = admin.list_budgets(
        prefix, wanted=budgets_max, page_size=min(budgets_max, PAGE_SIZE_MAX)
    )
    counted = budgets[:OPEN_COUNTED_MAX]
    requests = [
        pb.ListReservationsRequest(
            budget_id=budget.id, state=pb.RESERVATION_STATE_PENDING, page_size=OPEN_COUNT_MAX
        )
        for budget in counted
    ]
    answers = admin.call_all(admin.stub.ListReservations, requests)
    open_reservations: dict[str, int] = {}
    open_more: set[str] = set()
    for budget, answer in zip(counted, answers, strict=True):
        if isinstance(answer, CtlError):
            if isinstance(answer, ServerRefused) and answer.code == grpc.StatusCode.NOT_FOUND:
                continue  # deleted since ListBudgets; the next refresh leaves it out
            raise answer
        open_reservations[budget.id] = len(answer.reservations)
        if answer.next_page_token:
            open_more.add(budget.id)
    return Snapshot(at_us, budgets, more, open_reservations, frozenset(open_more))


def snapshot_json(snapshot: Snapshot) -> render.JSONObject:
    return {
        "type": "snapshot",
        "at_us": snapshot.at_us,
        "budgets": [render.message_json(budget) for budget in snapshot.budgets],
        "more": snapshot.more,
        "open_reservations": dict(snapshot.open_reservations),
    }


# ---------------------------------------------------------------- drawing


def utilisation_bar(spent: int, reserved: int, limit: int, width: int = BAR_WIDTH) -> str:
    """`███▓▓░░░…`: spent, then reserved, then free, each rounded to the nearest cell."""
    if limit <= 0:
        return (SPENT_CELL if spent + reserved > 0 else FREE_CELL) * width

    def cells(amount: int) -> int:
        return min(width, max(0, (amount * width * 2 + limit) // (limit * 2)))

    spent_cells = cells(spent)
    used_cells = max(spent_cells, cells(spent + reserved))
    return (
        SPENT_CELL * spent_cells
        + RESERVED_CELL * (used_cells - spent_cells)
        + FREE_CELL * (width - used_cells)
    )


def level_colour(spent: int, reserved: int, limit: int) -> str:
    """Red from ALARM_PCT, yellow from WARN_PCT of the limit spent or held: what is
    reserved is as unavailable to new grants as what is spent."""
    used = spent + reserved
    if limit <= 0:
        return RED if used > 0 else GREEN
    if used * 100 >= ALARM_PCT * limit:
        return RED
    if used * 100 >= WARN_PCT * limit:
        return YELLOW
    return GREEN


def clock_time(us: int) -> str:
    """`09:30:01`, UTC, for the live view."""
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%H:%M:%S")


def short_id(budget_id: str, width: int) -> str:
    """Ids share their prefix, so a long one keeps its distinctive tail: `…/team:search`."""
    if len(budget_id) <= width:
        return budget_id
    return "…" + budget_id[len(budget_id) - width + 1 :]


def _kind_label(kind: int) -> str:
    return render.enum_label(pb.BudgetEventKind.DESCRIPTOR, kind)


def event_detail(event: pb.BudgetEvent, unit: pb.Unit.ValueType) -> str:
    """What the event says, amounts in the budget's unit (raw integers when unknown)."""

    def amount(value: int) -> str:
        return format_amount(value, unit) if unit != pb.UNIT_UNSPECIFIED else f"{value:,}"

    held = f"  {event.reservation_id}" if event.reservation_id else ""
    kind = event.kind
    if kind == pb.BUDGET_EVENT_KIND_RESERVED:
        return f"{amount(event.amount)} granted{held}"
    if kind == pb.BUDGET_EVENT_KIND_COMMITTED:
        figures = f" (spent {amount(event.spent)} of {amount(event.limit)})" if event.limit else ""
        return f"{amount(event.amount)} charged{figures}{held}"
    if kind == pb.BUDGET_EVENT_KIND_RELEASED:
        return f"hold released{held}"
    if kind == pb.BUDGET_EVENT_KIND_EXPIRED:
        return f"{amount(event.amount)} charged on expiry{held}"
    if kind == pb.BUDGET_EVENT_KIND_REFUSED:
        return f"{amount(event.amount)} refused: {event.message}"
    if kind == pb.BUDGET_EVENT_KIND_ABORTED:
        # The amount of an abort is the stream's output so far, in tokens whatever the unit.
        return f"stream aborted at {format_tokens(event.amount)} output: {event.message}{held}"
    if kind == pb.BUDGET_EVENT_KIND_ALERT:
        return (
            f"{event.threshold_pct}% crossed: spent {amount(event.spent)} of {amount(event.limit)}"
        )
    if kind == pb.BUDGET_EVENT_KIND_LIMIT_CHANGED:
        return f"limit now {amount(event.amount)}" + (f": {event.message}" if event.message else "")
    if kind == pb.BUDGET_EVENT_KIND_FROZEN:
        return f"frozen: {event.message}" if event.message else "frozen"
    return event.message


_KIND_COLOURS: Final = {
    pb.BUDGET_EVENT_KIND_ALERT: YELLOW,
    pb.BUDGET_EVENT_KIND_REFUSED: RED,
    pb.BUDGET_EVENT_KIND_ABORTED: RED,
    pb.BUDGET_EVENT_KIND_FROZEN: RED,
    pb.BUDGET_EVENT_KIND_DELETED: RED,
    pb.BUDGET_EVENT_KIND_UNFROZEN: GREEN,
}


@dataclass(slots=True)
class Line:
    """One screen line: plain text, and (start, end, escape) spans to colour."""

    text: str = ""
    spans: list[tuple[int, int, str]] = field(default_factory=list)

    def add(self, text: str, style: str = "") -> None:
        if style:
            self.spans.append((len(self.text), len(self.text) + len(text), style))
        self.text += text

    def render(self, width: int, colour: bool) -> str:
        """Cut to width (before colouring, so escapes never count as columns)."""
        text = self.text[:width]
        if not colour:
            return text
        out = []
        position = 0
        for start, end, style in sorted(self.spans):
            if start >= len(text):
                break
            end = min(end, len(text))
            out.append(text[position:start] + style + text[start:end] + RESET)
            position = end
        out.append(text[position:])
        return "".join(out)


TABLE_TITLES: Final = ("BUDGET", "UTILISATION", "SPENT", "RESERVED", "LIMIT", "OPEN", "FROZEN")
TABLE_NUMERIC: Final = (False, False, True, True, True, True, False)
GAP: Final = "  "


def _budget_cells(budget: pb.Budget, snapshot: Snapshot, id_width: int) -> list[str]:
    """The row's cells, the utilisation bar left for budget_lines to size."""
    count = snapshot.open_reservations.get(budget.id)
    if count is None:
        opened = "-"  # not counted: beyond the first OPEN_COUNTED_MAX budgets
    else:
        opened = f"{count}+" if budget.id in snapshot.open_more else str(count)
    return [
        short_id(budget.id, id_width),
        "",
        format_amount(budget.spent, budget.unit),
        format_amount(budget.reserved, budget.unit),
        format_amount(budget.limit, budget.unit),
        opened,
        "FROZEN" if budget.frozen else "",
    ]


def budget_lines(snapshot: Snapshot, width: int, rows_max: int) -> list[Line]:
    """The budgets table: a header, a row per budget, and a line for those left out.

    The bar gives up cells (down to BAR_WIDTH_MIN) before a narrow terminal cuts off the
    columns on its right.
    """
    budgets = list(snapshot.budgets)
    hidden = 0
    if len(budgets) > rows_max:  # the last row that fits says how many do not
        shown = max(0, rows_max - 1)
        hidden, budgets = len(budgets) - shown, budgets[:shown]
    rows = [_budget_cells(b, snapshot, max(ID_WIDTH_MIN, width // 3)) for b in budgets]
    widths = [len(title) for title in TABLE_TITLES]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    others = sum(widths) - widths[1] + len(GAP) * (len(widths) - 1) + PERCENT_WIDTH
    bar_width = min(BAR_WIDTH, max(BAR_WIDTH_MIN, width - others))
    widths[1] = max(widths[1], bar_width + PERCENT_WIDTH)
    for budget, row in zip(budgets, rows, strict=True):
        bar = utilisation_bar(budget.spent, budget.reserved, budget.limit, bar_width)
        row[1] = bar + format_percent(budget.spent, budget.limit).rjust(PERCENT_WIDTH)

    def joined(values: Sequence[str]) -> str:
        cells = [
            value.rjust(w) if numeric else value.ljust(w)
            for value, w, numeric in zip(values, widths, TABLE_NUMERIC, strict=True)
        ]
        return GAP.join(cells).rstrip()

    lines = [Line()]
    lines[0].add(joined(TABLE_TITLES), BOLD)
    bar_at = widths[0] + len(GAP)
    for budget, row in zip(budgets, rows, strict=True):
        line = Line(joined(row))
        colour = level_colour(budget.spent, budget.reserved, budget.limit)
        line.spans.append((bar_at, bar_at + bar_width, colour))
        if budget.frozen:
            line.spans.append((len(line.text) - len("FROZEN"), len(line.text), BOLD + RED))
        lines.append(line)
    if hidden:
        lines.append(Line(f"… and {hidden} more: a taller terminal or a narrower --prefix"))
    elif snapshot.more:
        lines.append(Line("… and more under the prefix than --limit fetched"))
    return lines


def event_line(event: pb.BudgetEvent, unit: pb.Unit.ValueType) -> Line:
    """`09:30:01  committed      org:acme/team:search  1,234 tok charged (...)  res_…`"""
    line = Line()
    line.add(clock_time(event.at_us) + "  ", DIM)
    line.add(f"{_kind_label(event.kind):<13}", _KIND_COLOURS.get(event.kind, ""))
    line.add(f"  {event.budget_id}  {event_detail(event, unit)}".rstrip())
    return line


# ---------------------------------------------------------------- views


class View(Protocol):
    """Where the watch goes: a terminal screen, or JSON lines."""

    def snapshot(self, snapshot: Snapshot) -> None: ...
    def event(self, event: pb.BudgetEvent) -> None: ...
    def status(self, status: str, message: str) -> None: ...

    def tick(self, now_s: float) -> float | None:
        """Draw what is due; return when (monotonic) to be called again, or None."""
        ...


class ReaderGone(Exception):
    """stdout's reader left (`budgetctl watch --json | head`): stop quietly."""


class JsonLinesView:
    """One JSON object per line, flushed at once (module docstring)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def __enter__(self) -> JsonLinesView:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def write(self, doc: render.JSONObject) -> None:
        try:
            self._out.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
            self._out.flush()
        except BrokenPipeError:
            # As main does: the interpreter's last flush must not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._out.fileno())
            raise ReaderGone from None

    def snapshot(self, snapshot: Snapshot) -> None:
        self.write(snapshot_json(snapshot))

    def event(self, event: pb.BudgetEvent) -> None:
        self.write({"type": "event", "event": render.message_json(event)})

    def status(self, status: str, message: str) -> None:
        self.write({"type": "status", "at_us": now_us(), "status": status, "message": message})

    def tick(self, now_s: float) -> float | None:
        return None


class TerminalView:
    """The live screen; entered as a context manager, which restores the terminal."""

    def __init__(self, out: TextIO, title: str, *, colour: bool) -> None:
        self._out = out
        self._title = title
        self._colour = colour
        self._snapshot: Snapshot | None = None
        self._events: deque[pb.BudgetEvent | str] = deque(maxlen=EVENTS_KEPT)
        self._units: dict[str, pb.Unit.ValueType] = {}
        self._notice = ""
        self._dirty = True
        self._drawn_s = -math.inf
        self._saved_tty: list[Any] | None = None
        self._saved_sigterm: Any = None

    def __enter__(self) -> TerminalView:
        self._saved_tty = _echo_off(sys.stdin)
        try:  # SIGTERM leaves as Ctrl-C does, through the restoring __exit__
            self._saved_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        except ValueError:  # not the main thread (a test calling main() in one)
            self._saved_sigterm = None
        self._out.write(ENTER_SCREEN)
        self._out.flush()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._out.write(LEAVE_SCREEN)
        self._out.flush()
        if self._saved_sigterm is not None:
            signal.signal(signal.SIGTERM, self._saved_sigterm)
        if self._saved_tty is not None:
            _restore_tty(sys.stdin, self._saved_tty)

    def snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        if len(self._units) > UNITS_CACHED_MAX:
            self._units.clear()
        self._units.update((b.id, b.unit) for b in snapshot.budgets)
        self._draw()

    def event(self, event: pb.BudgetEvent) -> None:
        self._events.append(event)
        self._dirty = True

    def status(self, status: str, message: str) -> None:
        self._notice = "" if status in ("reachable", "resubscribed") else message
        self._events.append(f"{clock_time(now_us())}  -- {message}")
        self._draw()

    def tick(self, now_s: float) -> float | None:
        if not self._dirty:
            return None
        due_s = self._drawn_s + REDRAW_MIN_S
        if now_s >= due_s:
            self._draw()
            return None
        return due_s

    def compose(self, width: int, height: int) -> list[Line]:
        """The whole screen, as lines of at most `height`."""
        title = Line()
        title.add(f"{self._title}  {clock_time(now_us())} UTC", BOLD)
        notice = Line()
        if self._notice:
            notice.add(self._notice, BOLD + YELLOW)
        else:
            notice.add("events: live", DIM)
        legend = Line(
            f"{SPENT_CELL} spent  {RESERVED_CELL} reserved  {FREE_CELL} free   "
            "OPEN: pending reservations   Ctrl-C quits"
        )
        legend.spans.append((0, len(legend.text), DIM))
        # title, notice, blank, ...budgets..., blank, events title, ...events..., legend
        room = max(0, height - 6)
        if self._snapshot is None:
            table = [Line("reading budgets…")]
        elif not self._snapshot.budgets:
            table = [Line("no budgets under this prefix")]
        else:
            wanted = len(self._snapshot.budgets) + 2  # header, and perhaps a "more" line
            rows_max = min(wanted, max(2, room - EVENT_LINES_MIN)) - 1
            table = budget_lines(self._snapshot, width, rows_max)
        events_room = max(0, room - len(table))
        recent = list(self._events)[-events_room:] if events_room else []
        events_title = Line()
        events_title.add("LAST EVENTS", BOLD)
        lines = [title, notice, Line(), *table, Line(), events_title]
        for item in recent:
            if isinstance(item, str):
                lines.append(Line(item, [(0, len(item), DIM)]))
            else:
                unit = self._units.get(item.budget_id, pb.UNIT_UNSPECIFIED)
                lines.append(event_line(item, unit))
        lines.extend(Line() for _ in range(events_room - len(recent)))
        lines.append(legend)
        return lines[:height]

    def _draw(self) -> None:
        size = shutil.get_terminal_size()
        # One column short of the edge: writing the last column makes some terminals wrap.
        width = max(1, size.columns - 1)
        lines = self.compose(width, size.lines)
        body = (CLEAR_LINE_END + "\r\n").join(line.render(width, self._colour) for line in lines)
        self._out.write(HOME + body + CLEAR_LINE_END + CLEAR_SCREEN_END)
        self._out.flush()
        self._dirty = False
        self._drawn_s = time.monotonic()


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _echo_off(stream: TextIO) -> list[Any] | None:
    """Keys typed during the watch would smear the screen: stop echoing them; return the
    settings to restore, or None when stdin is no terminal."""
    if sys.platform == "win32" or not stream.isatty():
        return None
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO  # lflag; ISIG stays, so Ctrl-C still interrupts
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except (termios.error, OSError, ValueError):
        return None
    return saved


def _restore_tty(stream: TextIO, saved: list[Any]) -> None:
    if sys.platform == "win32":
        return
    # TCSAFLUSH: what was typed meanwhile is dropped rather than run by the shell.
    with suppress(termios.error, OSError, ValueError):
        termios.tcsetattr(stream.fileno(), termios.TCSAFLUSH, saved)


def use_colour(environ: Mapping[str, str]) -> bool:
    """https://no-color.org: NO_COLOR set to anything but "" turns colour off."""
    return not environ.get("NO_COLOR") and environ.get("TERM", "") != "dumb"


# ---------------------------------------------------------------- the loop


@dataclass(slots=True)
class Watch:
    """The main thread's loop: refresh on time, hand events over, mind the connection."""

    admin: Admin
    view: View
    feed: EventFeed
    prefix: str
    budgets_max: int
    interval_s: float
    reconnect_s: float
    snapshots: int = 0
    events: int = 0
    budgets_seen: int = 0
    outage_since_s: float | None = field(default=None, init=False)
    """When refreshes began to fail (monotonic), None while budgetd answers."""
    stream: StreamState = field(default="pending", init=False)
    """The feed's call: sent but unconfirmed, live, or lost."""
    lost_before: bool = field(default=False, init=False)
    """A call was lost before: confirming the next one is worth a "resubscribed"."""

    def run(self, until_s: float) -> None:
        next_refresh_s = time.monotonic()
        while True:
            now_s = time.monotonic()
            if now_s >= until_s:
                return
            if now_s >= next_refresh_s:
                next_refresh_s = now_s + self._refresh(now_s)
            dropped = self.feed.take_dropped()
            if dropped:
                self.view.status(
                    "events_dropped", f"{dropped} events dropped: they came faster than shown"
                )
            wake_s = min(next_refresh_s, until_s)
            draw_s = self.view.tick(time.monotonic())
            if draw_s is not None:
                wake_s = min(wake_s, draw_s)
            item = self.feed.get(wake_s - time.monotonic())
            for _ in range(DRAIN_MAX):
                if item is None:
                    break
                if self._handle(item):
                    next_refresh_s = time.monotonic()  # is budgetd still there?
                item = self.feed.get(0)

    def _refresh(self, now_s: float) -> float:
        """Take a snapshot; the seconds until the next."""
        try:
            snapshot = take_snapshot(self.admin, self.prefix, self.budgets_max)
        except Unreachable as error:
            if not self.snapshots:
                raise  # never reached: a wrong --server, as for any other command
            if self.outage_since_s is None:
                self.outage_since_s = now_s
                self.view.status(
                    "unreachable",
                    f"budgetd at {self.admin.server} does not answer; retrying for "
                    f"{self.reconnect_s:g} s",
                )
            if now_s - self.outage_since_s >= self.reconnect_s:
                waited = f" (retried for {self.reconnect_s:g} s)" if self.reconnect_s else ""
                raise Unreachable(f"lost budgetd{waited}: {error}") from None
            return min(self.interval_s, RETRY_S)
        if self.outage_since_s is not None:
            self.outage_since_s = None
            self.view.status(
                "reachable",
                f"budgetd at {self.admin.server} answers again; subscribing to events again",
            )
            self.feed.resubscribe()
            self.stream, self.lost_before = "lost", True  # confirmed once Subscribed
        self._confirm_stream()
        self.snapshots += 1
        self.budgets_seen = len(snapshot.budgets)
        self.view.snapshot(snapshot)
        return self.interval_s

    def _handle(self, item: FeedItem) -> bool:
        """Pass an item on; True when the stream broke and a refresh should check budgetd."""
        if isinstance(item, pb.BudgetEvent):
            self._confirm_stream()
            self.events += 1
            self.view.event(item)
            return False
        if isinstance(item, Subscribed):
            self.stream = "pending"
            return False
        if item.fatal and item.error is not None:
            raise item.error
        if self.stream != "lost":
            why = str(item.error) if item.error else "budgetd ended it"
            self.view.status("stream_lost", f"event stream lost ({why}); subscribing again")
        self.stream = "lost"
        self.lost_before = True
        return True

    def _confirm_stream(self) -> None:
        # budgetd sends nothing on subscribing, so a call that has not failed by the time
        # another call succeeds is taken as live.
        if self.stream == "pending":
            self.stream = "live"
            if self.lost_before:
                self.view.status(
                    "resubscribed", "subscribed to events again; those in the gap are missing"
                )


def watch(admin: Admin, args: argparse.Namespace) -> Result:
    """The view or the JSON lines until --duration, Ctrl-C, or budgetd gone for good."""
    on_terminal = not args.json and sys.stdout.isatty()
    prefix = str(args.prefix)
    interval_s = float(args.interval)
    duration_s = float(args.duration) if args.duration else math.inf
    view: TerminalView | JsonLinesView
    if on_terminal:
        where = f"ids starting {prefix!r}" if prefix else "all budgets"
        title = f"budgetctl watch  {admin.server}  {where}  every {interval_s:g} s"
        view = TerminalView(sys.stdout, title, colour=use_colour(os.environ))
    else:
        view = JsonLinesView(sys.stdout)
    started_s = time.monotonic()
    reason = "duration"
    loop: Watch | None = None
    try:
        with view, EventFeed(admin, prefix) as feed:
            loop = Watch(
                admin, view, feed, prefix, int(args.limit), interval_s, float(args.reconnect)
            )
            loop.run(started_s + duration_s)
    except KeyboardInterrupt:
        reason = "interrupted"
    except ReaderGone:
        reason = "reader_gone"
    snapshots = loop.snapshots if loop else 0
    events = loop.events if loop else 0
    end = {
        "type": "end",
        "at_us": now_us(),
        "reason": reason,
        "snapshots": snapshots,
        "events": events,
    }
    if on_terminal:
        seen = loop.budgets_seen if loop else 0
        elapsed_s = time.monotonic() - started_s
        text = (
            f"watched {seen} budget{'s' if seen != 1 else ''} for {elapsed_s:.0f} s: "
            f"{events} event{'s' if events != 1 else ''}, {snapshots} refreshes"
        )
        return Result(end, text)
    # The stream went out as JSON lines; the closing record must be one more line, which
    # main prints from `text` unless --json asks for the indented document.
    args.json = False
    return Result(end, json.dumps(end, separators=(",", ":")))


# ---------------------------------------------------------------- command line


def interval_arg(text: str) -> float:
    value = cli.seconds_arg(text)
    if value < INTERVAL_MIN_S:
        raise argparse.ArgumentTypeError(f"{text!r}: refresh at most every {INTERVAL_MIN_S:g} s")
    return value


def reconnect_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= RECONNECT_MAX_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds between 0 and {RECONNECT_MAX_S:g}"
        )
    return value


def budgets_arg(text: str) -> int:
    value = cli.count_arg(text)
    if value > BUDGETS_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: watch at most {BUDGETS_MAX} budgets")
    return value


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`budgetctl watch`, registered by parser.build_parser."""
    sub = cli._command(
        top,
        "watch",
        watch,
        summary="watch budgets and their events live",
        description="Watch budgets live: on a terminal, a screen redrawn in place with a "
        f"row per budget (a bar of spent {SPENT_CELL}, reserved {RESERVED_CELL} and free "
        f"{FREE_CELL}, yellow from {WARN_PCT}% and red from {ALARM_PCT}% of the limit; "
        "spent, reserved, limit, open reservations, frozen) and the last events "
        "(reservations, commits, aborts, alerts, freezes, limit changes). Ctrl-C quits. "
        "When stdout is not a terminal, or with --json, one JSON object per line: a "
        "snapshot every interval and each event as it comes (shapes in "
        "budget_server/ctl/watch_cmd.py). NO_COLOR turns colour off. Exit 3 when budgetd "
        "is gone for longer than --reconnect.",
        examples="""\
  budgetctl watch --prefix org:acme/
  budgetctl watch --interval 5 --limit 500
  budgetctl watch --json --duration 60 | jq -c 'select(.type == "event") | .event'
""",
    )
    sub.add_argument("--prefix", default="", help="only budgets whose id starts with this")
    sub.add_argument(
        "--interval",
        metavar="SECONDS",
        type=interval_arg,
        default=INTERVAL_DEFAULT_S,
        help=f"refresh the figures this often (default {INTERVAL_DEFAULT_S:g})",
    )
    sub.add_argument(
        "--duration",
        metavar="SECONDS",
        type=cli.seconds_arg,
        help="stop after this long, exit 0 (default: until Ctrl-C)",
    )
    sub.add_argument(
        "--reconnect",
        metavar="SECONDS",
        type=reconnect_arg,
        default=RECONNECT_DEFAULT_S,
        help="when budgetd stops answering, keep trying this long before exit 3 "
        f"(default {RECONNECT_DEFAULT_S:g}; 0: give up at once)",
    )
    sub.add_argument(
        "--limit",
        metavar="N",
        type=budgets_arg,
        default=BUDGETS_DEFAULT,
        help=f"watch at most N budgets, in id order (default {BUDGETS_DEFAULT}, "
        f"at most {BUDGETS_MAX}); open reservations are counted for the first "
        f"{OPEN_COUNTED_MAX}",
    )
