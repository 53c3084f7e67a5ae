"""Calendar windows of periodic budgets, in the budget's IANA time zone.

A DAY window starts at local midnight, a WEEK window at Monday's local midnight, a MONTH
window at local midnight on the 1st. Boundaries are computed in local time and converted
to UTC, so a month in Europe/Paris ends at 22:00 or 23:00 UTC depending on DST.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from budget_server.errors import InvalidArgument

PERIODS = ("NONE", "DAY", "WEEK", "MONTH")


def zone(name: str) -> ZoneInfo:
    """The ZoneInfo for an IANA name, or INVALID_ARGUMENT naming the bad zone."""
    try:
        return ZoneInfo(name)
    # OSError: a name that is a directory of the zone database ("America") or too long
    # for a file name reaches the file system before zoneinfo can refuse it.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise InvalidArgument(f"unknown time zone {name!r} (expected an IANA name)") from exc


def _to_us(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def window_bounds(period: str, time_zone: str, now_us: int) -> tuple[int, int]:
    """(start_us, end_us) of the window holding now_us; (0, 0) for PERIOD NONE."""
    if period == "NONE":
        return (0, 0)
    tz = zone(time_zone)
    local = datetime.fromtimestamp(now_us / 1_000_000, UTC).astimezone(tz)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period == "DAY":
        start, end = midnight, midnight + timedelta(days=1)
    elif period == "WEEK":
        start = midnight - timedelta(days=midnight.weekday())
        end = start + timedelta(days=7)
    elif period == "MONTH":
        start = midnight.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise InvalidArgument(f"unknown period {period!r}; expected one of {PERIODS}")
    return (_to_us(start.replace(tzinfo=tz)), _to_us(end.replace(tzinfo=tz)))
