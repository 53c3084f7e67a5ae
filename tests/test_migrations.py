"""The Alembic migrations build exactly the schema the code declares, on both backends."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from budget_server.db.engine import open_database
from budget_server.db.migrate import current_revision, migrations_dir, upgrade_to_head
from budget_server.db.schema import metadata


def _diff(connection: Any) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrated_schema_matches_the_declared_tables(db_url: str) -> None:
    db = open_database(db_url)
    try:
        await upgrade_to_head(db)
        await upgrade_to_head(db)  # idempotent: a restarted server migrates again
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            head = await conn.run_sync(current_revision)
        newest = max(p.name.split("_")[0] for p in migrations_dir().glob("versions/0*.py"))
        assert head == newest
    finally:
        await db.close()
