"""The sync twin of BudgetClient, for apps without an event loop.

One private event loop runs in a daemon thread and owns the gRPC channel; calls hop to it
and wait. Token counting stays in the app's thread (it is CPU work that needs no loop) and
only the totals are handed over with `call_soon_threadsafe`, which costs microseconds and
never blocks the app's read of the upstream stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from budget_client._client import BudgetClient
from budget_client._config import ClientConfig, FailPolicy
from budget_client._counting import OutputCounter
from budget_client._errors import BudgetExceeded
from budget_client._meter import Meter
from budget_client._types import Budget, Committed, Reservation, Usage

T = TypeVar("T")


class SyncBudgetClient:
    """Blocking BudgetClient: `with SyncBudgetClient("127.0.0.1:50051") as budgets: ...`"""

    def __init__(
        self,
        address: str | list[str] | tuple[str, ...] | None = None,
        *,
        fail_policy: FailPolicy | None = None,
        config: ClientConfig | None = None,
        **overrides: object,
    ) -> None:
        self._client = BudgetClient(address, fail_policy=fail_policy, config=config, **overrides)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="budgetd-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def config(self) -> ClientConfig:
        return self._client.config

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for its result."""
        if self._closed:
            coroutine.close()
            raise RuntimeError("the SyncBudgetClient is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncBudgetClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel, stop the loop thread; idempotent."""
        if self._closed:
            return
        self.run(self._client.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def reserve(
        self,
        budget_id: str,
        amount: int = 0,
        *,
        estimate: Usage | None = None,
        model: str = "",
        ttl_ms: int = 0,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Reservation:
        return self.run(
            self._client.reserve(
                budget_id,
                amount,
                estimate=estimate,
                model=model,
                ttl_ms=ttl_ms,
                idempotency_key=idempotency_key,
                labels=labels,
            )
        )

    def extend(self, reservation_id: str, amount: int, *, ttl_ms: int = 0) -> Reservation:
        return self.run(self._client.extend(reservation_id, amount, ttl_ms=ttl_ms))

    def commit(
        self, reservation_id: str, *, usage: Usage | None = None, amount: int = 0
    ) -> Committed:
        return self.run(self._client.commit(reservation_id, usage=usage, amount=amount))

    def release(self, reservation_id: str) -> Reservation:
        return self.run(self._client.release(reservation_id))

    def get_budget(self, budget_id: str) -> Budget:
        return self.run(self._client.get_budget(budget_id))

    def replay_spool(self) -> int:
        return self.run(self._client.replay_spool())

    def meter(
        self,
        budget_id: str,
        *,
        model: str,
        prompt_tokens: int = 0,
        max_output_tokens: int = 0,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> SyncMeter:
        async def make() -> Meter:
            return self._client.meter(
                budget_id,
                model=model,
                prompt_tokens=prompt_tokens,
                max_output_tokens=max_output_tokens,
                labels=labels,
                idempotency_key=idempotency_key,
            )

        return SyncMeter(self, self.run(make()))


class SyncMeter:
    """A Meter driven from a synchronous thread; `with budgets.meter(...) as meter:`."""

    def __init__(self, client: SyncBudgetClient, meter: Meter) -> None:
        self._client = client
        self._meter = meter
        self.counter = OutputCounter(meter.model)
        self._output_tokens = 0

    @property
    def reservation_id(self) -> str:
        return self._meter.reservation_id

    @property
    def aborted(self) -> BudgetExceeded | None:
        return self._meter.aborted

    @property
    def usage(self) -> Usage:
        return self._meter.usage

    def __enter__(self) -> SyncMeter:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.finish()

    def open(self) -> None:
        self._client.run(self._meter.open())

    def add_output_text(self, text: str, choice: int = 0) -> None:
        self._report(self.counter.add_text(text, choice))

    def add_tool_call(
        self, index: int, name: str | None, arguments: str | None, choice: int = 0
    ) -> None:
        self._report(self.counter.add_tool_call(index, name, arguments, choice))

    def add_output_tokens(self, tokens: int) -> None:
        self._report(self.counter.add_tokens(tokens))

    def _report(self, output_tokens: int) -> None:
        if output_tokens != self._output_tokens:
            self._output_tokens = output_tokens
            usage = Usage(input_tokens=self._meter.prompt_tokens, output_tokens=output_tokens)
            self._client.loop.call_soon_threadsafe(self._meter.set_usage, usage)

    def set_provider_usage(self, usage: Usage) -> None:
        self._client.loop.call_soon_threadsafe(self._meter.set_provider_usage, usage)

    def on_abort(self, callback: Callable[[BudgetExceeded], None]) -> None:
        """`callback` runs on the client's loop thread; it must be thread-safe."""
        self._client.loop.call_soon_threadsafe(self._meter.on_abort, callback)

    def raise_if_aborted(self) -> None:
        if self._meter.aborted is not None:
            raise self._meter.aborted

    def finish_soon(self) -> None:
        """Finish on the client's loop without waiting: for a stream the garbage collector
        ends, in whatever thread it runs (the loop's own included, where waiting would
        never end)."""
        if not self._client.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._meter.finish(), self._client.loop)

    def finish(self) -> Committed:
        committed = self._client.run(self._meter.finish())
        if self._meter.aborted is not None:
            self._meter.aborted.partial_text = self.counter.text
        return committed
