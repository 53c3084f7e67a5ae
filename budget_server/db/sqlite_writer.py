"""SQLite's single writer: one thread that commits the work of many budgets at once.

Measured here, a budget's transaction through SQLAlchemy async + aiosqlite held SQLite's
write lock ~3.9 ms at the median, of which 1.3 ms was SQL: the rest was hopping between
the event loop and aiosqlite's thread for every statement. With many budgets each tiny
batch paid that serially, since SQLite has one writer anyway. So on SQLite the actors
hand their batches (plain functions of a sync connection) to this writer, which runs
everything queued while the previous transaction ran as ONE transaction on its own
thread: one hop per transaction instead of one per statement, one BEGIN/COMMIT shared.

Each job runs in its own SAVEPOINT, so a failing batch (a compare-and-set conflict, a
bug) is undone alone and the others still commit. Results are handed back only after the
COMMIT, so nothing is acknowledged that could still be rolled back; if the COMMIT fails,
every job of that transaction gets the error. The writer holds the process's write gate
for the whole transaction, so other writers (admin, webhooks) interleave as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL

T = TypeVar("T")
Job = Callable[[Connection], Any]
Outcome = tuple[bool, Any]  # (succeeded, value or exception)

# Jobs per transaction: enough to take every budget's batch of a busy moment, few enough
# that one transaction does not hold the write lock for long.
JOBS_PER_TRANSACTION_MAX = 128


class SqliteWriter:
    """Runs jobs queued from the event loop on one thread, many per transaction."""

    def __init__(self, url: URL, gate: asyncio.Lock, configure: Callable[[Engine], None]) -> None:
        self._engine = create_engine(url, pool_size=1, max_overflow=0, connect_args={"timeout": 30})
        configure(self._engine)
        self._gate = gate
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="budgetd-sqlite-writer")
        self._conn: Connection | None = None  # used only on the writer thread
        self._queue: collections.deque[tuple[Job, asyncio.Future[Any]]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0
        self.jobs = 0

    async def run(self, job: Callable[[Connection], T]) -> T:
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

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._engine.connect()
            self._conn = conn.execution_options(budgetd_write=True)  # BEGIN IMMEDIATE
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
            if len(jobs) == 1:
                return [self._alone(conn, jobs[0])]
            outcomes: list[Outcome] = []
            with conn.begin():
                for job in jobs:
                    savepoint = conn.begin_nested()
                    try:
                        value = job(conn)
                    except Exception as exc:
                        savepoint.rollback()
                        outcomes.append((False, exc))
                    else:
                        savepoint.commit()
                        outcomes.append((True, value))
            return outcomes
        except Exception:
            # The connection's state is unknown (disk error, interrupted COMMIT): start
            # the next transaction on a fresh one.
            self._discard()
            raise

    @staticmethod
    def _alone(conn: Connection, job: Job) -> Outcome:
        """One job needs no savepoint: its failure rolls back the whole transaction."""

        class _Failed(Exception):
            pass

        try:
            with conn.begin():
                try:
                    value = job(conn)
                except Exception as exc:
                    raise _Failed() from exc
        except _Failed as failed:
            return (False, failed.__cause__)
        return (True, value)

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._discard)
        self._executor.shutdown(wait=True)
        self._engine.dispose()
