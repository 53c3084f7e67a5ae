"""A client process for the concurrency tests: many concurrent Reserve calls, results as JSON.

Run as `python -m tests.support.reserve_storm --address A[,B] --budgets X[,Y] ...`; calls
are spread round-robin over the addresses and budgets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc


async def storm(
    addresses: list[str], budget_ids: list[str], count: int, size_max: int, seed: int
) -> dict[str, object]:
    rng = random.Random(seed)
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [pb_grpc.BudgetServiceStub(c) for c in channels]
    granted: list[dict[str, object]] = []
    refused: list[dict[str, object]] = []
    start = asyncio.Event()

    async def one(i: int) -> None:
        amount = rng.randint(1, size_max)
        budget_id = budget_ids[i % len(budget_ids)]
        await start.wait()
        try:
            response = await stubs[i % len(stubs)].Reserve(
                pb.ReserveRequest(budget_id=budget_id, amount=amount, ttl_ms=600_000), timeout=60
            )
            granted.append({"budget": budget_id, "amount": response.reservation.granted})
        except grpc.aio.AioRpcError as error:
            refused.append({"budget": budget_id, "amount": amount, "code": error.code().name})

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await asyncio.sleep(0.05)
    start.set()
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return {"granted": granted, "refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--budgets", required=True)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--size-max", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = asyncio.run(
        storm(
            args.address.split(","), args.budgets.split(","), args.count, args.size_max, args.seed
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
