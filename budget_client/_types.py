"""Plain values the client returns, free of protobuf, so apps need not import generated code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from budget_client._proto.budgetd.v1 import budget_pb2 as pb

UnitName = Literal["TOKENS", "USD"]
ReservationStateName = Literal["PENDING", "COMMITTED", "RELEASED", "EXPIRED"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one LLM call; cached input is part of input, reasoning part of output."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_pb(self) -> pb.Usage:
        return pb.Usage(
            input_tokens=self.input_tokens,
            cached_input_tokens=self.cached_input_tokens,
            output_tokens=self.output_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )

    @classmethod
    def from_pb(cls, message: pb.Usage) -> Usage:
        return cls(
            input_tokens=message.input_tokens,
            cached_input_tokens=message.cached_input_tokens,
            output_tokens=message.output_tokens,
            reasoning_tokens=message.reasoning_tokens,
        )


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget's figures for its current window, in its unit (tokens or nano-dollars)."""

    id: str
    parent_id: str
    unit: UnitName
    limit: int
    spent: int
    reserved: int
    available: int
    overage: int
    frozen: bool
    mode: Literal["HARD", "SOFT"]

    @classmethod
    def from_pb(cls, message: pb.Budget) -> Budget:
        return cls(
            id=message.id,
            parent_id=message.parent_id,
            unit="USD" if message.unit == pb.UNIT_USD else "TOKENS",
            limit=message.limit,
            spent=message.spent,
            reserved=message.reserved,
            available=message.available,
            overage=message.overage,
            frozen=message.frozen,
            mode="SOFT" if message.mode == pb.MODE_SOFT else "HARD",
        )


_STATES: dict[int, ReservationStateName] = {
    pb.RESERVATION_STATE_PENDING: "PENDING",
    pb.RESERVATION_STATE_COMMITTED: "COMMITTED",
    pb.RESERVATION_STATE_RELEASED: "RELEASED",
    pb.RESERVATION_STATE_EXPIRED: "EXPIRED",
}


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on a budget (and its ancestors) until committed, released or expired."""

    id: str
    budget_id: str
    state: ReservationStateName
    granted: int
    charged: int
    overage: int
    usage: Usage
    expires_at_us: int
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, message: pb.Reservation) -> Reservation:
        return cls(
            id=message.id,
            budget_id=message.budget_id,
            state=_STATES.get(message.state, "PENDING"),
            granted=message.granted,
            charged=message.charged,
            overage=message.overage,
            usage=Usage.from_pb(message.usage),
            expires_at_us=message.expires_at_us,
            labels=dict(message.labels),
        )


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of a commit: what was charged, how much of it beyond the grant."""

    reservation: Reservation
    charged: int
    overage: int
    budget: Budget | None
    spooled: bool = False  # budgetd was unreachable: recorded locally, replayed later
    replayed: bool = False  # already committed: the first commit's result; this one's usage unused
