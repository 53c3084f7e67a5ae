"""Webhooks end to end: a real HTTP receiver on a loopback port, a real budgetd (SQLite and
PostgreSQL) whose ManualClock decides when retries are due, and budgetctl as a subprocess.

Events are put in the outbox with `enqueue` inside a transaction, as the ledger does; one
test drives real alerts through reserve and commit.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from sqlalchemy import event, select

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    verify_signature,
)
from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.config import ServerConfig
from budget_server.db.engine import open_database
from budget_server.db.migrate import upgrade_to_head
from budget_server.db.schema import webhook_deliveries
from budget_server.events.model import BudgetEvent, new_event_id
from budget_server.webhooks import DeliveryPolicy, WebhookDirectory, create_webhook, enqueue
from tests.support.ledger import create
from tests.support.servers import Stubs, stubs

WAIT_S = 15.0
LATER_US = 10 * 60 * 1_000_000  # past any back-off (capped at 5 min)


# ---------------------------------------------------------------- a receiver


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """An HTTP server in a thread: answers with `statuses` in turn, then 200."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    delay_s: float = 0.0
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            self.received.append(Received(headers, body))
            return self.statuses.pop(0) if self.statuses else 200

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.received)


@contextmanager
def receiving(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if receiver.delay_s:
                threading.Event().wait(receiver.delay_s)
            status = receiver.handle(dict(self.headers.items()), body)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no" if status >= 300 else b"ok")

        def log_message(self, *_args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # two workers' connections at once; 5 would reset some
        daemon_threads = True

    http = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    receiver.url = f"http://127.0.0.1:{http.server_address[1]}/hook"
    try:
        yield receiver
    finally:
        http.shutdown()
        http.server_close()
        thread.join()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving(Receiver()) as running:
        yield running


# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def budgetd(db_url: str, clock: ManualClock, **config: Any) -> AsyncIterator[BudgetServer]:
    """A server that polls its outbox every 20 ms (real time); the clock says what is due."""
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "db_url": db_url,
        "sweep_interval_s": 0.05,
        "insecure": True,
        "webhook_poll_interval_s": 0.02,
        **config,
    }
    async with BudgetServer(ServerConfig(**settings), clock=clock) as server:
        yield server


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def deliveries(server: BudgetServer) -> list[Any]:
    assert server.db is not None
    async with server.db.read() as conn:
        query = select(webhook_deliveries).order_by(webhook_deliveries.c.id)
        return list((await conn.execute(query)).all())


def alert(budget_id: str, at_us: int, threshold_pct: int = 90) -> BudgetEvent:
    return BudgetEvent(
        id=new_event_id(),
        kind="ALERT",
        budget_id=budget_id,
        at_us=at_us,
        threshold_pct=threshold_pct,
        spent=threshold_pct * 10,
        limit=1000,
        message=f"budget {budget_id!r} has spent {threshold_pct}% of its limit",
    )


async def put(server: BudgetServer, *events: BudgetEvent) -> int:
    """Queue events as the ledger does: in a write transaction."""
    assert server.db is not None
    assert server.webhooks is not None
    async with server.db.write() as conn:
        written = await enqueue(conn, events, server.webhooks, server.clock.now_us())
    if server.webhook_worker is not None:
        server.webhook_worker.wake()
    return written


async def add_webhook(api: Stubs, url: str, **fields: Any) -> pb.CreateWebhookResponse:
    return await api.admin.CreateWebhook(pb.CreateWebhookRequest(url=url, **fields))


# ---------------------------------------------------------------- delivery


async def test_a_failing_receiver_gets_the_same_event_until_it_accepts(
    db_url: str, clock: ManualClock, receiver: Receiver
) -> None:
    receiver.statuses = [500, 500]
    async with budgetd(db_url, clock) as server, stubs(server.address) as api:
        created = await add_webhook(api, receiver.url, budget_prefix="wh:")
        sent = alert("wh:team", clock.now_us())
        assert await put(server, sent) == 1

        await eventually(lambda: _attempted(server, 1), "the first attempt")
        [row] = await deliveries(server)
        assert (row.attempts, row.delivered_at_us, row.failed) == (1, 0, False)
        assert row.last_error.startswith("HTTP 500")
        # Backed off by about a second (1 s +-25 %) on the server's clock.
        assert 750_000 <= row.next_attempt_us - clock.now_us() <= 1_250_000
        await asyncio.sleep(0.2)
        assert receiver.count == 1, "a retry went out before it was due"

        clock.advance(us=LATER_US)
        await eventually(lambda: _attempted(server, 2), "the second attempt")
        clock.advance(us=LATER_US)
        await eventually(lambda: _delivered(server, 1), "delivery")

        [row] = await deliveries(server)
        assert row.attempts == 3
        assert row.delivered_at_us == clock.now_us()
        assert (row.failed, row.last_error) == (False, "")
        await asyncio.sleep(0.2)
        assert receiver.count == 3, "a delivered event was sent again"

    bodies = {r.body for r in receiver.received}
    assert bodies == {sent.to_json().encode()}, "the body changed between attempts"
    for request in receiver.received:
        assert request.headers[EVENT_ID_HEADER] == sent.id
        assert request.headers["Content-Type"] == "application/json"
        assert int(request.headers[TIMESTAMP_HEADER]) > 0
        assert verify_signature(created.secret, request.body, request.headers[SIGNATURE_HEADER])
        assert not verify_signature("x" * 43, request.body, request.headers[SIGNATURE_HEADER])
    payload = receiver.received[0].event
    assert payload["id"] == sent.id
    assert payload["kind"] == "ALERT"
    assert payload["budget_id"] == "wh:team"
    assert (payload["threshold_pct"], payload["spent"], payload["limit"]) == (90, 900, 1000)
    assert payload["at_us"] == sent.at_us
    assert payload["message"] == sent.message


async def _received(receiver: Receiver, count: int) -> bool:
    return receiver.count >= count


async def _delivered(server: BudgetServer, count: int) -> bool:
    return sum(1 for row in await deliveries(server) if row.delivered_at_us) >= count


async def test_delivery_resumes_after_a_restart(
    db_url: str, clock: ManualClock, receiver: Receiver
) -> None:
    receiver.statuses = [503]
    sent = alert("wh:restart", clock.now_us())
    async with budgetd(db_url, clock) as first, stubs(first.address) as api:
        created = await add_webhook(api, receiver.url)
        await put(first, sent)
        await eventually(lambda: _received(receiver, 1), "the first attempt")
        await eventually(lambda: _attempted(first, 1), "the failure to be recorded")

    clock.advance(us=LATER_US)
    async with budgetd(db_url, clock) as second:
        await eventually(lambda: _delivered(second, 1), "delivery by the new process")
        [row] = await deliveries(second)
        assert row.attempts == 2

    assert [r.headers[EVENT_ID_HEADER] for r in receiver.received] == [sent.id, sent.id]
    assert all(
        verify_signature(created.secret, r.body, r.headers[SIGNATURE_HEADER])
        for r in receiver.received
    )


async def _attempted(server: BudgetServer, attempts: int) -> bool:
    rows = await deliveries(server)
    return bool(rows) and rows[0].attempts >= attempts


async def test_an_event_queued_before_a_crash_is_sent_by_the_next_process(
    db_url: str, clock: ManualClock, receiver: Receiver
) -> None:
    # A process that committed an event and died before sending it: only the row survives.
    db = open_database(db_url)
    try:
        await upgrade_to_head(db)
        await create_webhook(
            db, url=receiver.url, budget_prefix="", kinds=(), secret="", now_us=clock.now_us()
        )
        directory = WebhookDirectory(db)
        await directory.refresh()
        sent = alert("wh:crash", clock.now_us())
        async with db.write() as conn:
            assert await enqueue(conn, [sent], directory, clock.now_us()) == 1
    finally:
        await db.close()

    async with budgetd(db_url, clock) as server:
        await eventually(lambda: _delivered(server, 1), "delivery by the new process")
    assert [r.headers[EVENT_ID_HEADER] for r in receiver.received] == [sent.id]


async def test_gives_up_after_attempts_max_and_records_why(
    db_url: str, clock: ManualClock, receiver: Receiver
) -> None:
    receiver.statuses = [500] * 10
    async with budgetd(db_url, clock, webhook_attempts_max=3) as server:
        async with stubs(server.address) as api:
            await add_webhook(api, receiver.url)
        await put(server, alert("wh:down", clock.now_us()))
        for attempt in (1, 2, 3):
            await eventually(lambda n=attempt: _received(receiver, n), f"attempt {attempt}")
            await eventually(lambda n=attempt: _attempted(server, n), f"record {attempt}")
            clock.advance(us=LATER_US)
        await asyncio.sleep(0.3)
        [row] = await deliveries(server)
        assert (row.attempts, row.failed, row.delivered_at_us) == (3, True, 0)
        assert row.last_error.startswith("HTTP 500")
        clock.advance(us=LATER_US)
        await asyncio.sleep(0.3)
    assert receiver.count == 3


async def test_unreachable_receiver_is_retried_with_the_connection_error(
    db_url: str, clock: ManualClock
) -> None:
    with receiving(Receiver()) as gone:
        url = gone.url  # nothing listens there any more once the block ends
    async with budgetd(db_url, clock) as server:
        async with stubs(server.address) as api:
            await add_webhook(api, url)
        await put(server, alert("wh:gone", clock.now_us()))
        await eventually(lambda: _attempted(server, 1), "the attempt")
        [row] = await deliveries(server)
        assert (row.failed, row.delivered_at_us) == (False, 0)
        assert row.last_error.startswith("cannot connect")


async def test_two_processes_never_send_one_row_twice(db_url: str, clock: ManualClock) -> None:
    # Slow answers keep rows in flight while the other process looks for due rows.
    with receiving(Receiver(delay_s=0.01)) as receiver:
        async with budgetd(db_url, clock) as first, budgetd(db_url, clock) as second:
            async with stubs(first.address) as api:
                await add_webhook(api, receiver.url)
            await second.webhooks.refresh()  # type: ignore[union-attr]
            events = [alert(f"wh:pair:{n}", clock.now_us()) for n in range(60)]
            await asyncio.gather(put(first, *events[:30]), put(second, *events[30:]))
            await eventually(lambda: _delivered(first, 60), "every delivery")
            rows = await deliveries(first)
    ids = [r.headers[EVENT_ID_HEADER] for r in receiver.received]
    assert sorted(ids) == sorted(e.id for e in events), "an event was sent twice or never"
    assert all(row.attempts == 1 for row in rows)


# ---------------------------------------------------------------- matching and the outbox


async def test_prefix_and_kinds_decide_who_gets_an_event(db_url: str, clock: ManualClock) -> None:
    with (
        receiving(Receiver()) as team,
        receiving(Receiver()) as other,
        receiving(Receiver()) as freezes,
    ):
        async with budgetd(db_url, clock) as server, stubs(server.address) as api:
            team_hook = (await add_webhook(api, team.url, budget_prefix="org:a/")).webhook
            await add_webhook(api, other.url, budget_prefix="org:b/")
            await add_webhook(
                api,
                freezes.url,
                kinds=[pb.BUDGET_EVENT_KIND_FROZEN, pb.BUDGET_EVENT_KIND_LIMIT_CHANGED],
            )
            assert list(team_hook.kinds) == [pb.BUDGET_EVENT_KIND_ALERT]  # the default

            now_us = clock.now_us()
            alerted = alert("org:a/team:x", now_us)
            frozen = BudgetEvent(new_event_id(), "FROZEN", "org:a/team:x", now_us)
            unwatched = BudgetEvent(new_event_id(), "COMMITTED", "org:a/team:x", now_us)
            assert await put(server, alerted, frozen, unwatched) == 2
            await eventually(lambda: _delivered(server, 2), "both deliveries")
            await asyncio.sleep(0.2)

    assert [r.headers[EVENT_ID_HEADER] for r in team.received] == [alerted.id]
    assert [r.headers[EVENT_ID_HEADER] for r in freezes.received] == [frozen.id]
    assert other.received == []


async def test_enqueue_is_idempotent_and_issues_no_sql_when_nothing_matches(
    db_url: str, clock: ManualClock
) -> None:
    async with budgetd(db_url, clock, webhook_poll_interval_s=3600) as server:
        assert server.db is not None
        assert server.webhooks is not None
        statements: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement)

        sent = alert("wh:idem", clock.now_us())
        engine = server.db.engine.sync_engine
        async with server.db.write() as conn:
            event.listen(engine, "before_cursor_execute", count)
            try:
                assert await enqueue(conn, [sent] * 3, server.webhooks, clock.now_us()) == 0
            finally:
                event.remove(engine, "before_cursor_execute", count)
        assert statements == [], "enqueue touched the database with no webhook to match"

        async with stubs(server.address) as api:
            await add_webhook(api, "http://127.0.0.1:9/never")
        async with server.db.write() as conn:
            assert await enqueue(conn, [sent], server.webhooks, clock.now_us()) == 1
            assert await enqueue(conn, [sent], server.webhooks, clock.now_us()) == 0
        async with server.db.write() as conn:
            assert await enqueue(conn, [sent, sent], server.webhooks, clock.now_us()) == 0
        assert len(await deliveries(server)) == 1


