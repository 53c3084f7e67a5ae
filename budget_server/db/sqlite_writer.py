"""SQLite's single writer: one thread that commits the work of many budgets at once.

Measured here, a budget's transaction through SQLAlchemy async + aiosqlite held SQLite's
write lock ~3.9 ms at the median, of which 1.3 ms was SQL: the rest was hopping between
the event loop and aiosqlite's thread for every statement. With many budgets each tiny
batch paid that serially, since SQLite has one writer anyway. So on SQLite the actors
hand their batches (plain functions of a sync connection) to this writer, which runs
everything queued while the previous transaction ran as ONE transaction on its own
thread: one hop per transaction instead of one per statement, one BEGIN/COMMIT shared.
The thread runs the statements on plain sqlite3 (`sqlite_raw.RawSqlite`), not through
SQLAlchemy's execution pipeline, which cost more than the SQL itself.

Each job runs in its own SAVEPOINT, so a failing batch (a compare-and-set conflict, a
bug) is undone alone and the others still commit; the ledger's runner first lets the
batches of different budgets share their statements, a group per savepoint, and falls
back to that when a group gives up (`ledger.group`). Results are handed back only after the
COMMIT, so nothing is acknowledged that could still be rolled back; if the COMMIT fails,
every job of that transaction gets the error. The writer holds the process's write gate
for the whole transaction, so other writers (admin, webhooks) interleave as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from budget_server.db.sqlite_raw import RawSqlite

T = TypeVar("T")
Job = Callable[[RawSqlite], Any]
Outcome = tuple[bool, Any]  # (succeeded, value or exception)
RunJobs = Callable[[RawSqlite, list[Job]], list[Outcome]]
JobRunner = Callable[[RawSqlite, list[Job], RunJobs], list[Outcome]]  # given run_each

# Jobs per transaction: enough to take every budget's batch of a busy moment, few enough
# that one transaction does not hold the write lock for long.
JOBS_PER_TRANSACTION_MAX = 128


class SqliteWriter:
    """Runs jobs queued from the event loop on one thread, many per transaction."""

    def __init__(self, path: str, gate: asyncio.Lock) -> None:
        self._path = path
        self._gate = gate
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="budgetd-sqlite-writer")
        self._conn: RawSqlite | None = None  # used only on the writer thread
        self._queue: collections.deque[tuple[Job, asyncio.Future[Any]]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0
        self.jobs = 0
        # How a transaction's jobs run: each in its own savepoint unless the ledger sets a
        # runner that lets jobs share statements (`ledger.group.SqliteGroups`).
        self.runner: JobRunner | None = None

    async def run(self, job: Callable[[RawSqlite], T]) -> T:
        """Run `job` in a write transaction; returns once that transaction has committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="sqlite-writer")
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        jobs: list[tuple[Job, asyncio.Future[Any]]] = []
        try:
            while self._queue:
                async with self._gate:
                    # Taken after the gate, so whatever queued while waiting joins in.
                    count = min(len(self._queue), JOBS_PER_TRANSACTION_MAX)
                    jobs = [self._queue.popleft() for _ in range(count)]
                    try:
                        outcomes = await loop.run_in_executor(
                            self._executor, self._transaction, [job for job, _ in jobs]
                        )
                    except Exception as exc:
                        outcomes = [(False, exc)] * len(jobs)
                for (_, future), (ok, value) in zip(jobs, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                jobs = []
        finally:
            self._task = None
            # Cancelled (shutdown): whoever waits must not hang. A transaction already on
            # the thread finishes there; its outcome is unknown to the waiters.
            for _, future in [*jobs, *self._queue]:
                if not future.done():
                    future.cancel()
            self._queue.clear()

    # ------------------------------------------------------------ on the writer thread

    def _connection(self) -> RawSqlite:
        if self._conn is None:
            # Set up as db.engine sets up its connections; BEGIN is ours (isolation_level
            # None), so it can be BEGIN IMMEDIATE.
            raw = sqlite3.connect(
                self._path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn = RawSqlite(raw)
            try:
                for pragma in (
                    "PRAGMA journal_mode=WAL",
                    "PRAGMA synchronous=NORMAL",
                    "PRAGMA foreign_keys=ON",
                    "PRAGMA busy_timeout=30000",
                ):
                    conn.exec_plain(pragma)
            except Exception:
                raw.close()
                raise
            self._conn = conn
        return self._conn

    def _discard(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _transaction(self, jobs: list[Job]) -> list[Outcome]:
        conn = self._connection()
        self.transactions += 1
        self.jobs += len(jobs)
        try:
            conn.exec_plain("BEGIN IMMEDIATE")
            try:
                outcomes = [run_alone(conn, jobs[0])] if len(jobs) == 1 else self._each(conn, jobs)
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.exec_plain("ROLLBACK")
                raise
            conn.exec_plain("COMMIT" if any(ok for ok, _ in outcomes) else "ROLLBACK")
            return outcomes
        except Exception:
            # The connection's state is unknown (disk error, interrupted COMMIT): start
            # the next transaction on a fresh one.
            self._discard()
            raise

    def _each(self, conn: RawSqlite, jobs: list[Job]) -> list[Outcome]:
        if self.runner is None:
            return run_each(conn, jobs)
        return self.runner(conn, jobs, run_each)

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._discard)
        self._executor.shutdown(wait=True)


def run_each(conn: RawSqlite, jobs: list[Job]) -> list[Outcome]:
    """Each job in its own savepoint, so a failing one is undone alone."""
    outcomes: list[Outcome] = []
    for job in jobs:
        conn.exec_plain("SAVEPOINT job")
        try:
            value = job(conn)
        except Exception as exc:
            conn.exec_plain("ROLLBACK TO job")
            conn.exec_plain("RELEASE job")
            outcomes.append((False, exc))
        else:
            conn.exec_plain("RELEASE job")
            outcomes.append((True, value))
    return outcomes


def run_alone(conn: RawSqlite, job: Job) -> Outcome:
    """One job needs no savepoint: if it fails, the transaction is rolled back."""
    try:
        return (True, job(conn))
    except Exception as exc:
        return (False, exc)
