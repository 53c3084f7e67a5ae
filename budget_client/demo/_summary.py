"""The demo's result: per app, the ledger's own check, and the fake server's side of it.

Printed for people by the renderer and, as the last line, as `SUMMARY {json}` for scripts
and the test.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client.demo._state import AppView, DemoState

Ending = Literal["exhausted", "duration-limit", "interrupted", "error"]


@dataclass(frozen=True, slots=True)
class AppTotals:
    name: str
    reply_tokens: int
    streams: int
    completed: int
    aborted: int
    refused: int
    output_tokens: int
    input_tokens: int
    charged_tokens: int
    overage_tokens: int
    exit_reason: str
    exit_code: int | None

    @classmethod
    def of(cls, app: AppView) -> AppTotals:
        return cls(
            name=app.name,
            reply_tokens=app.reply_tokens,
            streams=len(app.results),
            completed=app.completed,
            aborted=app.aborts,
            refused=app.refusals,
            output_tokens=sum(r.output_tokens for r in app.results),
            input_tokens=sum(r.input_tokens for r in app.results),
            charged_tokens=app.charged_tokens,
            overage_tokens=app.overage_tokens,
            exit_reason=app.exit_reason,
            exit_code=app.exit_code,
        )


@dataclass(frozen=True, slots=True)
class Verification:
    """AdminService.VerifyLedger: the running figures recomputed from the entries."""

    ok: bool
    budgets_checked: int
    entries_checked: int
    drifts: list[str]

    @classmethod
    def of(cls, response: pb.VerifyLedgerResponse) -> Verification:
        return cls(
            ok=response.ok,
            budgets_checked=response.budgets_checked,
            entries_checked=response.entries_checked,
            drifts=[
                f"{d.budget_id} {d.figure}: recorded {d.recorded}, recomputed {d.recomputed}"
                for d in response.drifts
            ],
        )


@dataclass(frozen=True, slots=True)
class CutStream:
    """A stream that was cut off: what the server sent against what the ledger charged."""

    app: str
    stream: int
    sent_tokens: int
    """Output tokens the fake server wrote to the socket."""
    counted_tokens: int
    """Output tokens the client counted, and the ledger charged."""
    grant_tokens: int
    overage_tokens: int
    reply_tokens: int
    """How long the reply would have been."""
    completed: bool
    """The server had sent the whole reply before it saw the client close (a cut close
    to the end, on a slow machine)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """The fake OpenAI server's records, against the ledger's charges."""

    requests: int
    completed: int
    cut_off: int
    output_tokens_sent: int
    prompt_tokens: int
    output_tokens_charged: int
    input_tokens_charged: int
    cut_streams: list[CutStream]

    @property
    def unseen_tokens(self) -> int:
        """Sent, but still in flight when the stream was closed: never counted or charged."""
        return self.output_tokens_sent - self.output_tokens_charged

    @classmethod
    def of(cls, records: Sequence[Mapping[str, object]], apps: Sequence[AppView]) -> Upstream:
        by_id = {str(r.get("request_id")): r for r in records}
        cut: list[CutStream] = []
        for app in apps:
            for result in app.results:
                record = by_id.get(result.request_id)
                if result.outcome == "done" or record is None:
                    continue
                cut.append(
                    CutStream(
                        app=app.name,
                        stream=result.number,
                        sent_tokens=_int(record.get("tokens_sent")),
                        counted_tokens=result.output_tokens,
                        grant_tokens=result.grant_tokens,
                        overage_tokens=result.overage_tokens,
                        reply_tokens=app.reply_tokens,
                        completed=record.get("completed") is True,
                    )
                )
        return cls(
            requests=len(records),
            completed=sum(1 for r in records if r.get("completed") is True),
            cut_off=sum(1 for r in records if r.get("disconnected") is True),
            output_tokens_sent=sum(_int(r.get("tokens_sent")) for r in records),
            prompt_tokens=sum(_int(r.get("prompt_tokens")) for r in records),
            output_tokens_charged=sum(r.output_tokens for a in apps for r in a.results),
            input_tokens_charged=sum(r.input_tokens for a in apps for r in a.results),
            cut_streams=cut,
        )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class Summary:
    ending: Ending
    exhausted: bool
    """Every app stopped because its next request was refused with nothing held."""
    elapsed_s: float
    budget_id: str
    limit: int
    spent: int
    reserved: int
    overage: int
    available: int
    charged_tokens: int
    """What the apps were told the ledger charged them, summed over every stream."""
    aborts: int
    apps: list[AppTotals]
    alerts_pct: list[int]
    verification: Verification | None
    upstream: Upstream | None
    errors: list[str]

    @classmethod
    def of(
        cls,
        state: DemoState,
        ending: Ending,
        verification: Verification | None,
        upstream: Upstream | None,
        errors: Sequence[str],
    ) -> Summary:
        budget = state.budget
        return cls(
            ending=ending,
            exhausted=ending == "exhausted" and state.exhausted,
            elapsed_s=round(state.elapsed_s(), 2),
            budget_id=state.budget_id,
            limit=state.limit,
            spent=budget.spent if budget else 0,
            reserved=budget.reserved if budget else 0,
            overage=budget.overage if budget else 0,
            available=budget.available if budget else 0,
            charged_tokens=state.charged_tokens,
            aborts=state.aborts,
            apps=[AppTotals.of(app) for app in state.apps],
            alerts_pct=sorted(state.alerts_s),
            verification=verification,
            upstream=upstream,
            errors=list(errors),
        )

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if self.upstream is not None:
            data["upstream"]["unseen_tokens"] = self.upstream.unseen_tokens
        return json.dumps(data, separators=(",", ":"))
