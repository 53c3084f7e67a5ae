"""Client configuration: a frozen dataclass, defaults from BUDGETD_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

FailPolicy = Literal["open", "closed"]


def _default_spool_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("BUDGETD_SPOOL_DIR", str(Path(base) / "budgetd" / "spool")))


def _default_addresses() -> tuple[str, ...]:
    return tuple(os.environ.get("BUDGETD_ADDRESS", "127.0.0.1:50051").split(","))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a BudgetClient reaches budgetd and what it does when it cannot."""

    addresses: tuple[str, ...] = field(default_factory=_default_addresses)
    """host:port of each budgetd replica; calls are balanced round-robin across them and
    move to the others when one fails (env BUDGETD_ADDRESS, comma-separated)."""
    fail_policy: FailPolicy = "open"
    """open: run the LLM call anyway and spool its usage; closed: raise BudgetUnavailable."""
    spool_dir: Path = field(default_factory=_default_spool_dir)
    """Where usage recorded during an outage waits to be replayed (env BUDGETD_SPOOL_DIR)."""
    timeout_s: float = 5.0
    """Deadline of each unary call."""
    connect_timeout_s: float = 2.0
    """How long opening a meter stream may wait for budgetd before the fail policy applies."""
    reconnect_backoff_s: tuple[float, float] = (0.05, 2.0)
    """First and largest pause between attempts to resume a broken meter stream."""
    finish_timeout_s: float = 10.0
    """How long finishing a stream keeps trying to reach budgetd before spooling its usage."""
    usage_report_interval_s: float = 0.25
    """How often a meter sends its count while it is below budgetd's report mark, where
    budgetd only keeps it (from the mark on, every change goes at once). What a crash of
    the app loses from the charge is at most this much of the response."""
    drain_grpc_wakeups: bool = True
    """Work around grpc.aio holding back completions from a busy event loop for seconds
    (budget_client/_grpc_wakeup.py). It reaches into grpc's internals, checked first; this
    turns it off."""
    replay_interval_s: float = 2.0
    """How often spooled usage is retried while budgetd is away."""
    api_key: str | None = field(default_factory=lambda: os.environ.get("BUDGETD_API_KEY"))
    """Sent as `authorization: Bearer ...` (env BUDGETD_API_KEY)."""
    tls: bool = field(default_factory=lambda: os.environ.get("BUDGETD_TLS", "") in ("1", "true"))
    """Connect over TLS (env BUDGETD_TLS=1); implied by tls_ca_file."""
    tls_ca_file: str = field(default_factory=lambda: os.environ.get("BUDGETD_TLS_CA", ""))
    """PEM bundle to trust for budgetd's certificate; empty = the system's CAs."""
    tls_cert_file: str = ""
    """PEM client certificate, for servers that require mutual TLS."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""

    def __post_init__(self) -> None:
        """Reject a setting that would only fail later, far from where it was made: a
        negative interval spins a timer, a string spool directory breaks the first outage."""
        if not isinstance(self.spool_dir, Path):
            object.__setattr__(self, "spool_dir", Path(self.spool_dir))
        if isinstance(self.addresses, str):
            object.__setattr__(self, "addresses", (self.addresses,))
        if not self.addresses or not all(isinstance(a, str) and a for a in self.addresses):
            raise ValueError(f"addresses must name at least one host:port, got {self.addresses!r}")
        if self.fail_policy not in get_args(FailPolicy):
            raise ValueError(f"fail_policy must be 'open' or 'closed', got {self.fail_policy!r}")
        for name in (
            "timeout_s",
            "connect_timeout_s",
            "finish_timeout_s",
            "usage_report_interval_s",
            "replay_interval_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds above 0, got {value!r}")
        first, largest = self.reconnect_backoff_s
        if not 0 < first <= largest:
            raise ValueError(
                "reconnect_backoff_s must be (first, largest) with 0 < first <= largest, "
                f"got {self.reconnect_backoff_s!r}"
            )

    @property
    def target(self) -> str:
        """A gRPC target naming every replica (the ipv4: resolver takes a list)."""
        if len(self.addresses) == 1:
            return self.addresses[0]
        return "ipv4:" + ",".join(self.addresses)
