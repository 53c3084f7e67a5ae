"""Property-based fuzzing of a real budgetd, on SQLite and PostgreSQL.

A hypothesis state machine drives random sequences of valid and malformed calls through
gRPC's sync stubs against a real in-process server (its own event loop, on a thread):
budgets in small HARD/SOFT hierarchies, reserve / extend / commit / release / charge with
amounts from zero to past AMOUNT_MAX, duplicate idempotency keys, repeated and late
finishes, freeze / unfreeze, expiry (the test's ManualClock), meter streams (open, usage,
repeated and backwards usage, a second open, garbage, finish, break and resume) and raw
junk bytes. It keeps a model of every figure (tests/support/fuzz_model.py) and after
every step checks that:

- VerifyLedger is clean and counts exactly the entries the model expects;
- every budget's limit, spent, reserved, overage and frozen flag equal the model's, so
  `reserved` is the sum of the holds of the open reservations;
- every HARD budget has spent + reserved <= limit + overage;
- a refused call got the precise status the model predicts (never UNKNOWN or INTERNAL)
  and changed nothing.

`BUDGETD_FUZZ_EXAMPLES` and `BUDGETD_FUZZ_STEPS` make a run longer (the defaults keep
`make test` short). A failure prints the shortest sequence found and a
`@reproduce_failure` blob.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.db.schema import reservations
from budget_server.ledger.sweeper import sweep_once
from budget_server.limits import (
    AMOUNT_MAX,
    ID_LENGTH_MAX,
    IDEMPOTENCY_KEY_LENGTH_MAX,
    INT64_MAX,
    LABELS_MAX,
    MODEL_LENGTH_MAX,
    TTL_DEFAULT_MS,
    TTL_MAX_MS,
)
from budget_server.meter.policy import GrantPolicy
from tests.support.fuzz_meter import SyncMeterStream
from tests.support.fuzz_model import (
    COMMITTED,
    EXPIRED,
    PENDING,
    RELEASED,
    STATE_VALUES,
    LedgerModel,
    ModelBudget,
    ModelReservation,
)
from tests.support.fuzz_server import ThreadedServer, threaded_server
from tests.support.fuzz_wire import GARBAGE, GHOST_RESERVATION, decodes_as, undecodable
from tests.support.ledger import all_entries, assert_ledger_clean, create
from tests.support.meter import (
    finish_request,
    live_session,
    next_event,
    open_request,
    open_stream,
    refill_mark,
    usage_request,
    wait_session_usage,
    wait_until,
)
from tests.support.servers import Stubs

EXAMPLES = int(os.environ.get("BUDGETD_FUZZ_EXAMPLES", "60"))
STEPS = int(os.environ.get("BUDGETD_FUZZ_STEPS", "30"))

RPC_S = 30.0
"""Deadline of every call: a hung server fails the step instead of the whole run."""
BUDGETS_MAX = 6
DEPTH_MAX = 3
LIVE_STREAMS_MAX = 3
POLICY = GrantPolicy()
RESUME_WINDOW_US = POLICY.resume_window_ms * 1000
STREAM_TTL_US = POLICY.ttl_ms * 1000


def report_mark(grant: int, final: bool, max_output: int) -> int:
    """Where the server says it starts acting on a stream's usage: at a grant that cannot
    grow (final, or reaching max_output_tokens), at any other its refill mark."""
    if final or (max_output and grant >= max_output):
        return grant
    return refill_mark(grant)


AFTER_EVERYTHING_S = 25 * 3600  # past TTL_MAX_MS: every reservation left has expired

# Refusals a bad request may get. UNKNOWN and INTERNAL mean a bug in budgetd.
REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}

KNOWN_BUGS: set[str] = set()
"""Fuzzed inputs that reach a product bug with its own xfail test below; the machine
stays away from them so that it keeps looking for new ones. Empty once they are fixed."""

LIMITS = st.one_of(
    st.integers(0, 3000), st.sampled_from([0, 1, 64, 257, 10**9, AMOUNT_MAX - 1, AMOUNT_MAX])
)
AMOUNTS = st.one_of(
    st.integers(1, 1500),
    st.integers(1, 10**6),
    st.sampled_from([1, AMOUNT_MAX // 2, AMOUNT_MAX - 1, AMOUNT_MAX]),
)
TOKENS = st.one_of(
    st.integers(0, 400), st.integers(0, 10**6), st.sampled_from([0, AMOUNT_MAX // 2, AMOUNT_MAX])
)
TTLS = st.sampled_from([0, 0, 1000, 5000, 60_000, 3_600_000, TTL_MAX_MS])
PICK = st.integers(0, 1 << 16)
KEYS = st.one_of(st.none(), st.integers(0, 3))


def code_of(call: Callable[[], Any]) -> tuple[str, Any]:
    """("OK", response) or (status code name, the RpcError)."""
    try:
        return "OK", call()
    except grpc.RpcError as error:
        return error.code().name, error


def details(outcome: Any) -> str:
    return outcome.details() if isinstance(outcome, grpc.RpcError) else str(outcome)


def usage_pb(usage: tuple[int, int]) -> pb.Usage:
    return pb.Usage(input_tokens=usage[0], output_tokens=usage[1])


def covers(later: tuple[int, int], earlier: tuple[int, int]) -> bool:
    return later[0] >= earlier[0] and later[1] >= earlier[1]


@dataclass
class LiveStream:
    """A meter stream this example has open, and what its client has heard."""

    stream: SyncMeterStream
    reservation_id: str
    budget_id: str
    max_output: int = 0  # max_output_tokens the stream was opened (or resumed) with
    usage: tuple[int, int] = (0, 0)
    grant_output: int = 0  # the last grant the client was told of
    final: bool = False  # told that grant is the last (the server aborts at it)
    aborted: bool = False
    aborts: list[pb.MeterAbort] = field(default_factory=list)


@dataclass
class FuzzRun:
    """What one pytest test shares with every example it runs."""

    server: ThreadedServer
    budget: pb_grpc.BudgetServiceStub
    admin: pb_grpc.AdminServiceStub
    channel: grpc.Channel
    examples: int = 0
    steps: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    rules: dict[str, int] = field(default_factory=dict)


def counted(rule_fn: Callable[..., None]) -> Callable[..., None]:
    """Count how often each rule ran (printed at the end of the run)."""

    @functools.wraps(rule_fn)
    def counting(self: LedgerMachine, **kwargs: Any) -> None:
        rules = self.run.rules
        rules[rule_fn.__name__] = rules.get(rule_fn.__name__, 0) + 1
        rule_fn(self, **kwargs)

    return counting


class LedgerMachine(RuleBasedStateMachine):
    run: ClassVar[FuzzRun]

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"fz{secrets.token_hex(4)}"
        self.model = LedgerModel()
        self.streams: list[LiveStream] = []
        self.entries_expected: int | None = None
        self.created = 0
        self.run.examples += 1

    # ------------------------------------------------------------------ helpers

    @property
    def clock(self) -> ManualClock:
        return self.run.server.clock

    @property
    def now_us(self) -> int:
        return self.clock.now_us()

    def count(self, outcome: str) -> None:
        self.run.outcomes[outcome] = self.run.outcomes.get(outcome, 0) + 1

    def entries(self, delta: int | None) -> None:
        """The step wrote `delta` ledger entries (None: a number the model cannot know)."""
        if delta is None or self.entries_expected is None:
            self.entries_expected = None
        else:
            self.entries_expected += delta

    def pick_budget(self, pick: int) -> ModelBudget:
        budgets = list(self.model.budgets.values())
        return budgets[pick % len(budgets)]

    def pick_reservation(self, pick: int) -> ModelReservation:
        reservations = list(self.model.reservations.values())
        return reservations[pick % len(reservations)]

    def key(self, key: int | None) -> str:
        return "" if key is None else f"key-{key}"

    def expect(self, outcome: str, expected: str, what: str, error: Any) -> None:
        self.count(outcome)
        assert outcome not in ("UNKNOWN", "INTERNAL"), f"{what}: {outcome} {details(error)}"
        assert outcome == expected, f"{what}: expected {expected}, got {outcome}: {details(error)}"

    def check_budget(self, budget: pb.Budget) -> None:
        mine = self.model.budgets[budget.id]
        got = (budget.limit, budget.spent, budget.reserved, budget.overage, budget.frozen)
        assert got == mine.figures(), f"{budget.id}: server {got} != model {mine.figures()}"

    def has_budgets(self) -> bool:
        return bool(self.model.budgets)

    def has_reservations(self) -> bool:
        return bool(self.model.reservations)

    def idle_reservations(self) -> list[ModelReservation]:
        return [r for r in self.model.reservations.values() if not r.live]

    # ------------------------------------------------------------------ budgets

    @initialize(
        budgets=st.lists(
            st.tuples(PICK, st.booleans(), st.booleans(), LIMITS), min_size=1, max_size=3
        )
    )
    def first_budgets(self, budgets: list[tuple[int, bool, bool, int]]) -> None:
        """Every sequence starts with budgets, so that its steps have something to work on."""
        for pick, nested, hard, limit in budgets:
            self.create_budget(pick=pick, nested=nested, hard=hard, limit=limit)

    @precondition(lambda self: len(self.model.budgets) < BUDGETS_MAX)
    @rule(pick=PICK, nested=st.booleans(), hard=st.booleans(), limit=LIMITS)
    @counted
    def create_budget(self, pick: int, nested: bool, hard: bool, limit: int) -> None:
        parents = [b for b in self.model.budgets.values() if b.depth < DEPTH_MAX - 1]
        parent = parents[pick % len(parents)] if nested and parents else None
        budget_id = f"{self.prefix}/b{self.created}"
        self.created += 1
        outcome, response = code_of(
            lambda: self.run.admin.CreateBudget(
                pb.CreateBudgetRequest(
                    id=budget_id,
                    parent_id=parent.id if parent else "",
                    unit=pb.UNIT_TOKENS,
                    limit=limit,
                    mode=pb.MODE_HARD if hard else pb.MODE_SOFT,
                ),
                timeout=RPC_S,
            )
        )
        self.expect(outcome, "OK", "CreateBudget", response)
        self.model.budgets[budget_id] = ModelBudget(
            budget_id,
            parent.id if parent else None,
            hard,
            limit,
            parent.depth + 1 if parent else 0,
        )
        self.check_budget(response.budget)
        self.entries(1)  # LIMIT

    @precondition(has_budgets)
    @rule(pick=PICK, frozen=st.booleans(), reason=st.text(max_size=600))
    @counted
    def freeze(self, pick: int, frozen: bool, reason: str) -> None:
        budget = self.pick_budget(pick)
        if frozen:
            call = lambda: self.run.admin.FreezeBudget(  # noqa: E731
                pb.FreezeBudgetRequest(id=budget.id, reason=reason), timeout=RPC_S
            )
        else:
            call = lambda: self.run.admin.UnfreezeBudget(  # noqa: E731
                pb.UnfreezeBudgetRequest(id=budget.id), timeout=RPC_S
            )
        was_frozen = budget.frozen
        outcome, response = code_of(call)
        self.expect(outcome, "OK", "Freeze" if frozen else "Unfreeze", response)
        budget.frozen = frozen
        self.check_budget(response.budget)
        self.entries(0)
        if frozen and not was_frozen:
            # Every open stream below the budget is aborted at once, naming the budget.
            for live in self.streams:
                if budget.id in self.model.chain(live.budget_id):
                    self.settle(live)
                    assert live.aborted, f"stream on {live.budget_id} not aborted by the freeze"

    @precondition(has_budgets)
    @rule(
        pick=PICK,
        defect=st.sampled_from(["unknown", "bad-id", "empty-id", "long-id"]),
        frozen=st.booleans(),
    )
    @counted
    def freeze_malformed(self, pick: int, defect: str, frozen: bool) -> None:
        budget_id, expected = {
            "unknown": (f"{self.prefix}/ghost", "NOT_FOUND"),
            "bad-id": (f"{self.prefix} b0", "INVALID_ARGUMENT"),
            "empty-id": ("", "INVALID_ARGUMENT"),
            "long-id": ("x" * (ID_LENGTH_MAX + 1), "INVALID_ARGUMENT"),
        }[defect]
        if frozen:
            outcome, error = code_of(
                lambda: self.run.admin.FreezeBudget(
                    pb.FreezeBudgetRequest(id=budget_id), timeout=RPC_S
                )
            )
        else:
            outcome, error = code_of(
                lambda: self.run.admin.UnfreezeBudget(
                    pb.UnfreezeBudgetRequest(id=budget_id), timeout=RPC_S
                )
            )
        self.expect(outcome, expected, f"freeze {defect}", error)
        self.entries(0)

    # ------------------------------------------------------------------ reserve

    @precondition(has_budgets)
    @rule(
        pick=PICK,
        amount=AMOUNTS,
        estimate=st.one_of(st.none(), st.tuples(TOKENS, TOKENS)),
        key=KEYS,
        ttl=TTLS,
    )
    @counted
    def reserve(
        self,
        pick: int,
        amount: int,
        estimate: tuple[int, int] | None,
        key: int | None,
        ttl: int,
    ) -> None:
        budget = self.pick_budget(pick)
        chain = self.model.chain(budget.id)
        if estimate == (0, 0):
            estimate = None
        request = pb.ReserveRequest(
            budget_id=budget.id, ttl_ms=ttl, idempotency_key=self.key(key), model="gpt-4o"
        )
        if estimate is not None:
            request.estimate.CopyFrom(usage_pb(estimate))
            amount = estimate[0] + estimate[1]
        else:
            request.amount = amount
        outcome, response = code_of(lambda: self.run.budget.Reserve(request, timeout=RPC_S))
        if amount > AMOUNT_MAX and estimate is not None:  # refused before anything else
            self.expect(outcome, "INVALID_ARGUMENT", f"Reserve estimate {estimate}", response)
            self.entries(0)
            return
        earlier = self.model.keys.get((budget.id, request.idempotency_key))
        if earlier is not None and self.model.reservations[earlier].made_by_charge:
            self.expect(outcome, "FAILED_PRECONDITION", "Reserve with a Charge's key", response)
            self.entries(0)
            return
        if earlier is not None:
            self.expect(outcome, "OK", "Reserve replay", response)
            assert response.replayed
            assert response.reservation.id == earlier
            self.entries(0)
            return
        refused = self.model.refusal(chain, amount)
        if refused is not None:
            self.expect(outcome, refused.code, f"Reserve {amount} on {budget.id}", response)
            self.entries(0)
            return
        self.expect(outcome, "OK", f"Reserve {amount} on {budget.id}", response)
        assert not response.replayed
        reservation = response.reservation
        assert reservation.granted == amount
        assert reservation.state == pb.RESERVATION_STATE_PENDING
        res = ModelReservation(
            id=reservation.id,
            budget_id=budget.id,
            chain=chain,
            state=PENDING,
            hold=0,
            expires_at_us=self.now_us + (ttl or TTL_DEFAULT_MS) * 1000,
            key=request.idempotency_key,
        )
        assert reservation.expires_at_us == res.expires_at_us
        self.model.reservations[res.id] = res
        if res.key:
            self.model.keys[(budget.id, res.key)] = res.id
        self.model.hold(res, amount)
        self.check_budget(response.budget)
        self.entries(len(chain))

    @precondition(has_budgets)
    @rule(
        pick=PICK,
        defect=st.sampled_from(
            [
                "zero",
                "negative",
                "huge",
                "empty-id",
                "long-id",
                "bad-id",
                "unknown",
                "ttl-low",
                "ttl-negative",
                "ttl-high",
                "amount-and-estimate",
                "estimate-negative",
                "estimate-cached",
                "estimate-reasoning",
                "estimate-zero",
                "estimate-huge",
                "labels",
                "label-key",
                "key-long",
                "model-long",
            ]
        ),
        number=st.integers(1, INT64_MAX),
    )
    @counted
    def reserve_malformed(self, pick: int, defect: str, number: int) -> None:
        budget = self.pick_budget(pick)
        request = pb.ReserveRequest(budget_id=budget.id, amount=5)
        expected = "INVALID_ARGUMENT"
        if defect == "zero":
            request.amount = 0
        elif defect == "negative":
            request.amount = -number
        elif defect == "huge":
            request.amount = AMOUNT_MAX + 1 + number % (INT64_MAX - AMOUNT_MAX)
        elif defect == "empty-id":
            request.budget_id = ""
        elif defect == "long-id":
            request.budget_id = budget.id + "x" * ID_LENGTH_MAX
        elif defect == "bad-id":
            request.budget_id = budget.id + " \n"
        elif defect == "unknown":
            request.budget_id, expected = f"{self.prefix}/ghost", "NOT_FOUND"
        elif defect == "ttl-low":
            request.ttl_ms = 1 + number % 999
        elif defect == "ttl-negative":
            request.ttl_ms = -number
        elif defect == "ttl-high":
            request.ttl_ms = TTL_MAX_MS + number % (INT64_MAX - TTL_MAX_MS)
        elif defect == "amount-and-estimate":
            request.estimate.output_tokens = 3
        elif defect == "estimate-negative":
            request.amount = 0
            request.estimate.input_tokens = -number
        elif defect == "estimate-cached":
            request.amount = 0
            request.estimate.input_tokens = 1
            request.estimate.cached_input_tokens = 2
        elif defect == "estimate-reasoning":
            request.amount = 0
            request.estimate.output_tokens = 1
            request.estimate.reasoning_tokens = 2
        elif defect == "estimate-zero":
            request.amount = 0
            request.estimate.SetInParent()
        elif defect == "estimate-huge":
            request.amount = 0
            request.estimate.output_tokens = AMOUNT_MAX + 1
        elif defect == "labels":
            request.labels.update({f"k{i}": "v" for i in range(LABELS_MAX + 1)})
        elif defect == "label-key":
            request.labels[""] = "v"
        elif defect == "key-long":
            request.idempotency_key = "k" * (IDEMPOTENCY_KEY_LENGTH_MAX + 1)
        elif defect == "model-long":
            request.model = "m" * (MODEL_LENGTH_MAX + 1)
        outcome, error = code_of(lambda: self.run.budget.Reserve(request, timeout=RPC_S))
        self.expect(outcome, expected, f"Reserve {defect}", error)
        self.entries(0)

    # ------------------------------------------------------------------ extend

    @precondition(has_reservations)
    @rule(pick=PICK, amount=AMOUNTS, ttl=TTLS, by_estimate=st.booleans())
    @counted
    def extend(self, pick: int, amount: int, ttl: int, by_estimate: bool) -> None:
        res = self.pick_reservation(pick)
        request = pb.ExtendRequest(reservation_id=res.id, ttl_ms=ttl)
        if by_estimate:
            request.estimate.output_tokens = amount
        else:
            request.amount = amount
        outcome, response = code_of(lambda: self.run.budget.Extend(request, timeout=RPC_S))
        if res.state != PENDING or res.expires_at_us <= self.now_us:
            self.expect(outcome, "FAILED_PRECONDITION", f"Extend {res.state}", response)
            self.entries(0)
            return
        refused = self.model.refusal(res.chain, amount)
        if refused is not None:
            self.expect(outcome, refused.code, f"Extend {amount}", response)
            self.entries(0)
            return
        self.expect(outcome, "OK", f"Extend {amount}", response)
        self.model.hold(res, amount)
        if ttl:
            res.expires_at_us = self.now_us + ttl * 1000
        assert response.reservation.granted == res.hold
        if res.live:  # a live stream pushes the expiry too (extensions, heartbeats)
            res.expires_at_us = response.reservation.expires_at_us
        assert response.reservation.expires_at_us == res.expires_at_us
        self.check_budget(response.budget)
        self.entries(len(res.chain))

    @precondition(has_reservations)
    @rule(
        pick=PICK,
        defect=st.sampled_from(
            ["zero", "negative", "huge", "ttl", "both", "empty-id", "long-id", "unknown"]
        ),
        number=st.integers(1, INT64_MAX),
    )
    @counted
    def extend_malformed(self, pick: int, defect: str, number: int) -> None:
        res = self.pick_reservation(pick)
        request = pb.ExtendRequest(reservation_id=res.id, amount=1)
        expected = "INVALID_ARGUMENT"
        if defect == "zero":
            request.amount = 0
        elif defect == "negative":
            request.amount = -number
        elif defect == "huge":
            request.amount = AMOUNT_MAX + 1 + number % (INT64_MAX - AMOUNT_MAX)
        elif defect == "ttl":
            request.ttl_ms = -number if number % 2 else 1 + number % 999
        elif defect == "both":
            request.estimate.output_tokens = 1
        elif defect == "empty-id":
            request.reservation_id = ""
        elif defect == "long-id":
            request.reservation_id = res.id + "0" * 10
        elif defect == "unknown":
            request.reservation_id, expected = GHOST_RESERVATION, "NOT_FOUND"
        outcome, error = code_of(lambda: self.run.budget.Extend(request, timeout=RPC_S))
        self.expect(outcome, expected, f"Extend {defect}", error)
        self.entries(0)

    # ------------------------------------------------------------------ commit, release

    def commit_refused(self, res: ModelReservation, charge: int) -> bool:
        """Whether committing (or expiring) `res` at `charge` is refused as beyond what a
        ledger figure can hold: spent + reserved after the operation past int64. While
        KNOWN_BUGS has "late-commit-bound-counts-charged" the model follows budgetd, which
        bounds a late commit by its whole charge, not by what it adds."""
        if res.state == PENDING:
            return self.model.overflows(res.chain, charge, released=res.hold)
        if "late-commit-bound-counts-charged" in KNOWN_BUGS:
            return self.model.overflows(res.chain, charge)
        return self.model.overflows(res.chain, max(0, charge - res.charged))

    def charge_outcome(self, res: ModelReservation, charge: int, with_usage: bool) -> str:
        """What a Commit of `charge` on `res` should get, with the model updated to match."""
        if res.state == PENDING:
            if self.commit_refused(res, charge):
                return "INVALID_ARGUMENT"
            self.model.finish(res, charge, COMMITTED)
            return "OK"
        if res.state == EXPIRED and with_usage:
            if self.commit_refused(res, charge):
                return "INVALID_ARGUMENT"
            self.model.late_commit(res, charge)
            return "OK"
        if res.state == COMMITTED:
            return "OK"  # replayed, charges nothing more
        return "FAILED_PRECONDITION"

    @precondition(has_reservations)
    @rule(
        pick=PICK,
        with_usage=st.booleans(),
        relative=st.sampled_from(["zero", "below", "exact", "above", "far"]),
        extra=TOKENS,
        split=st.integers(0, 100),
    )
    @counted
    def commit(self, pick: int, with_usage: bool, relative: str, extra: int, split: int) -> None:
        res = self.pick_reservation(pick)
        charge = {
            "zero": 0,
            "below": res.hold - min(res.hold, extra),
            "exact": res.hold,
            "above": res.hold + 1 + extra % 1000,
            "far": res.hold + extra,
        }[relative]
        charge = min(charge, AMOUNT_MAX * (2 if with_usage else 1))
        key = f"Commit {charge} ({'usage' if with_usage else 'amount'}) of {res.state}"
        request = pb.CommitRequest(reservation_id=res.id)
        if with_usage:
            input_tokens = min(charge * split // 100, AMOUNT_MAX)
            usage = (input_tokens, charge - input_tokens)
            request.usage.CopyFrom(usage_pb(usage))
        else:
            request.amount = charge
        state, hold, charged_before = res.state, res.hold, res.charged
        if with_usage and charge > AMOUNT_MAX:
            expected = "INVALID_ARGUMENT"  # more tokens in all than a ledger figure may hold
        else:
            expected = self.charge_outcome(res, charge, with_usage)
        outcome, response = code_of(lambda: self.run.budget.Commit(request, timeout=RPC_S))
        self.expect(outcome, expected, key, response)
        if outcome != "OK":
            self.entries(0)
            return
        assert response.reservation.state == pb.RESERVATION_STATE_COMMITTED
        if state == PENDING:
            assert response.charged == charge
            assert response.overage == max(0, charge - hold)
            if with_usage:
                res.usage = usage
            self.entries(len(res.chain))
        elif state == EXPIRED:
            assert response.charged == res.charged
            self.entries(len(res.chain))
        else:  # a replay reports the first commit
            assert response.charged == charged_before
            self.entries(0)
        self.check_budget(response.budget)

    @precondition(has_reservations)
    @rule(pick=PICK)
    @counted
    def release(self, pick: int) -> None:
        res = self.pick_reservation(pick)
        state = res.state
        outcome, response = code_of(
            lambda: self.run.budget.Release(pb.ReleaseRequest(reservation_id=res.id), timeout=RPC_S)
        )
        if state in (COMMITTED, EXPIRED):
            self.expect(outcome, "FAILED_PRECONDITION", f"Release {state}", response)
            self.entries(0)
            return
        self.expect(outcome, "OK", f"Release {state}", response)
        assert response.reservation.state == pb.RESERVATION_STATE_RELEASED
        if state == PENDING:
            self.model.finish(res, 0, RELEASED)
            self.entries(len(res.chain))
        else:
            self.entries(0)
        self.check_budget(response.budget)

    @precondition(has_reservations)
    @rule(
        pick=PICK,
        defect=st.sampled_from(
            [
                "empty-id",
                "long-id",
                "unprintable-id",
                "unknown",
                "negative",
                "huge",
                "both",
                "usage-negative",
                "usage-cached",
                "usage-reasoning",
                "usage-huge",
            ]
        ),
        release=st.booleans(),
        number=st.integers(1, INT64_MAX),
    )
    @counted
    def finish_malformed(self, pick: int, defect: str, release: bool, number: int) -> None:
        res = self.pick_reservation(pick)
        ids = {
            "empty-id": "",
            "long-id": "r_" + "0" * 60,
            "unprintable-id": "r_\x00\x01 é",
            "unknown": GHOST_RESERVATION,
        }
        expected = "NOT_FOUND" if defect == "unknown" else "INVALID_ARGUMENT"
        if release or defect in ids:
            if defect not in ids:
                return
            request_id = ids[defect]
            if release:
                outcome, error = code_of(
                    lambda: self.run.budget.Release(
                        pb.ReleaseRequest(reservation_id=request_id), timeout=RPC_S
                    )
                )
            else:
                outcome, error = code_of(
                    lambda: self.run.budget.Commit(
                        pb.CommitRequest(reservation_id=request_id), timeout=RPC_S
                    )
                )
            self.expect(outcome, expected, f"{'Release' if release else 'Commit'} {defect}", error)
            self.entries(0)
            return
        request = pb.CommitRequest(reservation_id=res.id)
        if defect == "negative":
            request.amount = -number
        elif defect == "huge":
            request.amount = AMOUNT_MAX + 1 + number % (INT64_MAX - AMOUNT_MAX)
        elif defect == "both":
            request.amount = 1
            request.usage.output_tokens = 1
        elif defect == "usage-negative":
            request.usage.input_tokens = -number
        elif defect == "usage-cached":
            request.usage.input_tokens = 1
            request.usage.cached_input_tokens = 5
        elif defect == "usage-reasoning":
            request.usage.output_tokens = 1
            request.usage.reasoning_tokens = 5
        elif defect == "usage-huge":
            request.usage.output_tokens = AMOUNT_MAX + 1 + number % (INT64_MAX - AMOUNT_MAX)
        outcome, error = code_of(lambda: self.run.budget.Commit(request, timeout=RPC_S))
        self.expect(outcome, expected, f"Commit {defect}", error)
        self.entries(0)

    @precondition(has_budgets)
    @rule(pick=PICK, amount=st.one_of(st.just(0), AMOUNTS), with_usage=st.booleans(), key=KEYS)
    @counted
    def charge(self, pick: int, amount: int, with_usage: bool, key: int | None) -> None:
        """Charge records usage that already happened: never refused for lack of budget."""
        budget = self.pick_budget(pick)
        chain = self.model.chain(budget.id)
        request = pb.ChargeRequest(budget_id=budget.id, idempotency_key=self.key(key))
        if with_usage:
            request.usage.output_tokens = amount
        else:
            request.amount = amount
        earlier = self.model.keys.get((budget.id, request.idempotency_key))
        overflowing = earlier is None and self.model.overflows(chain, amount)
        outcome, response = code_of(lambda: self.run.budget.Charge(request, timeout=RPC_S))
        if key is None or amount == 0:  # usage of no tokens is refused as an amount of 0 is
            self.expect(outcome, "INVALID_ARGUMENT", "Charge without key or amount", response)
            self.entries(0)
            return
        if earlier is not None and not self.model.reservations[earlier].made_by_charge:
            self.expect(outcome, "FAILED_PRECONDITION", "Charge with a Reserve's key", response)
            self.entries(0)
            return
        if earlier is not None:
            self.expect(outcome, "OK", "Charge replay", response)
            assert response.replayed
            assert response.reservation.id == earlier
            assert response.charged == self.model.reservations[earlier].charged
            self.entries(0)
            return
        if overflowing:
            self.expect(outcome, "INVALID_ARGUMENT", f"Charge {amount} overflowing", response)
            self.entries(0)
            return
        self.expect(outcome, "OK", f"Charge {amount}", response)
        res = ModelReservation(
            id=response.reservation.id,
            budget_id=budget.id,
            chain=chain,
            state=PENDING,
            hold=0,
            expires_at_us=self.now_us,
            key=request.idempotency_key,
            made_by_charge=True,
        )
        self.model.reservations[res.id] = res
        self.model.keys[(budget.id, res.key)] = res.id
        self.model.finish(res, amount, COMMITTED)
        if with_usage:
            res.usage = (0, amount)
        assert response.charged == amount
        self.check_budget(response.budget)
        self.entries(len(chain))

    # ------------------------------------------------------------------ time

    @precondition(
        lambda self: (
            not self.streams and any(r.state == PENDING for r in self.model.reservations.values())
        )
    )
    @rule(seconds=st.sampled_from([0.5, 1, 9, 11, 59, 61, 299, 301, 3601, 86_401]))
    @counted
    def advance_clock(self, seconds: float) -> None:
        """Expire what is due: charged at its last known usage, released when none."""
        self.clock.advance(seconds=seconds)
        self.sweep()
        due = [
            r
            for r in self.model.reservations.values()
            if r.state == PENDING and r.expires_at_us <= self.now_us
        ]
        # An expiry whose charge no ledger figure can hold stays pending (and is retried).
        due = [r for r in due if not self.commit_refused(r, r.usage[0] + r.usage[1])]
        for res in due:
            self.model.finish(res, res.usage[0] + res.usage[1], EXPIRED)
        self.entries(sum(len(r.chain) for r in due))
        pending = {r.id for r in self.model.reservations.values() if r.state == PENDING}
        assert self.server_pending() == pending

    def sweep(self) -> None:
        async def sweep_all(server: BudgetServer) -> None:
            assert server.ledger is not None
            while await sweep_once(server.ledger, server.clock):
                pass

        self.run.server.run(sweep_all)

    def server_pending(self) -> set[str]:
        found: set[str] = set()
        for budget_id in self.model.budgets:
            for res in self.reservations_on(budget_id, pb.RESERVATION_STATE_PENDING):
                found.add(res.id)
        return found

    def reservations_on(self, budget_id: str, state: int) -> Iterator[pb.Reservation]:
        token = ""
        while True:
            page = self.run.admin.ListReservations(
                pb.ListReservationsRequest(
                    budget_id=budget_id, state=state, page_size=1000, page_token=token
                ),
                timeout=RPC_S,
            )
            yield from page.reservations
            token = page.next_page_token
            if not token:
                return

    def server_reservation(self, res: ModelReservation) -> pb.Reservation:
        for found in self.reservations_on(res.budget_id, STATE_VALUES[res.state]):
            if found.id == res.id:
                return found
        raise AssertionError(f"reservation {res.id} is not {res.state} on the server")

    # ------------------------------------------------------------------ meter streams

    def live(self, pick: int) -> LiveStream:
        return self.streams[pick % len(self.streams)]

    def has_streams(self) -> bool:
        return bool(self.streams)

    def take(self, live: LiveStream, event: pb.MeterEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "granted":
            granted = event.granted
            assert not live.aborted, "a grant after the abort"
            assert not live.final, f"a grant after the final one: {event}"
            if granted.final:  # may repeat the grant: an extension was refused before it
                assert granted.granted_output_tokens >= live.grant_output, event
                assert granted.capped_by, event
            else:
                assert granted.granted_output_tokens > live.grant_output, event
            mark = report_mark(granted.granted_output_tokens, granted.final, live.max_output)
            assert granted.report_at_output_tokens == mark, (event, mark)
            live.grant_output, live.final = granted.granted_output_tokens, granted.final
        elif kind == "abort":
            live.aborted = True
            live.aborts.append(event.abort)
        else:
            assert kind == "alert", f"unexpected meter event in mid-stream: {event}"

    def settle(self, live: LiveStream) -> None:
        """Wait until the server has taken in the stream's last usage and finished any
        extension it started; then bring the client's view and the model up to it."""
        expected = live.usage
        budget_id, reservation_id = live.budget_id, live.reservation_id

        async def probe(server: BudgetServer) -> tuple[str, int, int] | None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                session = next(
                    (
                        s
                        for s in server.sessions.sessions_of({budget_id})
                        if s.reservation_id == reservation_id
                    ),
                    None,
                )
                if session is None:
                    return None
                usage = (session.usage.input_tokens, session.usage.output_tokens)
                # _extension: the session's background grant extension, if one is running.
                if usage == expected and session._extension is None:
                    grant = session.grant
                    capped = bool(session._capped_by)
                    return session.state, grant.input_tokens, grant.output_tokens, capped
                if loop.time() > deadline:
                    raise AssertionError(f"meter session {reservation_id} did not settle")
                await asyncio.sleep(0.002)

        found = self.run.server.run(probe)
        assert found is not None, f"the server dropped live stream {reservation_id}"
        state, grant_input, grant_output, capped = found
        deadline = time.monotonic() + 10
        # An open stream whose grant cannot grow has been told so (opened or granted).
        while (
            live.grant_output != grant_output
            or live.aborted != (state == "aborted")
            or (state == "open" and live.final != capped)
        ):
            event = live.stream.next_event(max(0.01, deadline - time.monotonic()))
            assert event is not None, (
                f"stream ended: {live.stream.code} {live.stream.details}; "
                f"server grant {grant_output}, state {state}"
            )
            self.take(live, event)
        while (event := live.stream.poll_event()) is not None:
            self.take(live, event)
        usage = live.usage
        at_edge = usage[1] >= grant_output or usage[0] > grant_input
        complete = bool(live.max_output) and grant_output >= live.max_output
        within = usage[1] <= grant_output and usage[0] <= grant_input
        if state == "open" and not (complete and within):
            assert not at_edge, f"usage {usage} sits at grant ({grant_input}, {grant_output})"
        for abort in live.aborts:
            if abort.reason == pb.ABORT_REASON_EXHAUSTED:
                assert at_edge, f"aborted inside the grant: usage {usage}, grant {grant_output}"
        res = self.model.reservations[reservation_id]
        if res.state == PENDING:
            self.sync_hold(res)

    def sync_hold(self, res: ModelReservation) -> None:
        """Take a PENDING reservation's hold after grant extensions the model cannot foresee:
        it may only have grown, to cover the grant's token shape."""
        found = self.server_reservation(res)
        grant = (found.grant_input_tokens, found.grant_output_tokens)
        assert found.granted >= res.hold, f"hold of {res.id} shrank: {found.granted} < {res.hold}"
        assert found.granted == max(res.hold, grant[0] + grant[1]), (found, res)
        self.model.hold(res, found.granted - res.hold)
        res.grant = grant

    def end_stream(self, live: LiveStream, expected_code: str) -> None:
        """The stream has ended (or is ending) without a commit: wait for the server to
        close the session, which keeps the reservation for a resume with its last usage."""
        events = live.stream.wait_end()
        for event in events:
            assert event.WhichOneof("event") in ("granted", "abort", "alert"), event
        code = live.stream.code.name if live.stream.code else "?"
        self.expect(code, expected_code, "meter stream end", live.stream.details)
        self.streams.remove(live)
        live.stream.close()
        res = self.model.reservations[live.reservation_id]
        res.live = False
        if res.state != PENDING:
            self.wait_unregistered(live)
            self.entries(None)
            return
        now_us = self.now_us
        deadline = time.monotonic() + 10
        while True:
            found = self.server_reservation(res)
            usage = (found.usage.input_tokens, found.usage.output_tokens)
            if found.expires_at_us == now_us + RESUME_WINDOW_US and usage == live.usage:
                break
            assert time.monotonic() < deadline, f"broken stream {res.id} not closed: {found}"
            time.sleep(0.005)
        res.expires_at_us = found.expires_at_us
        res.usage = live.usage
        self.wait_unregistered(live)
        self.sync_hold(res)
        self.entries(None)

    def wait_unregistered(self, live: LiveStream) -> None:
        budget_id, reservation_id = live.budget_id, live.reservation_id

        async def gone(server: BudgetServer) -> None:
            for _ in range(5000):
                if not any(
                    s.reservation_id == reservation_id
                    for s in server.sessions.sessions_of({budget_id})
                ):
                    return
                await asyncio.sleep(0.002)
            raise AssertionError(f"session {reservation_id} still registered")

        self.run.server.run(gone)

    def wait_closed(self, reservation_id: str) -> None:
        """Wait until the server has closed the stream's session: unregistered, and its
        reservation finished or waiting for a resume (the close's last write is done)."""
        resume_at_us = self.now_us + RESUME_WINDOW_US

        async def closed(server: BudgetServer) -> None:
            assert server.db is not None
            for _ in range(5000):
                if not any(
                    s.reservation_id == reservation_id
                    for b in server.sessions.budget_ids
                    for s in server.sessions.sessions_of({b})
                ):
                    async with server.db.read() as conn:
                        row = (
                            await conn.execute(
                                select(reservations.c.state, reservations.c.expires_at_us).where(
                                    reservations.c.id == reservation_id
                                )
                            )
                        ).one()
                    if row.state != PENDING or row.expires_at_us == resume_at_us:
                        return
                await asyncio.sleep(0.002)
            raise AssertionError(f"the stream on {reservation_id} was not closed")

        self.run.server.run(closed)

    def open_stream(self, first: pb.MeterRequest) -> tuple[SyncMeterStream, pb.MeterEvent | None]:
        stream = SyncMeterStream(self.run.budget, first)
        return stream, stream.next_event()

    @precondition(lambda self: self.model.budgets and len(self.streams) < LIVE_STREAMS_MAX)
    @rule(
        pick=PICK,
        prompt=st.one_of(st.integers(0, 300), TOKENS),
        max_output=st.one_of(st.just(0), st.integers(1, 600), TOKENS),
    )
    @counted
    def meter_open(self, pick: int, prompt: int, max_output: int) -> None:
        budget = self.pick_budget(pick)
        chain = self.model.chain(budget.id)
        initial = POLICY.initial_output_tokens
        high = min(initial, max_output) if max_output else initial
        grant = self.model.meter_grant(chain, prompt, high)
        stream, event = self.open_stream(
            pb.MeterRequest(
                open=pb.MeterOpen(
                    budget_id=budget.id,
                    model="gpt-4o",
                    prompt_tokens_estimate=prompt,
                    max_output_tokens=max_output,
                )
            )
        )
        if not isinstance(grant, int):
            assert event is None, f"opened although the model refuses ({grant}): {event}"
            code = stream.code.name if stream.code else "?"
            self.expect(code, grant.code, f"Meter open {prompt}+{high}", stream.details)
            stream.close()
            self.entries(0)
            return
        assert event is not None, f"open refused: {stream.code} {stream.details}"
        assert event.WhichOneof("event") == "opened", event
        opened = event.opened
        self.count("OK")
        assert opened.granted_output_tokens == grant, (opened, grant)
        assert not opened.resumed
        assert opened.grant_final == (grant < high), (opened, grant, high)
        mark = report_mark(grant, opened.grant_final, max_output)
        assert opened.report_at_output_tokens == mark, (opened, mark)
        res = ModelReservation(
            id=opened.reservation_id,
            budget_id=budget.id,
            chain=chain,
            state=PENDING,
            hold=0,
            expires_at_us=self.now_us + STREAM_TTL_US,
            grant=(prompt, grant),
            live=True,
        )
        self.model.reservations[res.id] = res
        self.model.hold(res, prompt + grant)
        live = LiveStream(stream, res.id, budget.id, max_output, grant_output=grant)
        live.final = opened.grant_final
        self.streams.append(live)
        self.entries(len(chain))

    @precondition(has_streams)
    @rule(pick=PICK, more_input=st.integers(0, 50), more_output=TOKENS)
    @counted
    def meter_usage(self, pick: int, more_input: int, more_output: int) -> None:
        live = self.live(pick)
        usage = (
            min(live.usage[0] + more_input, AMOUNT_MAX),
            min(live.usage[1] + max(1, more_output), AMOUNT_MAX),
        )
        if usage == live.usage:
            return
        live.stream.send(pb.MeterRequest(usage=pb.MeterUsage(usage=usage_pb(usage))))
        if sum(usage) > AMOUNT_MAX:  # more tokens in all than a ledger figure may hold
            self.end_stream(live, "INVALID_ARGUMENT")
            return
        live.usage = usage
        self.settle(live)
        self.entries(None)

    @precondition(has_streams)
    @rule(pick=PICK)
    @counted
    def meter_repeat_usage(self, pick: int) -> None:
        """A repeated cumulative report counts nothing twice. The server says nothing to a
        usage message, so the next report (one more input token) shows it was taken in."""
        live = self.live(pick)
        after = (live.usage[0] + 1, live.usage[1])
        if sum(after) > AMOUNT_MAX:
            return
        live.stream.send(pb.MeterRequest(usage=pb.MeterUsage(usage=usage_pb(live.usage))))
        live.usage = after
        live.stream.send(pb.MeterRequest(usage=pb.MeterUsage(usage=usage_pb(live.usage))))
        self.settle(live)
        self.entries(None)

    @precondition(has_streams)
    @rule(
        pick=PICK,
        how=st.sampled_from(["backwards", "second-open", "garbage", "empty", "cancel", "close"]),
        garbage=GARBAGE,
    )
    @counted
    def meter_break(self, pick: int, how: str, garbage: bytes) -> None:
        """The stream ends without a commit: a protocol error from the client, a cancelled
        call or a half-close. The reservation waits for a resume, with its last usage."""
        live = self.live(pick)
        expected = "INVALID_ARGUMENT"
        if how == "backwards":
            if live.usage == (0, 0):
                return
            back = (max(0, live.usage[0] - 1), max(0, live.usage[1] - 1))
            live.stream.send(pb.MeterRequest(usage=pb.MeterUsage(usage=usage_pb(back))))
        elif how == "second-open":
            live.stream.send(pb.MeterRequest(open=pb.MeterOpen(budget_id=live.budget_id)))
        elif how == "garbage":
            data = undecodable(pb.MeterRequest, garbage)
            if data is None:
                return
            self.raw_meter_stream(live, data)
            return
        elif how == "empty":
            live.stream.send(pb.MeterRequest())
        elif how == "cancel":
            live.stream.cancel()
            expected = "CANCELLED"
        else:
            live.stream.half_close()
            expected = "OK"
        self.end_stream(live, expected)

    def raw_meter_stream(self, live: LiveStream, data: bytes) -> None:
        """Junk on a live stream: sent on a second raw stream that resumes the reservation
        (the sync stream's serializer only takes messages)."""
        live.stream.cancel()
        self.end_stream(live, "CANCELLED")
        res = self.model.reservations[live.reservation_id]
        call = self.run.channel.stream_stream(
            "/budgetd.v1.BudgetService/Meter",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.MeterEvent.FromString,
        )
        opening = pb.MeterRequest(
            open=pb.MeterOpen(resume_reservation_id=res.id)
        ).SerializeToString()
        events = []
        try:
            for event in call(iter([opening, data]), timeout=RPC_S):
                events.append(event)
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        self.expect(
            code,
            "INVALID_ARGUMENT" if res.state == PENDING else "FAILED_PRECONDITION",
            "junk on a meter stream",
            events,
        )
        if res.state == PENDING:
            assert events, "no opened event on the resumed stream"
            assert events[0].WhichOneof("event") == "opened", events
            self.wait_reservation_closed(res)

    def wait_reservation_closed(self, res: ModelReservation) -> None:
        """After a resumed stream broke: its close put the resume window back."""
        deadline = time.monotonic() + 10
        while True:
            found = self.server_reservation(res)
            if found.expires_at_us == self.now_us + RESUME_WINDOW_US:
                break
            assert time.monotonic() < deadline, f"stream on {res.id} not closed: {found}"
            time.sleep(0.005)
        res.expires_at_us = found.expires_at_us
        self.sync_hold(res)
        self.entries(None)

    @precondition(has_streams)
    @rule(
        pick=PICK,
        provider=st.booleans(),
        final=st.one_of(st.none(), st.tuples(TOKENS, TOKENS)),
        backwards=st.booleans(),
    )
    @counted
    def meter_finish(
        self, pick: int, provider: bool, final: tuple[int, int] | None, backwards: bool
    ) -> None:
        live = self.live(pick)
        res = self.model.reservations[live.reservation_id]
        if final is None:
            final_usage = (0, 0)
        elif provider:
            final_usage = final
        elif backwards and live.usage[1] > 0:
            final_usage = (live.usage[0] + final[0] % 100, live.usage[1] - 1)
        else:
            final_usage = (
                min(live.usage[0] + final[0], AMOUNT_MAX),
                min(live.usage[1] + final[1], AMOUNT_MAX),
            )
        used = final_usage if provider or final_usage != (0, 0) else live.usage
        charge = used[0] + used[1]
        live.stream.send(
            pb.MeterRequest(
                finish=pb.MeterFinish(usage=usage_pb(final_usage), has_provider_usage=provider)
            )
        )
        if sum(final_usage) > AMOUNT_MAX or (
            not provider and final_usage != (0, 0) and not covers(final_usage, live.usage)
        ):
            self.end_stream(live, "INVALID_ARGUMENT")
            return
        if not provider:
            live.usage = used
        events = live.stream.wait_end()
        committed = [e.committed for e in events if e.WhichOneof("event") == "committed"]
        for event in events:
            if event.WhichOneof("event") != "committed":
                self.take(live, event)
        code = live.stream.code.name if live.stream.code else "?"
        if res.state == RELEASED:
            self.expect(code, "FAILED_PRECONDITION", "finish of a released reservation", events)
            self.forget_stream(live, res)
            return
        if res.state == PENDING and code == "INVALID_ARGUMENT":
            # Usage reported with finish may have grown the grant first: judge the refusal
            # with the hold the commit saw.
            self.count(code)
            self.forget_stream(live, res)
            res.usage = live.usage  # taken in by the session, recorded when it closed
            self.sync_hold(res)
            assert self.commit_refused(res, charge), f"finish refused: {live.stream.details}"
            return
        self.expect(code, "OK", f"finish of a {res.state} reservation", live.stream.details)
        assert len(committed) == 1, events
        assert events[-1].WhichOneof("event") == "committed", f"events after the commit: {events}"
        done = committed[0]
        if res.state == COMMITTED:  # committed meanwhile through Commit: a replay
            assert done.charged == res.charged
            self.forget_stream(live, res)
            return
        assert res.state == PENDING
        # Usage reported with finish may have grown the grant first.
        held = done.reservation.granted
        grant = (done.reservation.grant_input_tokens, done.reservation.grant_output_tokens)
        assert held == max(res.hold, grant[0] + grant[1]), (done.reservation, res)
        self.model.hold(res, held - res.hold)
        self.model.finish(res, charge, COMMITTED)
        res.usage = used
        assert done.charged == charge, (done, charge)
        assert done.overage == max(0, charge - held)
        assert done.reservation.state == pb.RESERVATION_STATE_COMMITTED
        self.check_budget(done.budget)
        self.forget_stream(live, res)

    def forget_stream(self, live: LiveStream, res: ModelReservation) -> None:
        self.streams.remove(live)
        live.stream.close()
        res.live = False
        self.wait_unregistered(live)
        if res.state == PENDING:
            self.wait_reservation_closed(res)
        self.entries(None)

    @precondition(
        lambda self: (
            len(self.streams) < LIVE_STREAMS_MAX
            and any(not r.live for r in self.model.reservations.values())
        )
    )
    @rule(pick=PICK, wrong_budget=st.booleans(), max_output=st.integers(0, 600))
    @counted
    def meter_resume(self, pick: int, wrong_budget: bool, max_output: int) -> None:
        """Reopen a stream on a reservation with its id: carries on from the server's usage."""
        idle = self.idle_reservations()
        res = idle[pick % len(idle)]
        others = [b for b in self.model.budgets if b != res.budget_id]
        budget_id = others[pick % len(others)] if wrong_budget and others else ""
        stream, event = self.open_stream(
            pb.MeterRequest(
                open=pb.MeterOpen(
                    budget_id=budget_id,
                    resume_reservation_id=res.id,
                    max_output_tokens=max_output,
                )
            )
        )
        if budget_id:  # checked first: naming another budget changes nothing, in any state
            assert event is None, event
            code = stream.code.name if stream.code else "?"
            self.expect(code, "INVALID_ARGUMENT", "resume naming another budget", stream.details)
            stream.close()
            self.entries(0)
            return
        if res.state != PENDING:
            assert event is None, event
            code = stream.code.name if stream.code else "?"
            self.expect(code, "FAILED_PRECONDITION", f"resume of {res.state}", stream.details)
            stream.close()
            self.entries(0)
            return
        assert event is not None, f"resume refused: {stream.code} {stream.details}"
        assert event.WhichOneof("event") == "opened", event
        opened = event.opened
        self.count("OK")
        assert opened.resumed
        assert opened.reservation_id == res.id
        assert (opened.usage.input_tokens, opened.usage.output_tokens) == res.usage
        assert opened.granted_output_tokens == res.grant[1]
        mark = report_mark(res.grant[1], opened.grant_final, max_output)
        assert opened.report_at_output_tokens == mark, (opened, mark)
        res.live = True
        res.expires_at_us = self.now_us + STREAM_TTL_US
        self.streams.append(
            LiveStream(
                stream,
                res.id,
                res.budget_id,
                max_output,
                usage=res.usage,
                grant_output=res.grant[1],
            )
        )
        self.entries(0)

    @precondition(has_budgets)
    @rule(
        pick=PICK,
        defect=st.sampled_from(
            [
                "usage-first",
                "finish-first",
                "empty",
                "empty-id",
                "bad-id",
                "unknown",
                "prompt-negative",
                "prompt-huge",
                "max-output-negative",
                "labels",
                "resume-unknown",
                "resume-bad-id",
                "garbage",
            ]
        ),
        garbage=GARBAGE,
        number=st.integers(1, INT64_MAX),
    )
    @counted
    def meter_open_malformed(self, pick: int, defect: str, garbage: bytes, number: int) -> None:
        budget = self.pick_budget(pick)
        opening = pb.MeterOpen(budget_id=budget.id, prompt_tokens_estimate=10)
        first = pb.MeterRequest(open=opening)
        expected = "INVALID_ARGUMENT"
        if defect == "usage-first":
            first = pb.MeterRequest(usage=pb.MeterUsage(usage=pb.Usage(output_tokens=1)))
        elif defect == "finish-first":
            first = pb.MeterRequest(finish=pb.MeterFinish())
        elif defect == "empty":
            first = pb.MeterRequest()
        elif defect == "empty-id":
            first.open.budget_id = ""
        elif defect == "bad-id":
            first.open.budget_id = "#" + budget.id
        elif defect == "unknown":
            first.open.budget_id, expected = f"{self.prefix}/ghost", "NOT_FOUND"
        elif defect == "prompt-negative":
            first.open.prompt_tokens_estimate = -number
        elif defect == "prompt-huge":
            first.open.prompt_tokens_estimate = AMOUNT_MAX + 1 + number % (INT64_MAX - AMOUNT_MAX)
        elif defect == "max-output-negative":
            first.open.max_output_tokens = -number
        elif defect == "labels":
            first.open.labels.update({f"k{i}": "v" for i in range(LABELS_MAX + 1)})
        elif defect == "resume-unknown":
            first = pb.MeterRequest(open=pb.MeterOpen(resume_reservation_id=GHOST_RESERVATION))
            expected = "NOT_FOUND"
        elif defect == "resume-bad-id":
            first = pb.MeterRequest(open=pb.MeterOpen(resume_reservation_id="r_\x01" * 20))
        else:
            data = undecodable(pb.MeterRequest, garbage)
            if data is None:
                return
            self.raw_garbage_call(
                "/budgetd.v1.BudgetService/Meter", pb.MeterRequest, data, streaming=True
            )
            return
        stream, event = self.open_stream(first)
        assert event is None, event
        code = stream.code.name if stream.code else "?"
        self.expect(code, expected, f"Meter open {defect}", stream.details)
        stream.close()
        self.entries(0)

    # ------------------------------------------------------------------ junk

    RAW_METHODS: ClassVar[list[tuple[str, Any, bool]]] = [
        ("/budgetd.v1.BudgetService/Reserve", pb.ReserveRequest, False),
        ("/budgetd.v1.BudgetService/Extend", pb.ExtendRequest, False),
        ("/budgetd.v1.BudgetService/Commit", pb.CommitRequest, False),
        ("/budgetd.v1.BudgetService/Release", pb.ReleaseRequest, False),
        ("/budgetd.v1.BudgetService/Charge", pb.ChargeRequest, False),
        ("/budgetd.v1.BudgetService/GetBudget", pb.GetBudgetRequest, True),
        ("/budgetd.v1.AdminService/FreezeBudget", pb.FreezeBudgetRequest, False),
        ("/budgetd.v1.AdminService/UnfreezeBudget", pb.UnfreezeBudgetRequest, False),
        ("/budgetd.v1.AdminService/UpdateBudget", pb.UpdateBudgetRequest, False),
        ("/budgetd.v1.AdminService/DeleteBudget", pb.DeleteBudgetRequest, False),
        ("/budgetd.v1.AdminService/ListLedgerEntries", pb.ListLedgerEntriesRequest, True),
        ("/budgetd.v1.AdminService/ListReservations", pb.ListReservationsRequest, True),
        ("/budgetd.v1.AdminService/VerifyLedger", pb.VerifyLedgerRequest, True),
    ]

    @rule(method=st.integers(0, 12), data=GARBAGE)
    @counted
    def raw_garbage(self, method: int, data: bytes) -> None:
        path, cls, read_only = self.RAW_METHODS[method]
        self.raw_garbage_call(path, cls, data, read_only=read_only)

    def raw_garbage_call(
        self, path: str, cls: Any, data: bytes, *, read_only: bool = False, streaming: bool = False
    ) -> None:
        if streaming:
            call = self.run.channel.stream_stream(
                path, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw
            )
            outcome, error = code_of(lambda: list(call(iter([data]), timeout=RPC_S)))
        else:
            unary = self.run.channel.unary_unary(
                path, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw
            )
            outcome, error = code_of(lambda: unary(data, timeout=RPC_S))
        self.count(outcome)
        assert outcome not in ("UNKNOWN", "INTERNAL"), f"{path} on junk: {details(error)}"
        if not decodes_as(cls, data):
            assert outcome == "INVALID_ARGUMENT", f"{path} on undecodable junk: {outcome}"
        elif read_only:
            assert outcome in REFUSALS | {"OK"}, f"{path}: {outcome} {details(error)}"
        else:
            assert outcome in REFUSALS, f"{path} accepted junk {data!r}: {outcome}"
        self.entries(0)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def ledger_matches_model(self) -> None:
        self.run.steps += 1
        verified = self.run.admin.VerifyLedger(pb.VerifyLedgerRequest(), timeout=RPC_S)
        assert verified.ok, f"ledger drift: {list(verified.drifts)}"
        if self.entries_expected is not None:
            assert verified.entries_checked == self.entries_expected, (
                f"{verified.entries_checked} entries, the model expects {self.entries_expected}"
            )
        self.entries_expected = verified.entries_checked
        listed = self.run.admin.ListBudgets(
            pb.ListBudgetsRequest(prefix=self.prefix + "/", page_size=1000), timeout=RPC_S
        )
        assert {b.id for b in listed.budgets} == set(self.model.budgets)
        for budget in listed.budgets:
            if budget.mode == pb.MODE_HARD:
                assert budget.spent + budget.reserved <= budget.limit + budget.overage, budget
            self.check_budget(budget)

    def teardown(self) -> None:
        """Close this example's streams and expire what it left pending, so that the next
        example's clock moves cannot touch them."""
        for live in list(self.streams):
            live.stream.close()
            self.wait_closed(live.reservation_id)
        self.streams.clear()
        self.clock.advance(seconds=AFTER_EVERYTHING_S)
        self.sweep()


