"""The budget ledger: budgets, reservations, entries, and the actors that serialise them."""
