"""Fresh databases per test: a new SQLite file, or a new PostgreSQL database.

With CI=true an unreachable PostgreSQL fails the test instead of skipping it, so CI
cannot pass by silently testing SQLite only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

PG_HOST = os.environ.get("BUDGETD_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BUDGETD_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("BUDGETD_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("BUDGETD_TEST_PG_DB", "test")


async def _admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=5
        )
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL at {PG_HOST}:{PG_PORT}/{PG_ADMIN_DB} is unreachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the PostgreSQL tests must run)")
        pytest.skip(message)


@asynccontextmanager
async def fresh_postgres() -> AsyncIterator[str]:
    """A new, empty database; dropped afterwards (with any connections left to it)."""
    name = f"budgetd_t_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin = await _admin_connection()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def fresh_database(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'budgetd.db'}"
        return
    async with fresh_postgres() as url:
        yield url
