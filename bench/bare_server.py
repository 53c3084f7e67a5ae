"""The limits budgetd is measured against: a bare grpc.aio BudgetService.Meter, optionally
with the naive ledger behind it.

    python -m bench.bare_server --listen 127.0.0.1:0                      # bare
    python -m bench.bare_server --listen 127.0.0.1:0 --naive-db URL       # naive ledger

The first stdout line is `bare listening on HOST:PORT` (or `naive listening on ...`).

Bare: the same bidirectional messages as budgetd (open, cumulative usage, finish), decoded
the same way, and nothing done with them: `opened` answers open, `committed` (with the
last usage) answers finish, usage messages get no reply. Two budget-id conventions make it
the limit of the latency measures too:

* `echo...`: every usage message is answered with `granted`, a bare round trip;
* `abort-at-N...`: an `abort` is sent when cumulative output reaches N, the abort budgetd
  sends from memory at the edge of a grant, minus everything budgetd knows.

Naive (`--naive-db`): open reserves and finish commits through `NaiveLedger`, one SQL
transaction each, the way an obvious implementation would; usage stays in memory.

AdminService.CreateBudget is answered too (a no-op when bare), so the benchmark creates its
budgets the same way on every kind of server; and BudgetService.Commit, a no-op on either,
which a client falls back to when `committed` does not come within its wait on a loaded
machine, so that the client path ends the same way against both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from bench.common import run
from bench.naive_ledger import NaiveExhausted, NaiveLedger
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.db.engine import open_database

_ABORT_AT = re.compile(r"abort-at-(\d+)")
DEFAULT_GRANT_OUTPUT_TOKENS = 256  # what budgetd grants at open (GrantPolicy)
Context = aio.ServicerContext[Any, Any]


class BareMeter:
    def __init__(self, ledger: NaiveLedger | None) -> None:
        self.ledger = ledger
        self.reservations = 0

    async def meter(
        self, requests: AsyncIterator[pb.MeterRequest], context: Context
    ) -> AsyncIterator[pb.MeterEvent]:
        budget_id = ""
        reservation_id = ""
        granted = 0
        echo = False
        abort_at = 0
        usage = pb.Usage()
        async for request in requests:
            kind = request.WhichOneof("msg")
            if kind == "usage":
                usage = request.usage.usage
                if echo:
                    yield pb.MeterEvent(
                        granted=pb.MeterGranted(granted_output_tokens=usage.output_tokens)
                    )
                elif abort_at and usage.output_tokens >= abort_at:
                    abort_at = 0
                    yield pb.MeterEvent(
                        abort=pb.MeterAbort(
                            reason=pb.ABORT_REASON_EXHAUSTED,
                            budget_id=budget_id,
                            message="bare abort",
                        )
                    )
            elif kind == "open":
                opening = request.open
                budget_id = opening.budget_id
                echo = budget_id.startswith("echo")
                match = _ABORT_AT.match(budget_id)
                abort_at = int(match.group(1)) if match else 0
                granted = abort_at or opening.max_output_tokens or DEFAULT_GRANT_OUTPUT_TOKENS
                if self.ledger is not None:
                    amount = opening.prompt_tokens_estimate + granted
                    try:
                        reservation_id = await self.ledger.reserve(budget_id, amount)
                    except NaiveExhausted:
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "exhausted")
                else:
                    self.reservations += 1
                    reservation_id = f"bare-{self.reservations}"
                yield pb.MeterEvent(
                    opened=pb.MeterOpened(
                        reservation_id=reservation_id, granted_output_tokens=granted
                    )
                )
            elif kind == "finish":
                final = request.finish.usage if request.finish.has_provider_usage else usage
                charged = final.input_tokens + final.output_tokens
                if self.ledger is not None:
                    await self.ledger.commit(reservation_id, charged)
                yield pb.MeterEvent(
                    committed=pb.MeterCommitted(
                        reservation=pb.Reservation(
                            id=reservation_id,
                            budget_id=budget_id,
                            state=pb.RESERVATION_STATE_COMMITTED,
                            usage=final,
                            charged=charged,
                        ),
                        charged=charged,
                    )
                )
                return

    async def commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        """Answers without touching the naive ledger: only the client's fallback calls it, and
        the naive measure drives raw Meter streams, never the client."""
        charged = request.usage.input_tokens + request.usage.output_tokens or request.amount
        reservation = pb.Reservation(
            id=request.reservation_id,
            state=pb.RESERVATION_STATE_COMMITTED,
            usage=request.usage,
            charged=charged,
        )
        return pb.CommitResponse(reservation=reservation, charged=charged)

    async def create_budget(
        self, request: pb.CreateBudgetRequest, context: Context
    ) -> pb.CreateBudgetResponse:
        if self.ledger is not None:
            await self.ledger.create_budget(request.id, request.limit)
        return pb.CreateBudgetResponse(
            budget=pb.Budget(id=request.id, unit=request.unit, limit=request.limit)
        )


async def serve(listen: str, naive_db: str | None) -> None:
    ledger = None
    if naive_db:
        ledger = NaiveLedger(open_database(naive_db))
        await ledger.create_schema()
    bare = BareMeter(ledger)
    server = aio.server()
    meter_handler = grpc.stream_stream_rpc_method_handler(
        bare.meter,
        request_deserializer=pb.MeterRequest.FromString,
        response_serializer=pb.MeterEvent.SerializeToString,
    )
    create_handler = grpc.unary_unary_rpc_method_handler(
        bare.create_budget,
        request_deserializer=pb.CreateBudgetRequest.FromString,
        response_serializer=pb.CreateBudgetResponse.SerializeToString,
    )
    commit_handler = grpc.unary_unary_rpc_method_handler(
        bare.commit,
        request_deserializer=pb.CommitRequest.FromString,
        response_serializer=pb.CommitResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "budgetd.v1.BudgetService", {"Meter": meter_handler, "Commit": commit_handler}
            ),
            grpc.method_handlers_generic_handler(
                "budgetd.v1.AdminService", {"CreateBudget": create_handler}
            ),
        )
    )
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rsplit(":", 1)[0]
    print(f"{'naive' if ledger else 'bare'} listening on {host}:{port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1.0)
    if ledger is not None:
        await ledger.db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--naive-db", help="serve the naive ledger on this database URL")
    args = parser.parse_args()
    run(serve(args.listen, args.naive_db))


if __name__ == "__main__":
    main()