async def test_rolled_back_transaction_queues_nothing(db_url: str, clock: ManualClock) -> None:
    async with budgetd(db_url, clock, webhook_poll_interval_s=3600) as server:
        assert server.db is not None
        assert server.webhooks is not None
        async with stubs(server.address) as api:
            await add_webhook(api, "http://127.0.0.1:9/never")
        written = 0

        async def failing_transaction() -> None:
            nonlocal written
            assert server.db is not None
            assert server.webhooks is not None
            async with server.db.write() as conn:
                written = await enqueue(conn, [alert("wh:rb", 1)], server.webhooks, 1)
                raise RuntimeError("the ledger's transaction failed")

        with pytest.raises(RuntimeError):
            await failing_transaction()
        assert written == 1
        assert await deliveries(server) == []


# ---------------------------------------------------------------- the admin API


async def test_secret_is_returned_once_and_never_listed(db_url: str, clock: ManualClock) -> None:
    async with budgetd(db_url, clock) as server, stubs(server.address) as api:
        generated = await add_webhook(api, "https://hooks.example.com/a")
        clock.advance(seconds=1)
        given = await add_webhook(
            api, "http://localhost:8080/b", budget_prefix="org:", secret="s" * 32
        )
        assert len(generated.secret) == 43  # secrets.token_urlsafe(32)
        assert given.secret == "s" * 32
        assert given.webhook.created_at_us == clock.now_us()

        listed = await api.admin.ListWebhooks(pb.ListWebhooksRequest())
        assert list(listed.webhooks) == [generated.webhook, given.webhook]
        wire = listed.SerializeToString()
        assert generated.secret.encode() not in wire
        assert b"s" * 32 not in wire


