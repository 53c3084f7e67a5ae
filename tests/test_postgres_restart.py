"""PostgreSQL restarted under load: budgetd reconnects by itself and charges every
operation exactly once.

A `budgetd serve` process runs on a fresh PostgreSQL database while clients reserve and
commit with idempotency keys, retrying each failed call with the same key (as the client
library does). Mid-load the machine's PostgreSQL cluster is restarted. In-flight calls may
fail, but only with UNAVAILABLE; budgetd is not restarted; every operation succeeds in the
end; and the ledger shows each key reserved once and committed once, VerifyLedger clean.

This restarts the machine's shared PostgreSQL, which other tests may be using, so it runs
only with BUDGETD_TEST_PG_RESTART=1 or in CI (CI=true, where nothing else runs at the same
time), and it does not finish before PostgreSQL accepts connections again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from tests.support.databases import PG_ADMIN_DB, PG_HOST, PG_PORT, PG_USER, fresh_postgres
from tests.support.ledger import all_entries, assert_ledger_clean, create
from tests.support.servers import ServerProcess, Stubs, start_server_process, stubs

ENABLED = os.environ.get("BUDGETD_TEST_PG_RESTART") == "1" or os.environ.get("CI") == "true"
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not ENABLED,
        reason="restarts the machine's shared PostgreSQL: set BUDGETD_TEST_PG_RESTART=1 "
        "(CI=true runs it)",
    ),
]

CYCLES = int(os.environ.get("BUDGETD_TEST_PG_RESTART_CYCLES", "2"))
"""PostgreSQL restarts per test run."""
WORKERS = 4
"""Clients reserving and committing at once, so that calls are in flight at the restart."""
CALL_S = 10.0
"""Deadline of one call: a call that hangs through the restart is a failure, not a retry."""
RETRY_S = 60.0
"""How long one operation may keep retrying (with the same key) before the test fails."""
RETRY_PAUSE_S = 0.1
LOAD_BEFORE_S = 1.0
"""Steady load before each restart, and after the last one."""
PG_BACK_S = 120.0
"""Longest wait for PostgreSQL to accept connections after a restart."""
BUDGET = "pgrestart:load"


@dataclass
class Load:
    """What the clients did: the keys that succeeded, and every failure code seen."""

    committed: dict[str, int] = field(default_factory=dict)  # key -> charged
    reservations: dict[str, str] = field(default_factory=dict)  # key -> reservation id
    failures: Counter[str] = field(default_factory=Counter)
    failure_details: list[str] = field(default_factory=list)
    retries_max_s: float = 0.0


def cluster() -> tuple[str, str]:
    """(version, name) of the machine's Debian PostgreSQL cluster."""
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        pytest.skip("no Debian PostgreSQL cluster (pg_ctlcluster) on this machine")
    if os.geteuid() != 0:
        pytest.skip("restarting the PostgreSQL cluster needs root")
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir() if (p / "main").is_dir())
    if not versions:
        pytest.skip("no 'main' PostgreSQL cluster under /etc/postgresql")
    return versions[-1], "main"


async def run(*command: str, timeout_s: float = PG_BACK_S) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode == 0, f"{' '.join(command)} exited {process.returncode}: {output!r}"
    return output.decode()


async def accepts_connections() -> bool:
    try:
        connection = await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=2
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    await connection.close()
    return True


async def wait_for_postgres(timeout_s: float = PG_BACK_S) -> float:
    """Wait until PostgreSQL accepts connections; return how long that took."""
    started = time.monotonic()
    while not await accepts_connections():
        assert time.monotonic() - started < timeout_s, "PostgreSQL did not come back"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def retried(load: Load, what: str, call: object) -> object:
    """Await `call()` until it succeeds, with the same request (and so the same key)."""
    assert callable(call)
    started = time.monotonic()
    while True:
        try:
            answer = await call()
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            load.failures[code] += 1
            if code != "UNAVAILABLE" and len(load.failure_details) < 20:
                load.failure_details.append(f"{what}: {code} {error.details()}")
            assert time.monotonic() - started < RETRY_S, f"{what} kept failing: {code}"
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        load.retries_max_s = max(load.retries_max_s, time.monotonic() - started)
        return answer


