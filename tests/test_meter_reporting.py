"""How often a client meter reports usage: below budgetd's report mark (the refill mark of
the grant, or the grant itself when it cannot grow) budgetd only keeps the count, so the
client sends it once per `usage_report_interval_s`; from the mark on every change goes at
once, so that extensions and aborts are decided on time. Real client, real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from budget_client import BudgetClient, Meter
from budget_server.app import BudgetServer
from budget_server.meter.policy import GrantPolicy
from tests.support.ledger import assert_ledger_clean, create
from tests.support.meter import live_session, refill_mark, wait_session_usage, wait_until
from tests.support.servers import Stubs

INITIAL = GrantPolicy().initial_output_tokens  # 256
MARK = refill_mark(INITIAL)  # 192: where the server extends the grant
QUIET_S = 0.3  # long enough for a message sent at once to have arrived


@asynccontextmanager
async def open_meter(
    server: BudgetServer, tmp_path: Path, budget_id: str, interval_s: float, prompt_tokens: int
) -> AsyncIterator[Meter]:
    """An open meter on a fresh budget, from a client reporting below the mark every
    `interval_s`."""
    async with BudgetClient(
        server.address, spool_dir=tmp_path, usage_report_interval_s=interval_s
    ) as client:
        meter = client.meter(budget_id, model="gpt-4o", prompt_tokens=prompt_tokens)
        await meter.open()
        yield meter


async def test_below_the_mark_usage_waits_for_the_interval_and_from_it_goes_at_once(
    server: BudgetServer, api: Stubs, tmp_path: Path
) -> None:
    await create(api, "report:mark", 10**6)
    async with open_meter(server, tmp_path, "report:mark", 3600, prompt_tokens=40) as meter:
        assert (meter.granted_output_tokens, meter.report_at_output_tokens) == (INITIAL, MARK)
        for _ in range(MARK - 1):
            meter.add_output_tokens(1)
        await asyncio.sleep(QUIET_S)
        session = live_session(server, "report:mark", meter.reservation_id)
        assert session is not None
        assert session.usage.output_tokens == 0, "usage below the mark was sent at once"

        meter.add_output_tokens(1)  # reaches the mark: sent at once, and the grant grows
        await wait_session_usage(server, "report:mark", meter.reservation_id, MARK)
        await wait_until(lambda: meter.granted_output_tokens == 2 * INITIAL, "the grown grant")
        assert meter.report_at_output_tokens == refill_mark(2 * INITIAL)
        meter.add_output_tokens(1)  # below the new mark again
        await asyncio.sleep(QUIET_S)
        assert session.usage.output_tokens == MARK

        committed = await meter.finish()  # the last count goes with the finish
    assert committed.charged == 40 + MARK + 1
    await assert_ledger_clean(api)


async def test_below_the_mark_usage_is_still_sent_every_interval(
    server: BudgetServer, api: Stubs, tmp_path: Path
) -> None:
    """budgetd charges a stream whose client died at the last count it received."""
    await create(api, "report:beat", 10**6)
    async with open_meter(server, tmp_path, "report:beat", 0.05, prompt_tokens=0) as meter:
        for _ in range(10):
            meter.add_output_tokens(1)
        await wait_session_usage(server, "report:beat", meter.reservation_id, 10)
        meter.add_output_tokens(5)
        await wait_session_usage(server, "report:beat", meter.reservation_id, 15)
        assert (await meter.finish()).charged == 15
    await assert_ledger_clean(api)
