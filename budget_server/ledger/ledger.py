"""The ledger's front door: validated operations in, routed to the right budget's actor."""

from __future__ import annotations

import asyncio
import collections

from sqlalchemy import select

from budget_server.clock import Clock
from budget_server.db.engine import Database
from budget_server.db.schema import reservations
from budget_server.errors import NotFound
from budget_server.events.bus import EventBus
from budget_server.events.publisher import EventPublisher
from budget_server.ledger.actors import BudgetActor
from budget_server.ledger.chains import ChainCache
from budget_server.ledger.group import GroupCounts, PostgresGroups, SqliteGroups
from budget_server.ledger.model import (
    ChargeOp,
    CommitOp,
    ExpireOp,
    ExtendOp,
    Op,
    OpResult,
    RecordUsageOp,
    ReleaseOp,
    ReserveOp,
)
from budget_server.ledger.outcomes import OutcomeReporter
from budget_server.metrics import Metrics

RESERVATION_CACHE_MAX = 100_000


class Ledger:
    """Routes each operation to its budget's actor and awaits the committed result."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.events = events or EventBus()
        self.metrics = metrics or Metrics()
        self.publisher = EventPublisher(self.events, cross_process=not db.is_sqlite)
        self.outcomes = OutcomeReporter(self.events, clock, self.metrics)
        # Batches of many budgets that wait at the same moment share a transaction.
        self.groups: GroupCounts | None = None
        self._pg_groups: PostgresGroups | None = None
        if db.sqlite_writer is not None:
            db.sqlite_writer.runner = self.groups = SqliteGroups()
        elif db.raw_postgres:
            self.groups = self._pg_groups = PostgresGroups(db.engine)
        self._actors: dict[str, BudgetActor] = {}
        self._chains = ChainCache(db)
        # reservation id -> budget id, so Commit/Release skip a lookup for recent reservations
        self._owners: collections.OrderedDict[str, str] = collections.OrderedDict()

    # ------------------------------------------------------------------ routing

    async def chain_of(self, budget_id: str) -> tuple[str, ...]:
        """The budget and its ancestors, root-first (`chains.ChainCache`)."""
        return await self._chains.chain_of(budget_id)

    def forget_budget(self, budget_id: str) -> None:
        self._chains.forget(budget_id)

    async def owner_of(self, reservation_id: str) -> str:
        if (owner := self._owners.get(reservation_id)) is not None:
            return owner
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(reservations.c.budget_id).where(reservations.c.id == reservation_id)
                )
            ).first()
        if row is None:
            raise NotFound(f"reservation {reservation_id!r} does not exist")
        self._remember_owner(reservation_id, row.budget_id)
        return str(row.budget_id)

    def _remember_owner(self, reservation_id: str, budget_id: str) -> None:
        self._owners[reservation_id] = budget_id
        if len(self._owners) > RESERVATION_CACHE_MAX:
            self._owners.popitem(last=False)

    async def _submit(self, budget_id: str, op: Op) -> OpResult:
        actor = self._actors.get(budget_id)
        if actor is None:
            chain = await self.chain_of(budget_id)
            actor = self._actors.get(budget_id)  # another caller may have made it meanwhile
            if actor is None:
                actor = BudgetActor(
                    budget_id,
                    chain,
                    self.db,
                    self.clock.now_us,
                    self._idle,
                    self.publisher,
                    self.outcomes.observe,
                    self.metrics,
                    self._pg_groups,
                )
                self._actors[budget_id] = actor
        actor.submit(op)
        result: OpResult = await op.future
        self._remember_owner(result.reservation.id, budget_id)
        return result

    def _idle(self, actor: BudgetActor) -> None:
        if self._actors.get(actor.budget_id) is actor:
            del self._actors[actor.budget_id]

    async def drain(self) -> None:
        """Wait for every queued operation to be applied (graceful shutdown)."""
        while self._actors:
            await asyncio.gather(*(actor.join() for actor in list(self._actors.values())))

    @property
    def active_actors(self) -> int:
        return len(self._actors)

    # ------------------------------------------------------------------ operations

    async def reserve(self, op: ReserveOp) -> OpResult:
        with self.metrics.grant_seconds.time():
            return await self._submit(op.budget_id, op)

    async def charge(self, op: ChargeOp) -> OpResult:
        return await self._submit(op.budget_id, op)

    async def extend(self, op: ExtendOp) -> OpResult:
        with self.metrics.grant_seconds.time():
            return await self._submit(await self.owner_of(op.reservation_id), op)

    async def commit(self, op: CommitOp) -> OpResult:
        return await self._submit(await self.owner_of(op.reservation_id), op)

    async def release(self, op: ReleaseOp) -> OpResult:
        return await self._submit(await self.owner_of(op.reservation_id), op)

    async def expire(self, op: ExpireOp) -> OpResult:
        return await self._submit(await self.owner_of(op.reservation_id), op)

    async def record_usage(self, op: RecordUsageOp) -> OpResult:
        return await self._submit(await self.owner_of(op.reservation_id), op)