async def worker(api: Stubs, number: int, load: Load, stop: asyncio.Event) -> None:
    i = 0
    while not stop.is_set():
        key = f"w{number}-{i}"
        amount = 1 + (number * 7 + i) % 13
        reserved = await retried(
            load,
            f"Reserve {key}",
            lambda key=key: api.budget.Reserve(
                pb.ReserveRequest(budget_id=BUDGET, amount=20, idempotency_key=key),
                timeout=CALL_S,
            ),
        )
        assert isinstance(reserved, pb.ReserveResponse)
        reservation_id = reserved.reservation.id
        if key in load.reservations:  # pragma: no cover - keys are unique per worker
            raise AssertionError(f"key {key} used twice")
        load.reservations[key] = reservation_id
        done = await retried(
            load,
            f"Commit {key}",
            lambda rid=reservation_id, amount=amount: api.budget.Commit(
                pb.CommitRequest(reservation_id=rid, amount=amount), timeout=CALL_S
            ),
        )
        assert isinstance(done, pb.CommitResponse)
        assert done.charged == amount, (key, done)
        load.committed[key] = done.charged
        i += 1


@pytest.fixture
async def budgetd_on_postgres() -> object:
    async with fresh_postgres() as url:
        server = await start_server_process(url)
        try:
            yield server
        finally:
            if server.process.returncode is None:
                server.kill()
                await server.process.wait()


async def test_budgetd_rides_out_a_postgres_restart(budgetd_on_postgres: ServerProcess) -> None:
    budgetd = budgetd_on_postgres
    version, name = cluster()
    print("\n" + await run("pg_lsclusters"))
    load = Load()
    stop = asyncio.Event()
    outages_s: list[float] = []
    async with stubs(budgetd.address) as api:
        await create(api, BUDGET, 10**12)
        workers = [asyncio.create_task(worker(api, n, load, stop)) for n in range(WORKERS)]
        try:
            for _ in range(CYCLES):
                await asyncio.sleep(LOAD_BEFORE_S)
                before = len(load.committed)
                assert before > 0, "no load before the restart"
                started = time.monotonic()
                await run("pg_ctlcluster", "--skip-systemctl-redirect", version, name, "restart")
                await wait_for_postgres()
                outages_s.append(time.monotonic() - started)
            await asyncio.sleep(LOAD_BEFORE_S)
            stop.set()
            await asyncio.gather(*workers)
        finally:
            stop.set()
            for task in workers:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(*workers, return_exceptions=True)
            # Whatever happened, PostgreSQL must be back for everyone else's tests.
            await wait_for_postgres()

        assert budgetd.process.returncode is None, "budgetd died"
        # Every key reserved once and committed once; nothing else in the ledger.
        assert set(load.committed) == set(load.reservations)
        listed = await api.admin.ListReservations(
            pb.ListReservationsRequest(budget_id=BUDGET, page_size=1000)
        )
        reservations = list(listed.reservations)
        token = listed.next_page_token
        while token:
            page = await api.admin.ListReservations(
                pb.ListReservationsRequest(budget_id=BUDGET, page_size=1000, page_token=token)
            )
            reservations.extend(page.reservations)
            token = page.next_page_token
        by_key = {r.idempotency_key: r for r in reservations}
        assert len(by_key) == len(reservations) == len(load.reservations)
        for key, reservation_id in load.reservations.items():
            found = by_key[key]
            assert found.id == reservation_id
            assert found.state == pb.RESERVATION_STATE_COMMITTED
            assert found.charged == load.committed[key]
        entries = await all_entries(api, BUDGET)
        commits = Counter(e.reservation_id for e in entries if e.kind == pb.ENTRY_KIND_COMMIT)
        reserves = Counter(e.reservation_id for e in entries if e.kind == pb.ENTRY_KIND_RESERVE)
        assert set(commits) == set(reserves) == set(load.reservations.values())
        assert set(commits.values()) == set(reserves.values()) == {1}
        budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id=BUDGET))).budget
        assert (budget.spent, budget.reserved) == (sum(load.committed.values()), 0)
        await assert_ledger_clean(api)
    summary = (
        f"postgres restart: {CYCLES} restarts (outages {[round(s, 2) for s in outages_s]} s), "
        f"{len(load.committed)} reserve+commit by {WORKERS} clients, failures "
        f"{dict(load.failures)}, longest retried operation {load.retries_max_s:.2f} s"
    )
    print(summary)
    # Last, so that a failure here has shown the ledger exact all the same.
    assert set(load.failures) <= {"UNAVAILABLE"}, (summary, load.failure_details)
