"""SQL storage: schema, engine set-up, migrations."""
