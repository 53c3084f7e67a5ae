"""Several budgetd processes started at once on one new PostgreSQL database.

Operators run replicas on one database, and a deployment starts them together; each
migrates the schema, seeds the price table and, on a database without keys, makes the
first admin key as it starts. Done by each on its own, two would both find the database
empty and both write: a failed start (duplicate table, duplicate price) or two admin keys.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select

from budget_server.db.engine import open_database
from budget_server.db.migrate import current_revision, migrations_dir
from budget_server.db.schema import api_keys, prices
from budget_server.pricing.store import shipped_table
from tests.support.servers import ServerProcess, start_server_process

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPLICAS = 4


async def test_replicas_started_together_share_one_schema_price_table_and_admin_key(
    postgres_url: str, tmp_path: Path
) -> None:
    key_files = [tmp_path / f"replica-{i}.key" for i in range(REPLICAS)]
    starting = [
        start_server_process(postgres_url, "--admin-key-file", str(path), insecure=False)
        for path in key_files
    ]
    outcomes = await asyncio.gather(*starting, return_exceptions=True)
    started = [o for o in outcomes if isinstance(o, ServerProcess)]
    try:
        assert len(started) == REPLICAS, [o for o in outcomes if isinstance(o, BaseException)]
        written = [path for path in key_files if path.exists()]
        assert len(written) == 1, written  # one replica made the key; the others found it
        db = open_database(postgres_url)
        try:
            async with db.engine.connect() as conn:
                head = await conn.run_sync(current_revision)
                count = select(func.count())
                key_count = (await conn.execute(count.select_from(api_keys))).scalar()
                price_count = (await conn.execute(count.select_from(prices))).scalar()
        finally:
            await db.close()
        assert head == max(p.name.split("_")[0] for p in migrations_dir().glob("versions/0*.py"))
        assert key_count == 1
        assert price_count == len(shipped_table().prices)
    finally:
        for server in started:
            server.kill()
            await server.process.wait()
