"""One budget event, as it travels between processes (JSON) and to clients (protobuf)."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass

from budget_client._proto.budgetd.v1 import budget_pb2 as pb

KINDS = (
    "RESERVED",
    "COMMITTED",
    "RELEASED",
    "EXPIRED",
    "REFUSED",
    "ABORTED",
    "ALERT",
    "LIMIT_CHANGED",
    "FROZEN",
    "UNFROZEN",
    "DELETED",
)
KIND_VALUES: dict[str, pb.BudgetEventKind.ValueType] = {
    name: pb.BudgetEventKind.Value(f"BUDGET_EVENT_KIND_{name}") for name in KINDS
}
KIND_NAMES = {value: name for name, value in KIND_VALUES.items()}


def new_event_id() -> str:
    return "ev_" + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class BudgetEvent:
    """Something that happened to a budget. `id` is stable: receivers de-duplicate on it."""

    id: str
    kind: str
    budget_id: str
    at_us: int
    reservation_id: str = ""
    amount: int = 0
    threshold_pct: int = 0
    spent: int = 0
    limit: int = 0
    message: str = ""

    def to_pb(self) -> pb.BudgetEvent:
        return pb.BudgetEvent(
            id=self.id,
            kind=KIND_VALUES[self.kind],
            budget_id=self.budget_id,
            at_us=self.at_us,
            reservation_id=self.reservation_id,
            amount=self.amount,
            threshold_pct=self.threshold_pct,
            spent=self.spent,
            limit=self.limit,
            message=self.message,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BudgetEvent:
        return cls(**json.loads(text))
