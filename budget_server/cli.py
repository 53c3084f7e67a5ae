"""`budgetd serve`: flags, BUDGETD_* environment variables, start-up output, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from budget_server import __version__
from budget_server.app import BudgetServer
from budget_server.config import ServerConfig
from budget_server.errors import LedgerError
from budget_server.gc_tuning import tune_for_serving
from budget_server.logs import configure_logging

log = logging.getLogger("budgetd")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"BUDGETD_{name}", default)


Number = TypeVar("Number", int, float)


def _number(text: str, convert: type[Number], lowest: Number, inclusive: bool) -> Number:
    """argparse's type for a bounded number; a bad flag or BUDGETD_* value is a usage
    error naming it (argparse converts string defaults through `type` as well)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= lowest if inclusive else value > lowest):  # also refuses NaN
        bound = f"at least {lowest:g}" if inclusive else f"above {lowest:g}"
        raise argparse.ArgumentTypeError(f"{text!r}: must be {bound}")
    return value


def _seconds_above_zero(text: str) -> float:
    return _number(text, float, 0.0, inclusive=False)


def _seconds_at_least_zero(text: str) -> float:
    return _number(text, float, 0.0, inclusive=True)


def _count_at_least_one(text: str) -> int:
    return _number(text, int, 1, inclusive=True)


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="budgetd", description="Real-time token budgets for LLM APIs."
    )
    parser.add_argument("--version", action="version", version=f"budgetd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the budget ledger service")
    serve.add_argument(
        "--listen",
        default=_env("LISTEN", defaults.listen),
        help="host:port to serve gRPC on (env BUDGETD_LISTEN; default %(default)s)",
    )
    serve.add_argument(
        "--db",
        default=_env("DB", defaults.db_url),
        help="database URL: sqlite+aiosqlite:///PATH or postgresql+asyncpg://... "
        "(env BUDGETD_DB; default %(default)s)",
    )
    serve.add_argument(
        "--sweep-interval",
        type=_seconds_above_zero,
        default=_env("SWEEP_INTERVAL", str(defaults.sweep_interval_s)),
        help="seconds between expiry sweeps (env BUDGETD_SWEEP_INTERVAL; default %(default)s)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=_seconds_at_least_zero,
        default=_env("SHUTDOWN_GRACE", str(defaults.shutdown_grace_s)),
        help="seconds in-flight calls get on SIGTERM (default %(default)s)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=_env("INSECURE", "") in ("1", "true", "yes"),
        help="serve without API keys (only on a loopback address; env BUDGETD_INSECURE=1)",
    )
    serve.add_argument(
        "--admin-key-file",
        default=_env("ADMIN_KEY_FILE", defaults.admin_key_file),
        help="where the first admin API key is written, mode 0600, when the database has "
        "no keys yet (env BUDGETD_ADMIN_KEY_FILE; default %(default)s)",
    )
    serve.add_argument("--tls-cert", default=_env("TLS_CERT", ""), help="PEM certificate chain")
    serve.add_argument("--tls-key", default=_env("TLS_KEY", ""), help="PEM private key")
    serve.add_argument(
        "--tls-client-ca",
        default=_env("TLS_CLIENT_CA", ""),
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    serve.add_argument(
        "--metrics-listen",
        default=_env("METRICS_LISTEN", defaults.metrics_listen),
        help="host:port to serve Prometheus metrics on, e.g. 127.0.0.1:9464 "
        "(env BUDGETD_METRICS_LISTEN; default: off)",
    )
    serve.add_argument(
        "--webhook-poll-interval",
        type=_seconds_above_zero,
        default=_env("WEBHOOK_POLL_INTERVAL", str(defaults.webhook_poll_interval_s)),
        help="seconds between looks at the webhook outbox; new events are sent at once "
        "(env BUDGETD_WEBHOOK_POLL_INTERVAL; default %(default)s)",
    )
    serve.add_argument(
        "--webhook-attempts",
        type=_count_at_least_one,
        default=_env("WEBHOOK_ATTEMPTS", str(defaults.webhook_attempts_max)),
        help="attempts per webhook event before giving up; back-off doubles from 1 s to "
        "5 min (env BUDGETD_WEBHOOK_ATTEMPTS; default %(default)s, about an hour)",
    )
    serve.add_argument(
        "--webhook-timeout",
        type=_seconds_above_zero,
        default=_env("WEBHOOK_TIMEOUT", str(defaults.webhook_timeout_s)),
        help="seconds per webhook attempt (env BUDGETD_WEBHOOK_TIMEOUT; default %(default)s)",
    )
    serve.add_argument(
        "--report-entries-max",
        type=_count_at_least_one,
        default=_env("REPORT_ENTRIES_MAX", str(defaults.report_entries_max)),
        help="ledger entries one usage report may read; larger ranges are refused "
        "(env BUDGETD_REPORT_ENTRIES_MAX; default %(default)s)",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("LOG_FORMAT", defaults.log_format),
        help="log line format (env BUDGETD_LOG_FORMAT; default %(default)s)",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=_env("LOG_LEVEL", defaults.log_level),
        help="(env BUDGETD_LOG_LEVEL; default %(default)s)",
    )
    return parser


async def serve(config: ServerConfig) -> int:
    server = BudgetServer(config)
    await server.start()
    tune_for_serving()
    lines = [
        f"budgetd {__version__} listening on {server.address}",
        f"  database  {server.db.url_for_display if server.db else '?'}",
        "  health    grpc.health.v1 and server reflection enabled",
        "  tls       " + ("on" if config.tls_cert_file else "off (plaintext gRPC)"),
    ]
    if config.insecure:
        lines.append("  auth      OFF (--insecure): anyone who can connect may charge any budget")
    elif server.admin_key_path is not None:
        lines.append(f"  auth      API keys; the first admin key is in {server.admin_key_path}")
    else:
        lines.append("  auth      API keys required (authorization: Bearer ...)")
    if server.metrics_port:
        host = config.metrics_listen.rpartition(":")[0] or "127.0.0.1"
        lines.append(f"  metrics   http://{host}:{server.metrics_port}/metrics")
    lines.append("  stop with Ctrl-C (a second Ctrl-C forces exit)")
    print(
        "\n".join(lines),
        flush=True,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: finishing in-flight calls, then stopping", signal.Signals(signum).name)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stopping.wait()
    await server.stop()
    print("budgetd stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = ServerConfig(
        listen=args.listen,
        db_url=args.db,
        sweep_interval_s=args.sweep_interval,
        shutdown_grace_s=args.shutdown_grace,
        metrics_listen=args.metrics_listen,
        webhook_poll_interval_s=args.webhook_poll_interval,
        webhook_attempts_max=args.webhook_attempts,
        webhook_timeout_s=args.webhook_timeout,
        report_entries_max=args.report_entries_max,
        insecure=args.insecure,
        admin_key_file=args.admin_key_file,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        log_format=args.log_format,
        log_level=args.log_level,
    )
    configure_logging(config.log_format, config.log_level)
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(serve(config))
        return uvloop.run(serve(config))
    except (LedgerError, ValueError) as error:  # a setting budgetd cannot run with
        print(f"budgetd: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"budgetd: {error}", file=sys.stderr)
        return 1
    except DBAPIError as error:  # the database cannot be opened or reached at start
        where = make_url(config.db_url).render_as_string(hide_password=True)
        print(f"budgetd: cannot use the database {where}: {error.orig}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
