"""Fixtures: a real budgetd on a loopback port over a fresh SQLite file or PostgreSQL database."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.config import ServerConfig
from tests.support.databases import fresh_database, fresh_postgres
from tests.support.servers import Stubs, stubs

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    async with fresh_database(backend, tmp_path) as url:
        yield url


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database, for tests that only make sense there (several servers)."""
    async with fresh_postgres() as url:
        yield url


@pytest.fixture
def clock() -> ManualClock:
    """Starts at the real time; moves only when the test moves it."""
    return ManualClock(time.time_ns() // 1000)


@pytest.fixture
async def server(db_url: str, clock: ManualClock) -> AsyncIterator[BudgetServer]:
    # Ledger tests run without API keys (loopback only); tests/test_auth.py covers keys.
    config = ServerConfig(listen="127.0.0.1:0", db_url=db_url, sweep_interval_s=0.05, insecure=True)
    async with BudgetServer(config, clock=clock) as running:
        yield running


@pytest.fixture
async def secured(db_url: str, tmp_path: Path) -> AsyncIterator[tuple[BudgetServer, str]]:
    """budgetd with API keys on, as in production: its first admin key is written to
    budgetd-admin.key in tmp_path (where budgetctl run there finds it); yields the server
    and that key."""
    key_file = tmp_path / "budgetd-admin.key"
    config = ServerConfig(listen="127.0.0.1:0", db_url=db_url, admin_key_file=str(key_file))
    async with BudgetServer(config) as server:
        assert server.admin_key_path == key_file
        yield server, key_file.read_text().strip()


@pytest.fixture
async def api(server: BudgetServer) -> AsyncIterator[Stubs]:
    async with stubs(server.address) as connected:
        yield connected
