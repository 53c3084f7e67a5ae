"""Model prices: the table that ships with budgetd, LiteLLM's format, and the prices SQL table.

    litellm   LiteLLM's price file -> exact prices (no SQLAlchemy: budgetctl and
              scripts/update_prices.py import it)
    store     the `prices` table: seeding from prices.json, set, list, import, delete

Nothing is re-exported here, so importing the converter does not import the database layer.
"""