async def test_delete_stops_deliveries_and_forgets_queued_ones(
    db_url: str, clock: ManualClock
) -> None:
    async with (
        budgetd(db_url, clock, webhook_poll_interval_s=3600) as server,
        stubs(server.address) as api,
    ):
        hook = (await add_webhook(api, "http://127.0.0.1:9/never")).webhook
        assert await put(server, alert("wh:del", clock.now_us())) == 1
        await api.admin.DeleteWebhook(pb.DeleteWebhookRequest(id=hook.id))
        assert await deliveries(server) == []
        assert await put(server, alert("wh:del", clock.now_us())) == 0  # seen at once
        assert list((await api.admin.ListWebhooks(pb.ListWebhooksRequest())).webhooks) == []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.admin.DeleteWebhook(pb.DeleteWebhookRequest(id=hook.id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": ""}, "url is required"),
        ({"url": "ftp://example.com/x"}, "http:// or https://"),
        ({"url": "https:///nohost"}, "has no host"),
        ({"url": "https://user:pw@example.com/"}, "credentials"),
        ({"url": "https://example.com:99999/"}, "not a valid URL"),
        ({"url": "https://exa mple.com/"}, "printable ASCII"),
        ({"url": "https://example.com/", "secret": "short"}, "secret must be"),
        ({"url": "https://example.com/", "budget_prefix": "bad prefix"}, "budget_prefix"),
        ({"url": "https://example.com/", "kinds": [0]}, "unknown value 0"),
        (
            {"url": "https://example.com/", "kinds": [pb.BUDGET_EVENT_KIND_COMMITTED]},
            "not sent to webhooks",
        ),
    ],
)
async def test_create_refuses_what_cannot_work(
    server: BudgetServer, api: Stubs, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.CreateWebhook(pb.CreateWebhookRequest(**fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


def test_signature_round_trip() -> None:
    body = b'{"id":"ev_1","kind":"ALERT"}'
    header = sign("secret-0123456789", body)
    assert header.startswith("sha256=")
    assert len(header) == len("sha256=") + 64
    assert verify_signature("secret-0123456789", body, header)
    assert verify_signature(b"secret-0123456789", body, header + "\r\n")
    assert not verify_signature("secret-0123456789", body + b" ", header)
    assert not verify_signature("another-secret-xx", body, header)
    assert not verify_signature("secret-0123456789", body, header.removeprefix("sha256="))
    assert not verify_signature("secret-0123456789", body, None)
    assert not verify_signature("secret-0123456789", body, "sha256=ünïcode")


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    import random

    policy = DeliveryPolicy()
    rng = random.Random(7)
    for attempts, nominal_s in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (40, 300)]:
        for _ in range(50):
            wait_s = policy.backoff_us(attempts, rng) / 1_000_000
            assert 0.75 * nominal_s <= wait_s <= min(1.25 * nominal_s, 300)
    with pytest.raises(ValueError, match="lease_s"):
        DeliveryPolicy(lease_s=5)


# ---------------------------------------------------------------- real alerts


async def test_alerts_from_real_charges_arrive_once_per_threshold(
    db_url: str, clock: ManualClock, receiver: Receiver
) -> None:
    async with budgetd(db_url, clock) as server, stubs(server.address) as api:
        created = await add_webhook(api, receiver.url, budget_prefix="alert:")
        await api.admin.CreateBudget(
            pb.CreateBudgetRequest(
                id="alert:team",
                unit=pb.UNIT_TOKENS,
                limit=1000,
                alert_thresholds_pct=[50, 70, 90],
            )
        )
        await create(api, "quiet:team", 1000)  # default thresholds, outside the prefix
        for budget_id, amount in [
            ("alert:team", 600),  # 60 %: crosses 50
            ("alert:team", 50),  # 65 %: nothing
            ("alert:team", 150),  # 80 %: crosses 70
            ("alert:team", 150),  # 95 %: crosses 90
            ("alert:team", 10),  # 96 %: nothing more
            ("quiet:team", 900),
        ]:
            held = await api.budget.Reserve(pb.ReserveRequest(budget_id=budget_id, amount=amount))
            await api.budget.Commit(
                pb.CommitRequest(reservation_id=held.reservation.id, amount=amount)
            )
        await eventually(lambda: _received(receiver, 3), "three alerts")
        await asyncio.sleep(0.3)

    # Deliveries run concurrently, so arrival order is not promised (docs/operations.md):
    # each threshold exactly once, with the figures of the charge that crossed it.
    events = sorted((r.event for r in receiver.received), key=lambda e: e["threshold_pct"])
    assert [(e["kind"], e["budget_id"], e["threshold_pct"]) for e in events] == [
        ("ALERT", "alert:team", 50),
        ("ALERT", "alert:team", 70),
        ("ALERT", "alert:team", 90),
    ]
    assert [(e["spent"], e["limit"]) for e in events] == [(600, 1000), (800, 1000), (950, 1000)]
    assert len({e["id"] for e in events}) == 3
    for request in receiver.received:
        assert request.headers[EVENT_ID_HEADER] == request.event["id"]
        assert verify_signature(created.secret, request.body, request.headers[SIGNATURE_HEADER])


# ---------------------------------------------------------------- budgetctl


async def budgetctl(server: BudgetServer, *args: str) -> Any:
    """`budgetctl --json ARGS` as a child process (never blocking the server's loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETD_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "budget_server.ctl.main",
        "--server",
        server.address,
        "--json",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout)


async def test_budgetctl_creates_lists_and_deletes_webhooks(
    db_url: str, clock: ManualClock
) -> None:
    async with budgetd(db_url, clock) as server:
        created = await budgetctl(
            server, "webhooks", "create", "https://hooks.example.com/b", "--prefix", "org:",
            "--kinds", "alert,frozen,limit_changed",
        )  # fmt: skip
        hook = created["webhook"]
        assert len(created["secret"]) == 43
        assert hook["url"] == "https://hooks.example.com/b"
        assert hook["budget_prefix"] == "org:"
        assert hook["kinds"] == [
            "BUDGET_EVENT_KIND_ALERT",
            "BUDGET_EVENT_KIND_LIMIT_CHANGED",
            "BUDGET_EVENT_KIND_FROZEN",
        ]
        assert hook["created_at_us"] == clock.now_us()

        listed = await budgetctl(server, "webhooks", "list")
        assert listed == {"webhooks": [hook]}
        assert created["secret"] not in json.dumps(listed)

        assert await budgetctl(server, "webhooks", "delete", hook["id"]) == {"deleted": hook["id"]}
        assert await budgetctl(server, "webhooks", "list") == {"webhooks": []}


def test_serve_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from budget_server.cli import build_parser

    monkeypatch.setenv("BUDGETD_WEBHOOK_TIMEOUT", "2.5")
    args = build_parser().parse_args(
        ["serve", "--webhook-attempts", "3", "--webhook-poll-interval", "0.5"]
    )
    assert (args.webhook_attempts, args.webhook_poll_interval) == (3, 0.5)
    assert args.webhook_timeout == 2.5
    defaults = ServerConfig()
    assert (defaults.webhook_attempts_max, defaults.webhook_timeout_s) == (20, 5.0)
