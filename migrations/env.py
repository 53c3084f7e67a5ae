"""Alembic environment: budgetd passes an open connection in `config.attributes`.

`budgetd serve` migrates on start through budget_server.db.migrate; the `alembic`
command line is not needed, so there is no alembic.ini.
"""

from __future__ import annotations

from alembic import context

from budget_server.db.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through budget_server.db.migrate.upgrade_to_head()")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
