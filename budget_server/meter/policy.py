"""How meter grants grow, and how long a stream's reservation outlives its connection."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GrantPolicy:
    """Tuning of meter streams; the defaults suit chat completions of up to tens of thousands
    of tokens at provider speeds (tens to hundreds of tokens per second)."""

    initial_output_tokens: int = 256
    """Output tokens granted at open (or max_output_tokens when smaller)."""
    step_min_output_tokens: int = 64
    """An extension grants at least this much beyond current usage."""
    growth: int = 2
    """Each extension asks for this multiple of the current grant (geometric growth)."""
    refill_at_pct: int = 75
    """Extend in the background once usage reaches this share of the grant, so a stream
    with budget to spare never waits on SQL."""
    ttl_ms: int = 60_000
    """Expiry of a live stream's reservation; refreshed while the stream lives."""
    heartbeat_ms: int = 5_000
    """How often a live stream persists its usage and pushes its expiry."""
    usage_messages_per_s_max: int = 2_000
    """Usage messages one stream may send per second (with a burst of twice that); a
    provider streams at most a few hundred chunks a second, so more is a broken client."""
    streams_max: int = 20_000
    """Meter streams open in one process at once."""
    streams_per_key_max: int = 2_000
    """Meter streams open at once with one API key (in one process)."""
    resume_window_ms: int = 10_000
    """How long a broken stream's reservation waits for the client to resume it before the
    sweeper charges it at its last usage."""
