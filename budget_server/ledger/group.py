"""Many budgets' batches in one transaction, sharing their statements.

An actor batches the operations of one budget, so a hot budget costs a few statements per
batch however many operations it holds. Traffic spread over many budgets gave every actor
a batch of one operation, and each batch its own statements: ~8 per batch on SQLite (in
its own savepoint), ~5 round trips and a transaction per batch on PostgreSQL. Measured
here (`bench.run --only requests`), 1,000 budgets ran at 0.6 of one hot budget's rate on
SQLite and 0.3 on PostgreSQL.

A group takes the batches waiting at the same moment whose chains share no budget (so no
two compare-and-set writes meet on one row), reads all their chains in one statement and
all their reservations in one more, decides each batch on its own `ChainBatch` exactly as
alone, and writes every row with the statements one batch would use. Chains are read
(and on PostgreSQL locked) in the order of a single chain, by depth then id, which is a
total order, so groups and single batches in any process cannot deadlock one another.

Anything unusual makes the group give up before it commits: a compare-and-set conflict,
a duplicate idempotency key, a deleted budget, alerts to record (their outbox is written
on SQLAlchemy's async path). The caller then rolls the group back and runs its batches one
by one, which tells which batch failed and why, and retries as before. All are rare.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from budget_server.db.pg_raw import RawPg, raw_transaction
from budget_server.db.sqlite_raw import RawSqlite
from budget_server.db.sqlite_writer import Outcome, RunJobs
from budget_server.errors import LedgerError
from budget_server.events.model import BudgetEvent
from budget_server.events.publisher import EventPublisher
from budget_server.ledger import statements as SQL
from budget_server.ledger.model import Op, OpResult
from budget_server.ledger.pg_writes import write_all_postgres
from budget_server.ledger.steps import Steps, price_steps, run_async, run_sync
from budget_server.ledger.txn import ChainBatch, NeedsAsync, idempotency_keys, reservation_ids
from budget_server.ledger.writes import merged, write_set, write_steps
from budget_server.limits import GROUP_BATCHES_MAX, GROUPS_IN_FLIGHT_MAX

log = logging.getLogger("budgetd.group")

# A batch's results, one per operation, and the alert events it fired.
BatchOutcome = tuple[list[OpResult | LedgerError], list[BudgetEvent]]


@dataclass(frozen=True, slots=True)
class BatchJob:
    """One actor's batch, as the SQLite writer or the PostgreSQL grouper receives it.

    Called on a connection, it runs alone, as every batch did before groups; the writer
    calls it that way for a batch that could not join a group.
    """

    chain_ids: tuple[str, ...]
    ops: tuple[Op, ...]
    now_us: int
    publisher: EventPublisher | None

    def batch(self, lock_rows: bool) -> ChainBatch:
        return ChainBatch(self.chain_ids, self.now_us, lock_rows, self.publisher)

    def __call__(self, conn: RawSqlite) -> BatchOutcome:
        txn = self.batch(False)
        txn.load_sync(conn, self.ops)
        results = [txn.apply(op) for op in self.ops]
        txn.flush_sync(conn)
        return results, txn.events


def disjoint_groups(jobs: Sequence[BatchJob]) -> Iterator[list[int]]:
    """Indexes of `jobs` in groups whose chains share no budget, in queue order."""
    left = list(range(len(jobs)))
    while left:
        taken: set[str] = set()
        group: list[int] = []
        later: list[int] = []
        for index in left:
            chain = jobs[index].chain_ids
            if taken.isdisjoint(chain):
                taken.update(chain)
                group.append(index)
            else:
                later.append(index)
        yield group
        left = later


class ChainGroup:
    """Batches of chains that share no budget, read and written together."""

    def __init__(self, jobs: Sequence[BatchJob], lock_rows: bool) -> None:
        self.jobs = jobs
        self.lock_rows = lock_rows
        self.batches = [job.batch(lock_rows) for job in jobs]

    def _load_steps(self) -> Steps[None]:
        query = SQL.SELECT_CHAIN_FOR_UPDATE if self.lock_rows else SQL.SELECT_CHAIN
        ids = [budget_id for job in self.jobs for budget_id in job.chain_ids]
        rows = (yield query, {"ids": ids}).all()
        owner = {b: txn for txn in self.batches for b in txn.chain_ids}
        chains: dict[int, list[Any]] = {id(txn): [] for txn in self.batches}
        for row in rows:  # by depth then id, so each chain's rows stay root-first
            chains[id(owner[row.id])].append(row)
        for txn in self.batches:
            txn.take_chain(chains[id(txn)])

        wanted: dict[str, list[ChainBatch]] = {}
        for job, txn in zip(self.jobs, self.batches, strict=True):
            for reservation_id in reservation_ids(job.ops):
                wanted.setdefault(reservation_id, []).append(txn)
        if wanted:
            found: dict[str, list[Any]] = {}
            for row in (yield SQL.SELECT_RESERVATIONS_BY_ID, {"ids": list(wanted)}).all():
                found.setdefault(row.id, []).append(row)  # a row per hold
            for reservation_id, txns in wanted.items():
                for txn in txns:
                    txn.take_reservations(found.get(reservation_id, []))
        for job, txn in zip(self.jobs, self.batches, strict=True):
            # Idempotency keys are looked up per budget; meter streams rarely carry them.
            if keys := idempotency_keys(job.ops):
                by_key = {"budget_id": job.chain_ids[-1], "keys": keys}
                txn.take_reservations((yield SQL.SELECT_RESERVATIONS_BY_KEY, by_key).all())

        models = set[str]().union(
            *(txn.priced_models(job.ops) for job, txn in zip(self.jobs, self.batches, strict=True))
        )
        if models:
            prices = yield from price_steps(models)
            for txn in self.batches:
                txn.prices = prices

    def _decide(self) -> list[BatchOutcome]:
        outcomes: list[BatchOutcome] = []
        for job, txn in zip(self.jobs, self.batches, strict=True):
            outcomes.append(([txn.apply(op) for op in job.ops], txn.events))
            txn.fire_due_alerts()
            if txn.events:
                raise NeedsAsync()
        return outcomes

    def run_sync(self, conn: RawSqlite) -> list[BatchOutcome]:
        run_sync(conn, self._load_steps())
        outcomes = self._decide()
        run_sync(conn, write_steps(merged([write_set(t) for t in self.batches]), conn.dialect))
        return outcomes

    async def run_raw(self, conn: RawPg) -> list[BatchOutcome]:
        await run_async(conn, self._load_steps())
        outcomes = self._decide()
        await write_all_postgres(conn, merged([write_set(txn) for txn in self.batches]))
        return outcomes


class GroupCounts:
    """What grouping achieved, for tests and the benchmark's report."""

    def __init__(self) -> None:
        self.groups = 0  # committed groups
        self.batches = 0  # batches committed in those groups
        self.gave_up = 0  # groups rolled back, their batches run one by one

    def committed(self, size: int) -> None:
        self.groups += 1
        self.batches += size

    def gave_up_on(self, size: int, error: Exception) -> None:
        self.gave_up += 1
        log.debug("a group of %d batches gave up (%r); running them one by one", size, error)


