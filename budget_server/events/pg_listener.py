"""Events from the other budgetd processes on one PostgreSQL, through LISTEN/NOTIFY.

A dedicated asyncpg connection listens on the channel the publisher notifies in each
transaction; events from this process itself are skipped (they were published locally
after commit). The connection is re-made with back-off if PostgreSQL restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from budget_server.events.bus import EventBus
from budget_server.events.model import BudgetEvent
from budget_server.events.publisher import NOTIFY_CHANNEL

log = logging.getLogger("budgetd.events")


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def listen_forever(db_url: str, bus: EventBus, origin: str) -> None:
    """Relay other processes' events to the local bus until cancelled."""
    dsn = asyncpg_dsn(db_url)
    pause_s = 0.1

    def relay(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message.get("origin") != origin:
                bus.publish(BudgetEvent.from_json(message["event"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed event notification: %.200s", payload)

    while True:
        connection: asyncpg.Connection | None = None
        try:
            connection = await asyncpg.connect(dsn, timeout=10)
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await connection.add_listener(NOTIFY_CHANNEL, relay)
            pause_s = 0.1
            while not lost.is_set():
                # asyncpg notices a dead socket only when it uses it; poke it now and then.
                try:
                    await asyncio.wait_for(lost.wait(), 5)
                except TimeoutError:
                    await connection.execute("SELECT 1")
        except asyncio.CancelledError:
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("event listener lost PostgreSQL (%s); retrying in %.1f s", exc, pause_s)
        finally:
            if connection is not None and not connection.is_closed():
                connection.terminate()
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, 5.0)
