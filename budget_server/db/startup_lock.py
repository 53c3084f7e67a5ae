"""One process at a time through the start-up steps that write to an empty database.

Replicas share one PostgreSQL database and a deployment starts them together. Each
migrates the schema, seeds the price table when it is empty and makes the first admin key
when there is none: each a check, then a write. Two processes doing them at once both
find the database empty: one fails to start (Alembic's `CREATE TABLE` or the seed's
insert hits the other's rows) or there are two admin keys. So the steps run under a
PostgreSQL advisory lock, held by a connection of its own; the next process waits for it
and finds the work done. The lock is the session's: a process that dies while holding it
releases it with its connection.

A SQLite database is served by one process (docs/operations.md): nothing is taken there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from sqlalchemy import text

from budget_server.db.engine import Database

log = logging.getLogger("budgetd.start")

# Any 64-bit number other applications on the same database are unlikely to use: the
# first eight bytes of "budgetd\0" read as a big-endian integer.
STARTUP_LOCK_KEY = int.from_bytes(b"budgetd\0", "big", signed=True)


@contextlib.asynccontextmanager
async def startup_lock(db: Database) -> AsyncIterator[None]:
    """Hold the database's start-up lock for the `async with` block (PostgreSQL only)."""
    if db.engine.dialect.name != "postgresql":
        yield
        return
    key = {"key": STARTUP_LOCK_KEY}
    async with db.engine.connect() as conn:
        taken = (await conn.execute(text("SELECT pg_try_advisory_lock(:key)"), key)).scalar()
        if not taken:
            log.info("waiting for another budgetd process to finish starting on this database")
            await conn.execute(text("SELECT pg_advisory_lock(:key)"), key)
        await conn.commit()  # the lock is the session's; no transaction stays open
        try:
            yield
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), key)
            await conn.commit()
