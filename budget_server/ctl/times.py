"""Times between people (ISO 8601, UTC) and budgetd (microseconds since the Unix epoch).

Arithmetic goes through `timedelta`, which holds whole microseconds, never through a
float timestamp, so a time typed to the microsecond comes back to the microsecond.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)


def parse_time(text: str) -> int:
    """`2026-12-01`, `2026-12-01T09:30:00Z` or with an offset; no offset means UTC.

    budgetd reads 0 as "no bound", so times at or before the epoch are refused rather
    than silently widening the query.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time; use e.g. 2026-12-01 or 2026-12-01T09:30:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    us = (moment - EPOCH) // _ONE_US
    if us <= 0:
        raise ValueError(f"{text!r} is not after 1970-01-01T00:00:00Z")
    return us


def format_time(us: int) -> str:
    """`2026-12-01T09:30:00Z`, to the second (tables); `-` for budgetd's "not set" 0."""
    if us == 0:
        return "-"
    moment = EPOCH + timedelta(microseconds=us)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")
