"""Server configuration: one frozen dataclass, filled from flags and BUDGETD_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from budget_server.meter.policy import GrantPolicy


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How one budgetd process runs."""

    listen: str = "127.0.0.1:50051"
    """host:port for gRPC; port 0 picks a free one (tests)."""
    db_url: str = "sqlite+aiosqlite:///./budgetd.db"
    """sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DB."""
    sweep_interval_s: float = 1.0
    """How often expired reservations are looked for."""
    shutdown_grace_s: float = 10.0
    """How long in-flight calls may take to finish on SIGTERM."""
    db_pool_size: int = 10
    """PostgreSQL connections per process."""
    metrics_listen: str = ""
    """host:port for Prometheus metrics over HTTP (/metrics); empty = not served."""
    log_format: str = "text"
    """text or json."""
    log_level: str = "info"
    """debug, info, warning or error."""
    grant_policy: GrantPolicy = field(default_factory=GrantPolicy)
    """How meter grants grow and how long broken streams wait for a resume."""
