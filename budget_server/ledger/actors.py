"""One asyncio actor per active budget: it serialises the budget's operations and applies
whatever has queued up while the previous transaction ran as one transaction (group
commit). A hot budget therefore costs one SQL transaction per batch, not per call.

On a SQLite file the batch is handed to the database's single writer thread
(`db.sqlite_writer`), which commits the batches of every budget queued meanwhile in one
transaction, grouping batches of different budgets so that they share statements
(`ledger.group`); on PostgreSQL it goes to the grouper, which runs it in a group with the
batches waiting beside it, or hands it back to run alone on the asyncpg connection
(`db.pg_raw`); elsewhere, and for a batch that fires alerts, on the async engine.

The actor only orders work inside this process; correctness across processes comes from
the row locks and compare-and-set writes in `txn.ChainBatch`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import IntegrityError

from budget_server.db.engine import Database
from budget_server.db.errors import is_unavailable
from budget_server.db.pg_raw import raw_transaction
from budget_server.errors import LedgerError, Overloaded, Unavailable
from budget_server.events.model import BudgetEvent
from budget_server.events.publisher import EventPublisher
from budget_server.ledger.group import BatchJob, BatchOutcome, PostgresGroups
from budget_server.ledger.model import Op, OpResult
from budget_server.ledger.txn import ChainBatch, NeedsAsync
from budget_server.ledger.writes import ConcurrentWrite
from budget_server.limits import ACTOR_QUEUE_MAX, BATCH_OPS_MAX
from budget_server.metrics import Metrics

log = logging.getLogger("budgetd.actors")

CONFLICT_RETRIES_MAX = 8
INTEGRITY_RETRIES_MAX = 2

# Sees every batch after it committed (events for watchers, logs, metrics).
BatchObserver = Callable[[Sequence[Op], Sequence[OpResult | LedgerError | BaseException]], None]


class BudgetActor:
    """Runs the queued operations of one budget, a batch per transaction."""

    def __init__(
        self,
        budget_id: str,
        chain_ids: Sequence[str],
        db: Database,
        now_us: Callable[[], int],
        on_idle: Callable[[BudgetActor], None],
        publisher: EventPublisher | None = None,
        on_batch: BatchObserver | None = None,
        metrics: Metrics | None = None,
        groups: PostgresGroups | None = None,
    ) -> None:
        self.budget_id = budget_id
        self.chain_ids = tuple(chain_ids)
        self._db = db
        self._now_us = now_us
        self._on_idle = on_idle
        self._publisher = publisher
        self._on_batch = on_batch
        self._metrics = metrics
        self._groups = groups
        self._queue: collections.deque[Op] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.ops = 0

    @property
    def busy(self) -> bool:
        return self._task is not None

    def submit(self, op: Op) -> None:
        """Queue an operation; its future resolves when its transaction has committed."""
        if len(self._queue) >= ACTOR_QUEUE_MAX:
            raise Overloaded(
                f"budget {self.budget_id!r} has {ACTOR_QUEUE_MAX} operations waiting "
                "(ACTOR_QUEUE_MAX); retry with back-off"
            )
        self._queue.append(op)
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name=f"actor:{self.budget_id}")

    async def join(self) -> None:
        """Wait until everything queued so far has been applied (shutdown drains actors)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        try:
            while self._queue:
                count = min(len(self._queue), BATCH_OPS_MAX)
                batch = [self._queue.popleft() for _ in range(count)]
                await self._apply(batch)
        finally:
            self._task = None
            self._on_idle(self)

    async def _apply(self, batch: list[Op]) -> None:
        results: Sequence[OpResult | LedgerError | BaseException]
        events: list[BudgetEvent] = []
        started = time.perf_counter()
        try:
            results, events = await self._transact(batch)
        except LedgerError as error:  # the whole batch was refused (e.g. budget deleted)
            results = [error] * len(batch)
        except Exception as exc:
            if is_unavailable(exc):
                log.warning("database unavailable for budget %s: %s", self.budget_id, exc)
                results = [Unavailable(f"the ledger database is unavailable: {exc}")] * len(batch)
            else:
                log.exception("batch on budget %s failed", self.budget_id)
                results = [exc] * len(batch)
        self.batches += 1
        self.ops += len(batch)
        if self._metrics is not None:
            self._metrics.sql_transaction_seconds.observe(time.perf_counter() - started)
            self._metrics.batch_ops.observe(len(batch))
        for op, result in zip(batch, results, strict=True):
            if op.future.done():
                continue
            if isinstance(result, BaseException):
                op.future.set_exception(result)
            else:
                op.future.set_result(result)
        if self._publisher is not None and events:
            self._publisher.after_commit(events)
        if self._on_batch is not None:
            self._on_batch(batch, results)

    async def _transact(self, batch: list[Op]) -> BatchOutcome:
        integrity_failures = 0
        writer = self._db.sqlite_writer
        for _attempt in range(CONFLICT_RETRIES_MAX):
            try:
                if writer is not None:
                    try:
                        return await writer.run(self._job(batch, self._now_us()))
                    except NeedsAsync:
                        pass  # alerts fired: record them (outbox) on the async path
                elif self._db.raw_postgres:
                    if self._groups is not None and _attempt == 0:
                        job = self._job(batch, self._now_us())
                        if (grouped := await self._groups.run(job)) is not None:
                            return grouped
                    try:
                        return await self._transact_raw(batch)
                    except NeedsAsync:
                        pass  # alerts fired: record them (outbox, pg_notify) on the async path
                return await self._transact_async(batch)
            except ConcurrentWrite as exc:
                log.info("write conflict on %s (%s); retrying batch", self.budget_id, exc)
                await asyncio.sleep(0)
            except IntegrityError:
                # Another process inserted the same idempotency key first: the next read
                # finds its reservation. Anything else repeats, and is a bug to surface.
                integrity_failures += 1
                if integrity_failures > INTEGRITY_RETRIES_MAX:
                    raise
                await asyncio.sleep(0)
        raise Unavailable(f"budget {self.budget_id!r} is too contended; retry")

    async def _transact_async(self, batch: list[Op]) -> BatchOutcome:
        async with self._db.write() as conn:
            txn = ChainBatch(self.chain_ids, self._now_us(), self._db.locks_rows, self._publisher)
            await txn.load(conn, batch)
            results = [txn.apply(op) for op in batch]
            await txn.flush(conn)
        return results, txn.events

    async def _transact_raw(self, batch: list[Op]) -> BatchOutcome:
        """The batch on PostgreSQL's asyncpg connection without SQLAlchemy's execution
        pipeline (`db.pg_raw`); same statements, locks and compare-and-set."""
        async with raw_transaction(self._db.engine) as conn:
            txn = ChainBatch(self.chain_ids, self._now_us(), True, self._publisher)
            await txn.load(conn, batch)
            results = [txn.apply(op) for op in batch]
            await txn.flush_raw(conn)
        return results, txn.events

    def _job(self, batch: list[Op], now_us: int) -> BatchJob:
        """The batch as a job for the SQLite writer thread or the PostgreSQL grouper,
        which may run it in a group with other budgets' batches (`ledger.group`). It
        touches only its own ChainBatch and the (immutable) ops, never their futures."""
        return BatchJob(self.chain_ids, tuple(batch), now_us, self._publisher)
