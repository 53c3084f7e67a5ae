"""What the fuzz test expects of the ledger: budgets, reservations and their figures.

The model follows DESIGN.md ("The ledger") rather than the server's code: a grant must fit
every HARD budget of the chain, root-first; commit charges the actual amount even above the
grant and releases the rest; release charges nothing; expiry charges the last usage the
server knows of; a replayed call changes nothing. All fuzzed budgets count TOKENS, so a
reservation holds and is charged the same amount on every budget of its chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.limits import AMOUNT_MAX, INT64_MAX

PENDING = "PENDING"
COMMITTED = "COMMITTED"
RELEASED = "RELEASED"
EXPIRED = "EXPIRED"

STATE_VALUES = {
    PENDING: pb.RESERVATION_STATE_PENDING,
    COMMITTED: pb.RESERVATION_STATE_COMMITTED,
    RELEASED: pb.RESERVATION_STATE_RELEASED,
    EXPIRED: pb.RESERVATION_STATE_EXPIRED,
}


@dataclass
class ModelBudget:
    id: str
    parent_id: str | None
    hard: bool
    limit: int
    depth: int
    frozen: bool = False
    spent: int = 0
    reserved: int = 0
    overage: int = 0

    @property
    def available(self) -> int:
        return max(0, self.limit - self.spent - self.reserved)

    def figures(self) -> tuple[int, int, int, int, bool]:
        return (self.limit, self.spent, self.reserved, self.overage, self.frozen)


@dataclass
class ModelReservation:
    id: str
    budget_id: str
    chain: tuple[str, ...]  # root-first
    state: str
    hold: int  # the same on every budget of the chain (all TOKENS)
    expires_at_us: int
    key: str = ""
    charged: int = 0
    usage: tuple[int, int] = (0, 0)  # (input, output) the server has on record
    grant: tuple[int, int] = (0, 0)  # meter grant shape (input, output); zero when plain
    live: bool = False  # a meter stream of this test owns it now
    made_by_charge: bool = False  # its idempotency key replays a Charge, never a Reserve


@dataclass(frozen=True)
class Refusal:
    code: str  # a grpc.StatusCode name
    budget_id: str


@dataclass
class LedgerModel:
    budgets: dict[str, ModelBudget] = field(default_factory=dict)
    reservations: dict[str, ModelReservation] = field(default_factory=dict)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (budget, key) -> res

    def chain(self, budget_id: str) -> tuple[str, ...]:
        ids: list[str] = []
        current: str | None = budget_id
        while current is not None:
            ids.append(current)
            current = self.budgets[current].parent_id
        return tuple(reversed(ids))

    def out_of_bounds(self, chain: tuple[str, ...], amount: int) -> Refusal | None:
        """An amount no ledger figure can take: above AMOUNT_MAX, or pushing spent +
        reserved past int64 (checked on every budget of the chain before anything else)."""
        for budget_id in chain:
            budget = self.budgets[budget_id]
            if amount > AMOUNT_MAX or budget.spent + budget.reserved + amount > INT64_MAX:
                return Refusal("INVALID_ARGUMENT", budget_id)
        return None

    def refusal(self, chain: tuple[str, ...], amount: int) -> Refusal | None:
        """Why a grant of `amount` on every budget of `chain` is refused, or None."""
        if (bad := self.out_of_bounds(chain, amount)) is not None:
            return bad
        for budget_id in chain:  # root-first: the highest refusing budget is named
            budget = self.budgets[budget_id]
            if budget.frozen:
                return Refusal("FAILED_PRECONDITION", budget_id)
            if budget.hard and amount > budget.limit - budget.spent - budget.reserved:
                return Refusal("RESOURCE_EXHAUSTED", budget_id)
        return None

    def meter_grant(self, chain: tuple[str, ...], prompt: int, high: int) -> Refusal | int:
        """The output tokens a meter open is granted: as many of `high` as every budget can
        cover, at least one; or why none can be."""
        if (refused := self.refusal(chain, prompt + 1)) is not None:
            return refused
        output = high
        for budget_id in chain:
            budget = self.budgets[budget_id]
            room = min(AMOUNT_MAX, INT64_MAX - budget.spent - budget.reserved)
            if budget.hard:
                room = min(room, budget.limit - budget.spent - budget.reserved)
            output = min(output, room - prompt)
        return output

    def hold(self, res: ModelReservation, amount: int) -> None:
        for budget_id in res.chain:
            self.budgets[budget_id].reserved += amount
        res.hold += amount

    def finish(self, res: ModelReservation, charge: int, state: str) -> None:
        """Commit, release or expire a PENDING reservation."""
        assert res.state == PENDING
        for budget_id in res.chain:
            budget = self.budgets[budget_id]
            budget.reserved -= res.hold
            budget.spent += charge
            budget.overage += max(0, charge - res.hold)
        res.state = state
        res.charged = charge

    def late_commit(self, res: ModelReservation, charge: int) -> None:
        """A commit with usage after expiry: the rest of the real usage, never less."""
        assert res.state == EXPIRED
        extra = max(0, charge - res.charged)
        for budget_id in res.chain:
            budget = self.budgets[budget_id]
            budget.spent += extra
            budget.overage += extra
        res.charged += extra
        res.state = COMMITTED

    def overflows(self, chain: tuple[str, ...], charge: int, released: int = 0) -> bool:
        """Whether a charge is refused as beyond what a ledger figure can hold, when the
        same operation releases `released` of what the chain holds."""
        for budget_id in chain:
            budget = self.budgets[budget_id]
            after = budget.spent + budget.reserved - released + charge
            if charge > AMOUNT_MAX or after > INT64_MAX:
                return True
        return False
