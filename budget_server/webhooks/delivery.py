"""The delivery worker: sends the outbox's due rows, retries with back-off, gives up in the end.

One worker runs in every budgetd process. A pass claims a bounded batch of due rows
(`delivered_at_us = 0`, not `failed`, `next_attempt_us <= now`), most overdue first, and
in the same short transaction pushes their `next_attempt_us` to `now + lease_s`: the
lease. Other processes skip rows that are locked (PostgreSQL: `FOR UPDATE SKIP LOCKED`)
and, once the claim has committed, no longer see them as due; SQLite's write lock makes
the claim atomic on its own. So two processes never send the same row at the same time.
The HTTP requests then run outside any transaction, and each outcome is recorded on its own:

- 2xx: delivered (`delivered_at_us`).
- anything else, a connection error or a timeout: `attempts + 1`, `last_error`, and the
  next attempt after 1 s, 2 s, 4 s, ... capped at `backoff_max_s`, each +-25 % (jitter, so
  a receiver that comes back is not hit by every retry at once);
- after `attempts_max` attempts: `failed`, never sent again.

A failure is recorded only while the lease is still ours (`next_attempt_us` is the lease's
end): if a send outlived its lease and another process took the row over, that process owns
the schedule. A row whose process died mid-send is due again when its lease ends. Delivery
is therefore at least once, with the same event id and body every time; receivers
de-duplicate on the id (budget_client.webhooks).
Delivered and failed rows are deleted after RETENTION_US, a bounded batch at a time.

HTTP: the standard library's urllib in a small thread pool of the worker's own (no extra
dependency); TLS certificates are verified, HTTP(S)_PROXY and NO_PROXY apply, redirects are
not followed (a 3xx is a failed attempt that names the reason).

Timing: passes run every `poll_interval_s` of real time, and at once when this process
publishes an event a webhook wants; which rows are due is decided by the ledger's clock,
so tests move time with a ManualClock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import and_, delete, false, select, true, update

from budget_client.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from budget_server import __version__
from budget_server.clock import Clock
from budget_server.db.engine import Database
from budget_server.db.schema import webhook_deliveries, webhooks
from budget_server.events.bus import EventBus
from budget_server.events.model import BudgetEvent
from budget_server.webhooks.directory import WebhookDirectory

log = logging.getLogger("budgetd.webhooks")

ERROR_LENGTH_MAX: Final = 500
"""`last_error` keeps this much: the status and the start of the receiver's answer."""
RESPONSE_BYTES_MAX: Final = 256
"""Read of an error response body, for `last_error`."""
RETENTION_US: Final = 7 * 24 * 3600 * 1_000_000
"""Delivered and failed rows are deleted after this long, so the outbox stays small."""
PRUNE_INTERVAL_S: Final = 3600.0
PRUNE_ROWS_MAX: Final = 1000
"""Rows deleted per statement, so pruning never holds the write lock for long."""
_US: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How hard the worker tries."""

    attempts_max: int = 20
    """Attempts per (webhook, event) before the row is marked failed (about an hour)."""
    timeout_s: float = 5.0
    """Per attempt: connecting, sending and reading the status line."""
    backoff_first_s: float = 1.0
    """Wait after the first failure; doubles after each further failure."""
    backoff_max_s: float = 300.0
    """The longest wait between two attempts."""
    batch_max: int = 32
    """Rows claimed per pass."""
    concurrency_max: int = 8
    """Requests in flight at once (threads of the worker's own pool)."""
    lease_s: float = 120.0
    """How long a claimed row stays invisible to other workers; outlasts a whole batch."""

    def __post_init__(self) -> None:
        if self.attempts_max < 1:
            raise ValueError(f"attempts_max must be at least 1 (got {self.attempts_max})")
        if not 0 < self.timeout_s <= 60:
            raise ValueError(f"timeout_s must be in (0, 60] (got {self.timeout_s})")
        waves = -(-self.batch_max // self.concurrency_max)
        # A lease must outlive the batch it covers, or a slow batch would be sent twice.
        if self.lease_s < 2 * waves * (self.timeout_s + 1):
            raise ValueError(
                f"lease_s {self.lease_s} is too short for {self.batch_max} rows "
                f"{self.concurrency_max} at a time with a {self.timeout_s} s timeout"
            )

    def backoff_us(self, attempts: int, rng: random.Random) -> int:
        """Wait before the next attempt, after `attempts` failed ones (+-25 % jitter)."""
        exponent = min(attempts - 1, 30)  # 2**30 s is far past any cap
        delay_s = min(self.backoff_max_s, self.backoff_first_s * (1 << exponent))
        return round(min(self.backoff_max_s, delay_s * rng.uniform(0.75, 1.25)) * _US)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row this worker holds the lease on, with where to send it."""

    id: int
    webhook_id: str
    event_id: str
    payload: str
    attempts: int
    lease_until_us: int
    url: str | None  # None: the webhook was deleted after the row was queued
    secret: str


@dataclass(frozen=True, slots=True)
class Outcome:
    delivered: bool
    status: int  # HTTP status; 0 when no response came
    error: str


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer we do not follow: a signed POST must reach its registered URL."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _post_blocking(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> Outcome:
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            detail = error.read(RESPONSE_BYTES_MAX).decode("utf-8", "replace").strip()
        reason = f"HTTP {error.code}"
        if 300 <= error.code < 400:
            reason += " (redirects are not followed; register the final URL)"
        return Outcome(False, error.code, f"{reason}: {detail}" if detail else reason)
    except urllib.error.URLError as error:
        return Outcome(False, 0, f"cannot connect: {error.reason}")
    except TimeoutError:
        return Outcome(False, 0, f"no answer within {timeout_s:g} s")
    except (OSError, ValueError) as error:  # reset connections, malformed responses, ...
        return Outcome(False, 0, f"{type(error).__name__}: {error}")
    if 200 <= status < 300:
        return Outcome(True, status, "")
    return Outcome(False, status, f"HTTP {status}")


class DeliveryWorker:
    """Sends the outbox: `run()` as a background task of the server."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        directory: WebhookDirectory,
        *,
        policy: DeliveryPolicy | None = None,
        poll_interval_s: float = 1.0,
        bus: EventBus | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._directory = directory
        self.policy = policy or DeliveryPolicy()
        self.poll_interval_s = poll_interval_s
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pruned_at = -PRUNE_INTERVAL_S
        if bus is not None:
            bus.add_listener(self._on_event)

    def _on_event(self, event: BudgetEvent) -> None:
        # Published after its transaction committed: the outbox row is there to claim now.
        if self._directory.matching(event):
            self._wake.set()

    def wake(self) -> None:
        """Look for due rows now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver forever. Cancelling lets the requests in flight finish and be recorded."""
        try:
            while True:
                self._wake.clear()
                current = asyncio.ensure_future(self._pass())
                try:
                    full = await asyncio.shield(current)
                except asyncio.CancelledError:
                    # Requests already sent are answered within the timeout; recording their
                    # outcomes now saves the receiver a duplicate after the restart.
                    await asyncio.wait([current], timeout=self.policy.timeout_s + 2)
                    raise
                if full:
                    continue  # more may be due right away
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    async def _pass(self) -> bool:
        """One pass, never raising; True when the batch was full."""
        try:
            claimed = await self.deliver_due()
        except Exception:
            log.exception("webhook delivery pass failed; retrying in %.1f s", self.poll_interval_s)
            return False
        if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL_S:
            self._pruned_at = time.monotonic()
            try:
                await self.prune()
            except Exception:
                log.exception("pruning the webhook outbox failed")
        return claimed >= self.policy.batch_max

    async def deliver_due(self) -> int:
        """Claim the due rows (a bounded batch), send them, record each outcome."""
        claimed = await self._claim(self._clock.now_us())
        if claimed:
            await asyncio.gather(*(self._deliver(row) for row in claimed))
        return len(claimed)

    async def _claim(self, now_us: int) -> list[Claimed]:
        d = webhook_deliveries
        query = (
            select(d.c.id, d.c.webhook_id, d.c.event_id, d.c.payload, d.c.attempts)
            .where(d.c.delivered_at_us == 0, d.c.failed == false(), d.c.next_attempt_us <= now_us)
            .order_by(d.c.next_attempt_us, d.c.id)
            .limit(self.policy.batch_max)
        )
        if self._db.locks_rows:
            query = query.with_for_update(skip_locked=True)
        lease_until_us = now_us + round(self.policy.lease_s * _US)
        async with self._db.write() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            await conn.execute(
                update(d)
                .where(d.c.id.in_([row.id for row in rows]))
                .values(next_attempt_us=lease_until_us)
            )
            hooks = {
                hook.id: hook
                for hook in (
                    await conn.execute(
                        select(webhooks.c.id, webhooks.c.url, webhooks.c.secret).where(
                            webhooks.c.id.in_({row.webhook_id for row in rows})
                        )
                    )
                ).all()
            }
        return [
            Claimed(
                id=row.id,
                webhook_id=row.webhook_id,
                event_id=row.event_id,
                payload=row.payload,
                attempts=row.attempts,
                lease_until_us=lease_until_us,
                url=hooks[row.webhook_id].url if row.webhook_id in hooks else None,
                secret=hooks[row.webhook_id].secret if row.webhook_id in hooks else "",
            )
            for row in rows
        ]

    async def _deliver(self, row: Claimed) -> None:
        if row.url is None:
            outcome = Outcome(False, 0, "the webhook was deleted")
            await self._record(row, outcome, give_up=True)
            return
        body = row.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"budgetd/{__version__}",
            EVENT_ID_HEADER: row.event_id,
            SIGNATURE_HEADER: sign(row.secret, body),
            TIMESTAMP_HEADER: str(self._clock.now_us()),
        }
        started = time.monotonic()
        outcome = await self._post(row.url, body, headers)
        elapsed_ms = round((time.monotonic() - started) * 1000)
        attempt = row.attempts + 1
        give_up = not outcome.delivered and attempt >= self.policy.attempts_max
        retry_in_us = await self._record(row, outcome, give_up=give_up)
        fields = {
            "webhook_id": row.webhook_id,
            "event_id": row.event_id,
            "attempt": attempt,
            "status": outcome.status,
            "elapsed_ms": elapsed_ms,
        }
        if outcome.delivered:
            log.info("webhook delivered", extra=fields)
        elif give_up:
            log.error(
                "webhook delivery failed for good after %d attempts: %s",
                attempt,
                outcome.error,
                extra=fields,
            )
        else:
            log.warning(
                "webhook attempt failed: %s; retrying in %.1f s",
                outcome.error,
                retry_in_us / _US,
                extra=fields,
            )

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Outcome:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.policy.concurrency_max, thread_name_prefix="budgetd-webhook"
            )
        loop = asyncio.get_running_loop()
        timeout_s = self.policy.timeout_s
        future = loop.run_in_executor(self._executor, _post_blocking, url, body, headers, timeout_s)
        try:
            # The socket timeout bounds each read; this bounds the whole attempt (a receiver
            # that trickles bytes). An abandoned thread ends at its own socket timeout.
            return await asyncio.wait_for(future, timeout_s + 1)
        except TimeoutError:
            return Outcome(False, 0, f"no complete answer within {timeout_s:g} s")

    async def _record(self, row: Claimed, outcome: Outcome, *, give_up: bool) -> int:
        """Write the outcome; returns the wait before the next attempt (0 if none)."""
        d = webhook_deliveries
        now_us = self._clock.now_us()
        attempts = row.attempts + (0 if row.url is None else 1)
        error = outcome.error[:ERROR_LENGTH_MAX]
        retry_in_us = 0
        if outcome.delivered:
            # Success stands even if the lease ran out meanwhile: the receiver has the event.
            statement = (
                update(d)
                .where(d.c.id == row.id, d.c.delivered_at_us == 0)
                .values(delivered_at_us=max(now_us, 1), attempts=attempts, last_error="")
            )
        elif give_up:
            statement = (
                update(d)
                .where(d.c.id == row.id, d.c.next_attempt_us == row.lease_until_us)
                .values(failed=True, attempts=attempts, last_error=error, next_attempt_us=now_us)
            )
        else:
            retry_in_us = self.policy.backoff_us(attempts, self._rng)
            statement = (
                update(d)
                .where(d.c.id == row.id, d.c.next_attempt_us == row.lease_until_us)
                .values(attempts=attempts, last_error=error, next_attempt_us=now_us + retry_in_us)
            )
        async with self._db.write() as conn:
            result = await conn.execute(statement)
        if result.rowcount != 1:
            log.info(
                "webhook delivery row changed meanwhile (lease expired or webhook deleted)",
                extra={"webhook_id": row.webhook_id, "event_id": row.event_id},
            )
        return retry_in_us

    async def prune(self) -> int:
        """Delete delivered and failed rows older than RETENTION_US; returns rows deleted."""
        d = webhook_deliveries
        cutoff_us = self._clock.now_us() - RETENTION_US
        finished = (
            and_(d.c.delivered_at_us > 0, d.c.delivered_at_us < cutoff_us),
            and_(d.c.delivered_at_us == 0, d.c.failed == true(), d.c.next_attempt_us < cutoff_us),
        )
        deleted = 0
        for condition in finished:
            async with self._db.write() as conn:
                ids = select(d.c.id).where(condition).limit(PRUNE_ROWS_MAX)
                result = await conn.execute(delete(d).where(d.c.id.in_(ids)))
            deleted += max(0, result.rowcount)
        return deleted