def fuzz_settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fuzz_run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FuzzRun]:
    clock = ManualClock(time.time_ns() // 1000)
    # Expiry happens only when a step sweeps (after moving the clock), never behind its back.
    with threaded_server(
        str(request.param), tmp_path, clock, sweep_interval_s=3600, insecure=True
    ) as server:
        channel = grpc.insecure_channel(server.address)
        try:
            yield FuzzRun(
                server,
                pb_grpc.BudgetServiceStub(channel),
                pb_grpc.AdminServiceStub(channel),
                channel,
            )
        finally:
            channel.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ledger_state_machine(fuzz_run: FuzzRun) -> None:
    machine = type("Machine", (LedgerMachine,), {"run": fuzz_run})
    started = time.monotonic()
    try:
        run_state_machine_as_test(machine, settings=fuzz_settings())
    finally:
        print(
            f"\nfuzz on {fuzz_run.server.backend}: {fuzz_run.examples} sequences, "
            f"{fuzz_run.steps} checked steps in {time.monotonic() - started:.1f} s; "
            f"outcomes {dict(sorted(fuzz_run.outcomes.items()))}; "
            f"rules {dict(sorted(fuzz_run.rules.items()))}"
        )


# ----------------------------------------------------------------------------- bugs found


async def test_usage_reaching_max_output_does_not_extend_forever(api: Stubs) -> None:
    await create(api, "fz:max-output", 10_000)
    call, opened = await open_stream(api, open_request("fz:max-output", max_output_tokens=256))
    assert opened.granted_output_tokens == 256
    await call.write(usage_request(10, 256))  # the reply stopped at max_tokens, as they do
    await asyncio.sleep(0.5)
    entries = await all_entries(api, "fz:max-output")
    extensions = [e for e in entries if e.kind == pb.ENTRY_KIND_EXTEND]
    await call.write(finish_request())
    assert (await next_event(call)).WhichOneof("event") == "committed"
    assert len(extensions) <= 1, f"{len(extensions)} EXTEND entries in 0.5 s"
    await assert_ledger_clean(api)


async def _expire_due(
    api: Stubs, server: BudgetServer, clock: ManualClock, budget_id: str, reservation_id: str
) -> None:
    """Sweep now; the server's own sweeper (every 50 ms for these tests) may end the
    reservation first, so what must hold is that it ended EXPIRED, not who ended it."""
    assert server.ledger is not None
    await sweep_once(server.ledger, clock)
    page = await api.admin.ListReservations(
        pb.ListReservationsRequest(budget_id=budget_id, state=pb.RESERVATION_STATE_EXPIRED)
    )
    assert reservation_id in [r.id for r in page.reservations], "the reservation cannot expire"


async def test_a_refused_commit_changes_nothing(
    api: Stubs, server: BudgetServer, clock: ManualClock
) -> None:
    await create(api, "fz:refused", 1000)
    held = await api.budget.Reserve(
        pb.ReserveRequest(budget_id="fz:refused", amount=100, ttl_ms=1000)
    )
    too_much = pb.Usage(input_tokens=AMOUNT_MAX, output_tokens=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Commit(
            pb.CommitRequest(reservation_id=held.reservation.id, usage=too_much)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    clock.advance(seconds=2)
    await _expire_due(api, server, clock, "fz:refused", held.reservation.id)
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="fz:refused"))).budget
    assert (budget.spent, budget.reserved) == (0, 0)
    await assert_ledger_clean(api)


