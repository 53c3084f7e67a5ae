"""A budgetd process: the ledger behind a grpc.aio server, started and stopped in order.

Shutdown order (grpclib's graceful_exit, grpc's aio server): health says NOT_SERVING so
load balancers stop sending, the server stops taking calls and gives in-flight ones
`shutdown_grace_s`, the actors drain what is queued, background tasks stop, and the
database closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from grpc import aio
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio names
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_service import AdminService
from budget_server.api.budget_service import BudgetService
from budget_server.api.handlers import add_servicer
from budget_server.api.meter_stream import MeterStreams
from budget_server.auth.guard import Guard
from budget_server.auth.store import KeyStore
from budget_server.auth.transport import require_loopback, server_credentials
from budget_server.clock import Clock, SystemClock
from budget_server.config import ServerConfig
from budget_server.db.engine import Database, open_database
from budget_server.db.migrate import upgrade_to_head
from budget_server.db.startup_lock import startup_lock
from budget_server.events.bus import EventBus
from budget_server.events.pg_listener import listen_forever
from budget_server.ledger.ledger import Ledger
from budget_server.ledger.sweeper import run_sweeper
from budget_server.limits import PING_INTERVAL_WITHOUT_DATA_MIN_MS, STREAMS_PER_CONNECTION_MAX
from budget_server.meter.registry import SessionRegistry
from budget_server.metrics import Metrics
from budget_server.pricing.store import seed_prices
from budget_server.webhooks import DeliveryPolicy, DeliveryWorker, WebhookDirectory, outbox_writer

log = logging.getLogger("budgetd")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["BudgetService"].full_name,
    pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
)
# ImportPrices takes a whole LiteLLM price file (about 3.5 MB; refused above 8 MiB with a
# clear status), so a request may be larger than gRPC's 4 MiB default.
MESSAGE_BYTES_MAX = 16 * 1024 * 1024


class BudgetServer:
    """One budgetd process; `async with BudgetServer(config) as server:` in tests."""

    def __init__(self, config: ServerConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.port = 0
        self.db: Database | None = None
        self.ledger: Ledger | None = None
        self._server: aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        policy = config.grant_policy
        self.sessions = SessionRegistry(policy.streams_max, policy.streams_per_key_max)
        self.events = EventBus()
        self.metrics = Metrics()
        self.metrics.track_open_streams(lambda: self.sessions.open_streams)
        self.metrics_port = 0
        self.admin_key_path: Path | None = None
        self.meter: MeterStreams | None = None
        self.webhooks: WebhookDirectory | None = None
        self.webhook_worker: DeliveryWorker | None = None
        self._metrics_server: Any = None
        self.events.add_listener(self.sessions.on_event)

    async def start(self) -> None:
        """Open the database, migrate, and serve; on any failure, undo what was started."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _start(self) -> None:
        if self.config.insecure:
            require_loopback(self.config.listen)
        self.db = open_database(self.config.db_url, pool_size=self.config.db_pool_size)
        async with startup_lock(self.db):  # replicas started together take turns here
            await upgrade_to_head(self.db)
            await seed_prices(self.db, self.clock.now_us())
            self.ledger = Ledger(self.db, self.clock, self.events, self.metrics)
            # Read before serving, so events from the first call already reach the webhooks.
            self.webhooks = WebhookDirectory(self.db)
            await self.webhooks.refresh()
            self.ledger.publisher.outbox = outbox_writer(self.webhooks)
            self.keys = KeyStore(self.db, self.clock, self.ledger.publisher)
        guard = Guard(None if self.config.insecure else self.keys, self.ledger)
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION_MAX),
                ("grpc.so_reuseport", 0),
                # Accept the clients' keepalive pings, also between calls (limits.py).
                ("grpc.keepalive_permit_without_calls", 1),
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    PING_INTERVAL_WITHOUT_DATA_MIN_MS,
                ),
            ]
        )
        self._server = server  # from here on, stop() must stop it
        services = pb.DESCRIPTOR.services_by_name
        meter = self.meter = MeterStreams(self.ledger, self.config.grant_policy, self.sessions)
        add_servicer(
            server, BudgetService(self.ledger, meter), services["BudgetService"], guard.wrap
        )
        admin = AdminService(
            self.ledger, self.events, self.keys, self.webhooks, self.config.report_entries_max
        )
        add_servicer(server, admin, services["AdminService"], guard.wrap)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        credentials = server_credentials(self.config)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(self.config.listen)
            else:
                self.port = server.add_secure_port(self.config.listen, credentials)
        except RuntimeError:  # grpc's "Failed to bind", with nothing more specific
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"cannot listen on {self.config.listen}: the port is in use (another budgetd?) "
                "or the address is not HOST:PORT of this machine"
            )
        if not self.config.insecure:  # after binding: a start that cannot serve makes no key
            async with startup_lock(self.db):
                self.admin_key_path = await self.keys.bootstrap_admin_key(
                    Path(self.config.admin_key_file)
                )
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(
            asyncio.create_task(
                run_sweeper(self.ledger, self.clock, self.config.sweep_interval_s), name="sweeper"
            )
        )
        self.webhook_worker = DeliveryWorker(
            self.db,
            self.clock,
            self.webhooks,
            policy=DeliveryPolicy(
                attempts_max=self.config.webhook_attempts_max,
                timeout_s=self.config.webhook_timeout_s,
            ),
            poll_interval_s=self.config.webhook_poll_interval_s,
            bus=self.events,
        )
        self._tasks.append(asyncio.create_task(self.webhook_worker.run(), name="webhooks"))
        self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhook-directory"))
        if self.config.metrics_listen:
            self._metrics_server, self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        if not self.db.is_sqlite:
            origin = self.ledger.publisher.origin
            self._tasks.append(
                asyncio.create_task(
                    listen_forever(self.config.db_url, self.events, origin), name="pg-events"
                )
            )

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop in order; safe to call twice."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            self.events.end_subscriptions()
            await self._server.stop(grace)
            self._server = None
        if self.meter is not None:
            await self.meter.closed()
        if self.ledger is not None:
            await self.ledger.drain()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def __aenter__(self) -> BudgetServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop(grace_s=1.0)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
