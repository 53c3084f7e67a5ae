"""The garbage collector, set for a long-running server that allocates per message.

Every gRPC message, ledger operation and coroutine allocates container objects, so with
CPython's default gen-0 threshold (700) the collector ran every few requests, and each
older-generation pass walked every object alive since startup (modules, SQLAlchemy's
tables, compiled statements). Once serving, those are frozen out of the collector's view
(`gc.freeze`) and gen 0 is collected every GC_GEN0_THRESHOLD allocations instead: a
request's objects mostly die with it by reference count, so a collection finds the rare
cycle, and finding it later costs memory in proportion to the threshold only.

Measured with metered requests through gRPC (measure 2 of bench.run, SQLite, 3 paired
runs): +9-13 % requests/s on many budgets and on one hot budget; thresholds of 10,000 and
50,000 did the same, freezing or not within 3 %, so the smaller threshold is kept.
"""

from __future__ import annotations

import gc

GC_GEN0_THRESHOLD = 10_000
GC_OLDER_THRESHOLD = 20  # gen-0 (then gen-1) collections before the next older one


def tune_for_serving() -> None:
    """Freeze what startup allocated and collect gen 0 less often; call once, serving.

    Process-wide, so only `budgetd serve` calls it, not a BudgetServer embedded in an
    application or a test."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)
