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
    db_pool_size: int = 20
    """PostgreSQL connections per process, all kept open (no overflow)."""
    insecure: bool = False
    """Serve without API keys; refused on any address but loopback."""
    admin_key_file: str = "budgetd-admin.key"
    """Where the first admin key is written (mode 0600) when the database has no keys."""
    tls_cert_file: str = ""
    """PEM certificate chain; with tls_key_file, gRPC is served over TLS."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: str = ""
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    metrics_listen: str = ""
    """host:port for Prometheus metrics over HTTP (/metrics); empty = not served."""
    log_format: str = "text"
    """text or json."""
    log_level: str = "info"
    """debug, info, warning or error."""
    grant_policy: GrantPolicy = field(default_factory=GrantPolicy)
    """How meter grants grow and how long broken streams wait for a resume."""
    webhook_poll_interval_s: float = 1.0
    """How often the webhook outbox is checked for due deliveries (new events wake it)."""
    webhook_attempts_max: int = 20
    """Attempts per event and webhook before giving up; back-off 1 s doubling to 5 min
    makes 20 attempts about an hour."""
    webhook_timeout_s: float = 5.0
    """Per webhook attempt: connect, send, read the answer's status."""
    report_entries_max: int = 1_000_000
    """Ledger entries one UsageReport may scan; a larger range is refused (narrow it)."""
