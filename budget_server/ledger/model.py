"""In-memory views of ledger rows, and the operations an actor applies to them."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from budget_server.ledger.usage import ZERO_USAGE, Usage

RESERVATION_STATES = ("PENDING", "COMMITTED", "RELEASED", "EXPIRED")
ENTRY_KINDS = ("RESERVE", "EXTEND", "COMMIT", "RELEASE", "EXPIRE", "ROLLOVER", "ADJUST", "LIMIT")
MODES = ("HARD", "SOFT")


@dataclass(slots=True)
class BudgetState:
    """One budget row as a transaction sees and changes it."""

    id: str
    parent_id: str | None
    depth: int
    unit: str
    limit: int
    period: str
    time_zone: str
    mode: str
    thresholds_pct: tuple[int, ...]
    frozen: bool
    spent: int
    reserved: int
    overage: int
    window_start_us: int
    created_at_us: int
    updated_at_us: int
    alerted_pct: int = 0  # highest threshold already fired in this window
    # The figures as read, for the compare-and-set that writes them back.
    read_figures: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    @property
    def figures(self) -> tuple[int, int, int, int, int]:
        return (self.spent, self.reserved, self.overage, self.window_start_us, self.alerted_pct)

    @property
    def available(self) -> int:
        return max(0, self.limit - self.spent - self.reserved)

    @property
    def changed(self) -> bool:
        return self.figures != self.read_figures

    @classmethod
    def from_row(cls, row: Any) -> BudgetState:
        state = cls(
            id=row.id,
            parent_id=row.parent_id,
            depth=row.depth,
            unit=row.unit,
            limit=row.limit_amount,
            period=row.period,
            time_zone=row.time_zone,
            mode=row.mode,
            thresholds_pct=parse_thresholds(row.alert_thresholds),
            frozen=bool(row.frozen),
            spent=row.spent,
            reserved=row.reserved,
            overage=row.overage,
            window_start_us=row.window_start_us,
            created_at_us=row.created_at_us,
            updated_at_us=row.updated_at_us,
            alerted_pct=row.alerted_pct,
        )
        state.read_figures = state.figures
        return state


@functools.lru_cache(maxsize=1024)
def parse_thresholds(text: str) -> tuple[int, ...]:
    """Cached: every batch reads its budgets' rows, and budgets share a few settings."""
    return tuple(int(part) for part in text.split(",") if part)


def labels_json(labels: Mapping[str, str]) -> str:
    """Labels as stored; most operations have none, and dumping `{}` costs a JSON encoder."""
    return json.dumps(labels, sort_keys=True) if labels else "{}"


def labels_from_json(text: str) -> dict[str, str]:
    """Stored labels; most are `{}`, which needs no JSON decoder."""
    labels: dict[str, str] = json.loads(text) if text != "{}" else {}
    return labels


def format_thresholds(thresholds_pct: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(t) for t in thresholds_pct)


@dataclass(slots=True)
class ReservationState:
    """One reservation and its holds on each budget of its chain."""

    id: str
    budget_id: str
    state: str
    idempotency_key: str | None
    model: str
    labels: dict[str, str]
    usage: Usage
    grant: Usage  # the token shape a meter hold was priced from; zero for plain reservations
    charged: int
    overage: int
    expires_at_us: int
    created_at_us: int
    finished_at_us: int
    holds: dict[str, int] = field(default_factory=dict)  # budget id -> held, own unit
    charges: dict[str, int] = field(default_factory=dict)  # budget id -> charged, once final
    is_new: bool = False
    read_state: str = "PENDING"
    usage_changed: bool = False
    holds_changed: bool = False  # holds or grant
    expiry_changed: bool = False

    @property
    def granted(self) -> int:
        return self.holds.get(self.budget_id, 0)


@dataclass(frozen=True, slots=True)
class EntryDraft:
    """A ledger entry to append."""

    budget_id: str
    kind: str
    amount: int
    spent_delta: int = 0
    reserved_delta: int = 0
    overage_delta: int = 0
    reservation_id: str | None = None
    usage: Usage = ZERO_USAGE
    model: str = ""
    labels: str = "{}"
    actor: str = "api"


# ----------------------------------------------------------------------------- operations


@dataclass(slots=True, kw_only=True)
class Op:
    """An operation queued on a budget's actor; the actor resolves `future`."""

    actor: str = "api"
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(slots=True, kw_only=True)
class ReserveOp(Op):
    budget_id: str
    amount: int  # in the budget's unit; 0 when an estimate is given
    estimate: Usage | None
    model: str
    ttl_ms: int
    idempotency_key: str | None
    labels: dict[str, str]
    # Meter streams: grant as much output as fits between these bounds (input from estimate),
    # so a stream near the limit gets exactly what is left instead of a refusal.
    output_range: tuple[int, int] | None = None


@dataclass(slots=True, kw_only=True)
class ChargeOp(Op):
    """Usage that already happened, recorded without a grant (spool replays)."""

    budget_id: str
    usage: Usage | None
    amount: int
    model: str
    idempotency_key: str
    labels: dict[str, str]


@dataclass(slots=True, kw_only=True)
class ExtendOp(Op):
    reservation_id: str
    amount: int
    estimate: Usage | None
    ttl_ms: int
    usage: Usage | None = None  # persisted with the grant change (meter streams)
    # Meter streams: grow the grant to this token shape, or as far towards it as fits but
    # at least to output_floor; refused (BudgetExhausted) only below the floor.
    grant_target: Usage | None = None
    output_floor: int = 0


@dataclass(slots=True, kw_only=True)
class CommitOp(Op):
    reservation_id: str
    usage: Usage | None
    amount: int


@dataclass(slots=True, kw_only=True)
class ReleaseOp(Op):
    reservation_id: str


@dataclass(slots=True, kw_only=True)
class ExpireOp(Op):
    """Sent by the sweeper: end a PENDING reservation whose time has passed."""

    reservation_id: str


@dataclass(slots=True, kw_only=True)
class RecordUsageOp(Op):
    """Persist a reservation's last usage and push its expiry (meter checkpoints, resumes)."""

    reservation_id: str
    usage: Usage | None
    ttl_ms: int = 0


@dataclass(frozen=True, slots=True)
class BudgetView:
    """A budget's figures as returned to callers."""

    id: str
    parent_id: str | None
    unit: str
    limit: int
    period: str
    time_zone: str
    mode: str
    thresholds_pct: tuple[int, ...]
    frozen: bool
    spent: int
    reserved: int
    overage: int
    window_start_us: int
    window_end_us: int
    created_at_us: int
    updated_at_us: int

    @property
    def available(self) -> int:
        return max(0, self.limit - self.spent - self.reserved)


@dataclass(frozen=True, slots=True)
class ReservationView:
    id: str
    budget_id: str
    state: str
    granted: int
    usage: Usage
    grant: Usage
    charged: int
    overage: int
    expires_at_us: int
    idempotency_key: str
    model: str
    labels: dict[str, str]
    created_at_us: int
    finished_at_us: int


@dataclass(frozen=True, slots=True)
class OpResult:
    """What every ledger operation returns: the reservation and its budget afterwards."""

    reservation: ReservationView
    budget: BudgetView
    replayed: bool = False
    charged: int = 0
    overage: int = 0
    chain: tuple[BudgetView, ...] = ()  # root-first, the reservation's budget last