async def test_meter_usage_beyond_amount_max_is_refused(
    api: Stubs, server: BudgetServer, clock: ManualClock
) -> None:
    await create(api, "fz:beyond", 10**6, mode=pb.MODE_SOFT)
    call, opened = await open_stream(api, open_request("fz:beyond"))
    await call.write(usage_request(10, AMOUNT_MAX))  # each count is fine, the sum is not
    call.cancel()
    # The broken stream's close records its last usage and sets its expiry from the clock:
    # it must be done before the clock moves.
    assert server.meter is not None
    await server.meter.closed()
    clock.advance(seconds=3600)
    await _expire_due(api, server, clock, "fz:beyond", opened.reservation_id)
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="fz:beyond"))).budget
    assert budget.reserved == 0
    await assert_ledger_clean(api)


async def test_a_refused_charge_can_be_retried(api: Stubs) -> None:
    await create(api, "fz:usd", 10**12, unit=pb.UNIT_USD)
    spooled = pb.ChargeRequest(
        budget_id="fz:usd",
        usage=pb.Usage(input_tokens=1000, output_tokens=500),
        model="fz-unpriced-model",
        idempotency_key="spool-1",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.budget.Charge(spooled)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await api.admin.SetPrice(
        pb.SetPriceRequest(
            price=pb.ModelPrice(
                model="fz-unpriced-model",
                input_nanousd_per_mtok=10**9,
                output_nanousd_per_mtok=2 * 10**9,
            )
        )
    )
    retried = await api.budget.Charge(spooled)
    assert not retried.replayed
    assert retried.charged == 2_000_000  # $1 and $2 per million tokens: $0.002
    await assert_ledger_clean(api)


async def test_a_commit_within_its_hold_is_not_refused(api: Stubs) -> None:
    await create(api, "fz:full", 0, mode=pb.MODE_SOFT)
    await api.budget.Reserve(pb.ReserveRequest(budget_id="fz:full", amount=AMOUNT_MAX))
    held = await api.budget.Reserve(pb.ReserveRequest(budget_id="fz:full", amount=AMOUNT_MAX - 10))
    done = await api.budget.Commit(  # spent + reserved stays 2**63 - 10: it fits
        pb.CommitRequest(reservation_id=held.reservation.id, amount=AMOUNT_MAX - 10)
    )
    assert done.charged == AMOUNT_MAX - 10
    assert (done.budget.spent, done.budget.reserved) == (AMOUNT_MAX - 10, AMOUNT_MAX)
    await assert_ledger_clean(api)


async def test_a_late_commit_is_bounded_by_what_it_adds(
    api: Stubs, server: BudgetServer, clock: ManualClock
) -> None:
    await create(api, "fz:late", 0, mode=pb.MODE_SOFT)
    await api.budget.Reserve(
        pb.ReserveRequest(budget_id="fz:late", amount=AMOUNT_MAX, ttl_ms=TTL_MAX_MS)
    )
    call, opened = await open_stream(api, open_request("fz:late"))
    half = AMOUNT_MAX // 2
    await call.write(usage_request(0, half))
    await wait_session_usage(server, "fz:late", opened.reservation_id, half)
    call.cancel()
    # The broken stream's close records its usage and sets its expiry from the clock, so
    # it must be done before the clock moves (a sleep here raced it on a loaded machine).
    await wait_until(
        lambda: live_session(server, "fz:late", opened.reservation_id) is None, "stream closed"
    )
    assert server.meter is not None
    await server.meter.closed()
    clock.advance(seconds=61)
    await _expire_due(api, server, clock, "fz:late", opened.reservation_id)  # charged `half`
    more = pb.Usage(output_tokens=half + 1)  # one token more than was charged at expiry
    done = await api.budget.Commit(
        pb.CommitRequest(reservation_id=opened.reservation_id, usage=more)
    )
    assert done.charged == half + 1
    assert (done.budget.spent, done.budget.reserved) == (half + 1, AMOUNT_MAX)
    await assert_ledger_clean(api)
