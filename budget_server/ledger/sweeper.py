"""Ends reservations whose time has passed, as DESIGN.md says: charged at the last usage
the server knows of, released when none was reported.

Any number of server processes may sweep at once: each expiry goes through the budget's
actor and leaves PENDING by a conditional update, so it happens exactly once.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import Select, select

from budget_server.clock import Clock
from budget_server.db.schema import PENDING, reservations
from budget_server.errors import FailedPrecondition, LedgerError, NotFound
from budget_server.ledger.ledger import Ledger
from budget_server.ledger.model import ExpireOp
from budget_server.limits import SWEEP_BATCH_MAX

log = logging.getLogger("budgetd.sweeper")


def due_reservations(now_us: int) -> Select[tuple[str]]:
    """The oldest open reservations past their expiry: read from the index of open
    reservations only (`schema.PENDING`), however long the history grows."""
    return (
        select(reservations.c.id)
        .where(PENDING, reservations.c.expires_at_us <= now_us)
        .order_by(reservations.c.expires_at_us)
        .limit(SWEEP_BATCH_MAX)
    )


async def sweep_once(ledger: Ledger, clock: Clock) -> int:
    """Expire what is due now; return how many reservations this call ended."""
    async with ledger.db.read() as conn:
        rows = (await conn.execute(due_reservations(clock.now_us()))).all()
    results = await asyncio.gather(
        *(ledger.expire(ExpireOp(reservation_id=row.id, actor="sweeper")) for row in rows),
        return_exceptions=True,
    )
    ended = 0
    for row, result in zip(rows, results, strict=True):
        if isinstance(result, FailedPrecondition | NotFound):
            continue  # finished or extended meanwhile, perhaps by another process
        if isinstance(result, LedgerError):
            log.warning("could not expire reservation %s: %s", row.id, result)
        elif isinstance(result, BaseException):
            log.error("expiring reservation %s failed", row.id, exc_info=result)
        else:
            ended += 1
            log.info(
                "reservation expired",
                extra={
                    "reservation_id": row.id,
                    "budget_id": result.reservation.budget_id,
                    "charged": result.charged,
                },
            )
    return ended


async def run_sweeper(ledger: Ledger, clock: Clock, interval_s: float) -> None:
    """Sweep forever, every interval_s; survives database outages."""
    while True:
        try:
            await sweep_once(ledger, clock)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("expiry sweep failed; retrying in %.1f s", interval_s)
        await asyncio.sleep(interval_s)
