"""What each ledger operation ended as, told to the log and to watchers.

One log line per reservation outcome (granted, refused, committed, released, expired),
and, only while someone watches, a BudgetEvent for each. Runs after the batch's
transaction has committed, so nothing reported here can still roll back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from budget_server.clock import Clock
from budget_server.errors import BudgetExhausted, LedgerError
from budget_server.events.bus import EventBus
from budget_server.events.model import BudgetEvent, new_event_id
from budget_server.ledger.model import (
    ChargeOp,
    CommitOp,
    ExpireOp,
    ExtendOp,
    Op,
    OpResult,
    ReleaseOp,
    ReserveOp,
)
from budget_server.metrics import Metrics

log = logging.getLogger("budgetd.ledger")

_OUTCOME_OF_KIND = {
    "RESERVED": "granted",
    "COMMITTED": "committed",
    "RELEASED": "released",
    "EXPIRED": "expired",
}

_KIND_OF_OP: dict[type[Op], str] = {
    ReserveOp: "RESERVED",
    ExtendOp: "RESERVED",
    CommitOp: "COMMITTED",
    ChargeOp: "COMMITTED",
    ReleaseOp: "RELEASED",
    ExpireOp: "EXPIRED",
}


class OutcomeReporter:
    def __init__(self, bus: EventBus, clock: Clock, metrics: Metrics) -> None:
        self._bus = bus
        self._clock = clock
        self._metrics = metrics

    def observe(
        self, ops: Sequence[Op], results: Sequence[OpResult | LedgerError | BaseException]
    ) -> None:
        logging_info = log.isEnabledFor(logging.INFO)
        watched = self._bus.has_subscribers
        now_us = self._clock.now_us()
        metrics = self._metrics
        for op, result in zip(ops, results, strict=True):
            kind = _KIND_OF_OP.get(type(op))
            if kind is None:
                continue
            if isinstance(result, OpResult):
                if not result.replayed and not isinstance(op, ExtendOp):
                    metrics.count_outcome(_OUTCOME_OF_KIND[kind])
                for budget in result.chain:
                    metrics.set_utilisation(budget.id, budget.spent, budget.limit)
                if not (logging_info or watched):
                    continue
                self._granted_or_settled(op, kind, result, now_us, logging_info, watched)
            elif isinstance(result, BudgetExhausted) and isinstance(op, ReserveOp | ExtendOp):
                metrics.count_outcome("refused")
                if logging_info:
                    log.info(
                        "reservation refused",
                        extra={
                            "budget_id": result.budget_id,
                            "requested": result.requested,
                            "available": result.available,
                            "actor": op.actor,
                        },
                    )
                if watched:
                    self._bus.publish(
                        BudgetEvent(
                            id=new_event_id(),
                            kind="REFUSED",
                            budget_id=result.budget_id,
                            at_us=now_us,
                            amount=result.requested,
                            message=str(result),
                        )
                    )

    def _granted_or_settled(
        self, op: Op, kind: str, result: OpResult, now_us: int, logging_info: bool, watched: bool
    ) -> None:
        if result.replayed:
            return
        reservation = result.reservation
        amount = reservation.granted if kind == "RESERVED" else result.charged
        if logging_info and not isinstance(op, ExtendOp):  # a grant's growth is no outcome
            log.info(
                f"reservation {kind.lower()}",
                extra={
                    "reservation_id": reservation.id,
                    "budget_id": reservation.budget_id,
                    "amount": amount,
                    "overage": result.overage,
                    "model": reservation.model,
                    "actor": op.actor,
                },
            )
        if watched:
            self._bus.publish(
                BudgetEvent(
                    id=new_event_id(),
                    kind=kind,
                    budget_id=reservation.budget_id,
                    at_us=now_us,
                    reservation_id=reservation.id,
                    amount=amount,
                    spent=result.budget.spent,
                    limit=result.budget.limit,
                )
            )