class PostgresGroups(GroupCounts):
    """Gathers the batches that actors hand in while earlier groups are in flight, and
    runs them as groups on asyncpg (`db.pg_raw`), up to GROUPS_IN_FLIGHT_MAX at once.

    A batch that finds nothing to join is handed back at once to run alone, as before;
    so is every batch of a group that gave up. So light traffic pays one turn of the
    event loop, and only a busy moment forms groups.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        self._engine = engine
        self._queue: collections.deque[tuple[BatchJob, asyncio.Future[Any]]] = collections.deque()
        self._in_flight = 0

    async def run(self, job: BatchJob) -> BatchOutcome | None:
        """The batch's outcome once its group has committed, or None: run it alone."""
        future: asyncio.Future[BatchOutcome | None] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if self._in_flight < GROUPS_IN_FLIGHT_MAX:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                waiting = [
                    self._queue.popleft() for _ in range(min(len(self._queue), GROUP_BATCHES_MAX))
                ]
                group = set(next(disjoint_groups([job for job, _ in waiting])))
                chosen = [entry for i, entry in enumerate(waiting) if i in group]
                later = [entry for i, entry in enumerate(waiting) if i not in group]
                self._queue.extendleft(reversed(later))
                if len(chosen) < 2:
                    _resolve(chosen, None)
                    continue
                await self._run_group(chosen)
        finally:
            self._in_flight -= 1

    async def _run_group(self, chosen: list[tuple[BatchJob, asyncio.Future[Any]]]) -> None:
        try:
            async with raw_transaction(self._engine) as conn:
                outcomes = await ChainGroup([job for job, _ in chosen], True).run_raw(conn)
        except Exception as error:
            self.gave_up_on(len(chosen), error)
            _resolve(chosen, None)
            return
        except BaseException:  # cancelled (shutdown): the batches must not wait forever
            _resolve(chosen, None)
            raise
        self.committed(len(chosen))
        for (_, future), outcome in zip(chosen, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)


def _resolve(entries: Sequence[tuple[BatchJob, asyncio.Future[Any]]], value: Any) -> None:
    for _, future in entries:
        if not future.done():
            future.set_result(value)


class SqliteGroups(GroupCounts):
    """How the SQLite writer runs the jobs of one transaction (`SqliteWriter.runner`):
    batch jobs in groups, each group in a savepoint; a group that gives up, and every
    other job, each in its own savepoint as before."""

    def __call__(self, conn: RawSqlite, jobs: list[Any], run_each: RunJobs) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        batch_jobs = [i for i, job in enumerate(jobs) if isinstance(job, BatchJob)]
        for group in disjoint_groups([jobs[i] for i in batch_jobs]):
            if len(group) < 2:
                continue
            indexes = [batch_jobs[g] for g in group]
            conn.exec_plain("SAVEPOINT grp")
            try:
                values = ChainGroup([jobs[i] for i in indexes], False).run_sync(conn)
            except Exception as error:
                conn.exec_plain("ROLLBACK TO grp")
                conn.exec_plain("RELEASE grp")
                self.gave_up_on(len(group), error)
                continue
            conn.exec_plain("RELEASE grp")
            self.committed(len(group))
            for i, value in zip(indexes, values, strict=True):
                outcomes[i] = (True, value)
        rest = [i for i, outcome in enumerate(outcomes) if outcome is None]
        for i, outcome in zip(rest, run_each(conn, [jobs[i] for i in rest]), strict=True):
            outcomes[i] = outcome
        return cast(list[Outcome], outcomes)
