"""What an app instance tells the demo: one JSON object per line on the app's stdout.

Both ends share this module, so a field renamed on one side cannot silently read as zero
on the other. The demo answers on the app's stdin with `go` (start streaming) and `stop`
(close the open stream, commit it, and exit); stdin closing counts as `stop`, so an app
never outlives a demo that died.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal, cast, get_args

ReportKind = Literal[
    "ready",  # connected and warmed up; waits for `go`
    "start",  # a request was granted and sent; its stream is being read
    "progress",  # tokens counted so far on the current stream
    "done",  # the stream ended normally and was committed
    "aborted",  # budgetd cut the stream off (BudgetExceeded mid-stream)
    "closed",  # the demo said `stop` while the stream was open
    "refused",  # a new request was refused up front: nothing was sent
    "exit",  # the app stops; `message` says why ("budget" or "stop")
    "error",  # anything else went wrong; `message` says what
]
REPORT_KINDS: tuple[str, ...] = get_args(ReportKind)
LINE_CHARS_MAX = 16_384
"""Longer lines are not reports (a traceback, say) and are ignored."""


@dataclass(frozen=True, slots=True)
class Report:
    """One step of one app instance."""

    kind: ReportKind
    stream: int = 0
    """The stream's number within its app, from 1."""
    output_tokens: int = 0
    """Output tokens counted (or, once settled, committed) for the stream."""
    input_tokens: int = 0
    """Prompt tokens committed for the stream."""
    grant_tokens: int = 0
    """Output tokens budgetd has granted the stream so far."""
    charged_tokens: int = 0
    """What the ledger charged for the stream (input + output)."""
    overage_tokens: int = 0
    """Part of the charge beyond the grant: tokens that arrived before the abort took hold."""
    available_tokens: int = 0
    """What the budget had left when a request was refused."""
    waiting: bool = False
    """On `refused`: other streams still hold reservations, so the app waits and retries."""
    reservation_id: str = ""
    request_id: str = ""
    """The provider's chatcmpl-... id, to match the fake server's record of the stream."""
    message: str = ""

    def to_line(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if v or k == "kind"}
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_line(cls, line: str) -> Report | None:
        """The report on `line`, or None when the line is not one."""
        if len(line) > LINE_CHARS_MAX:
            return None
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("kind") not in REPORT_KINDS:
            return None

        def number(key: str) -> int:
            value = data.get(key, 0)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        def text(key: str) -> str:
            value = data.get(key, "")
            return value if isinstance(value, str) else ""

        return cls(
            kind=cast(ReportKind, data["kind"]),
            stream=number("stream"),
            output_tokens=number("output_tokens"),
            input_tokens=number("input_tokens"),
            grant_tokens=number("grant_tokens"),
            charged_tokens=number("charged_tokens"),
            overage_tokens=number("overage_tokens"),
            available_tokens=number("available_tokens"),
            waiting=data.get("waiting") is True,
            reservation_id=text("reservation_id"),
            request_id=text("request_id"),
            message=text("message"),
        )
