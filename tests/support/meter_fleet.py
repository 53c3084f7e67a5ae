"""A client process for the fleet test: many metered streams through the official openai SDK.

Run as `python -m tests.support.meter_fleet --budgetd A[,B] --base-url URL --budget ID
--streams N --seed S`; every stream asks the fake OpenAI server for a reply of its own
length and pace (x-fake-tokens / x-fake-rate), all streams start together, and the outcome
of each is printed as one JSON document: {"streams": [...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import openai

from budget_client import BudgetClient, BudgetExceeded, MeteredAsyncStream, wrap_openai


async def one_stream(
    oai: Any, budget_id: str, index: int, tokens: int, rate: float, start: asyncio.Event
) -> dict[str, Any]:
    outcome: dict[str, Any] = {
        "index": index,
        "tokens_requested": tokens,
        "rate": rate,
        "refused": False,
        "aborted": False,
        "request_id": "",
        "received_text": "",
    }
    await start.wait()
    try:
        stream: MeteredAsyncStream = await oai.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": f"Tell me a long story, number {index}."}],
            stream=True,
            budget=budget_id,
            extra_headers={"x-fake-tokens": str(tokens), "x-fake-rate": str(rate)},
        )
    except BudgetExceeded as refused:  # nothing was sent: the budget was gone at open
        outcome.update(refused=True, available=refused.available)
        return outcome
    meter = stream.meter
    at_abort: dict[str, Any] = {}

    def on_abort(_error: BudgetExceeded) -> None:
        # What the client had counted when budgetd's abort reached it: the tokens counted
        # beyond the grant until then are the ones that were in flight.
        at_abort.update(output=meter.usage.output_tokens, granted=meter.granted_output_tokens)
        at_abort["at"] = time.time()

    meter.on_abort(on_abort)
    pieces: list[str] = []
    reached_grant_at: float | None = None  # when our count last reached the grant we knew of
    try:
        async for chunk in stream:
            outcome["request_id"] = outcome["request_id"] or chunk.id
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
            if meter.usage.output_tokens < meter.granted_output_tokens:
                reached_grant_at = None
            elif reached_grant_at is None and not at_abort:
                reached_grant_at = time.time()
    except BudgetExceeded as cut:
        outcome.update(aborted=True, uncounted_tail=cut.uncounted_tail)
    committed = meter.committed
    assert committed is not None
    outcome.update(
        received_text="".join(pieces),
        counted_text=meter.counter.text,
        reservation_id=meter.reservation_id,
        prompt_estimate=meter.prompt_tokens,
        counted_output=meter.counter.output_tokens,
        usage_input=meter.usage.input_tokens,
        usage_output=meter.usage.output_tokens,
        granted_output=meter.granted_output_tokens,
        output_at_abort=at_abort.get("output"),
        granted_at_abort=at_abort.get("granted"),
        abort_at=at_abort.get("at"),
        reached_grant_at=reached_grant_at,
        closed_at=time.time(),
        charged=committed.charged,
        overage=committed.overage,
        spooled=committed.spooled,
        meter_state=meter.state,
    )
    return outcome


async def fleet(
    addresses: list[str],
    base_url: str,
    budget_id: str,
    spool_dir: Path,
    count: int,
    seed: int,
    tokens: tuple[int, int],
    rates: tuple[float, float],
) -> dict[str, Any]:
    rng = random.Random(seed)
    plans = [(rng.randint(*tokens), round(rng.uniform(*rates))) for _ in range(count)]
    async with (
        BudgetClient(addresses, spool_dir=spool_dir) as budgets,
        openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0) as raw,
    ):
        oai = wrap_openai(raw, budgets)
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(one_stream(oai, budget_id, seed * 1000 + i, n, r, start))
            for i, (n, r) in enumerate(plans)
        ]
        await asyncio.sleep(0.05)
        start.set()
        streams = await asyncio.gather(*tasks)
    return {"streams": streams}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgetd", required=True, help="host:port[,host:port...]")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--budget", required=True)
    parser.add_argument("--spool-dir", required=True, type=Path)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", default="200,2000", help="min,max reply tokens")
    parser.add_argument("--rates", default="100,300", help="min,max tokens per second")
    args = parser.parse_args()
    low, high = (int(x) for x in args.tokens.split(","))
    slow, fast = (float(x) for x in args.rates.split(","))
    result = asyncio.run(
        fleet(
            args.budgetd.split(","),
            args.base_url,
            args.budget,
            args.spool_dir,
            args.streams,
            args.seed,
            (low, high),
            (slow, fast),
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
