"""A load-generator process: `python -m bench.worker '{"kind": ..., ...}'`.

Protocol (see `bench.procs.Worker`): connect, print `ready {json}`, then answer every
`go {json}` line on stdin with one JSON line; stdin closing ends the process. A command
names a `phase`. Kinds, each a class below:

* flood: `open` meter streams; `flood` sends cumulative usage on all of them as fast as
  gRPC takes it, then finishes them and checks each `committed` carries the last usage.
* requests: `run` closed-loop metered requests (open, N usage messages, finish, committed).
* paced: `open`; `start` background usage at a fixed total rate; `stop` (and finish).
* echo: `open` echo streams on the bare server; `echo` times bare round trips.
* raw_abort: `probe` the server's abort over raw gRPC (usage reaching a capped grant ->
  `abort` event).
* hold: `open` thousands of streams and keep them; `usage` rounds; `finish`.
* abort: `probe` the real client path (wrap_openai over the openai SDK) against the fake
  OpenAI server, on budgets sized so that each stream is aborted a few tokens in.
* overage: `run` streams sharing one budget through wrap_openai until it is gone.

Times another process compares with (the fake server's records) are `time.time()`;
intervals inside this process are `time.perf_counter()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from bench.common import percentile, run
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc

MeterCall = grpc.aio.StreamStreamCall[pb.MeterRequest, pb.MeterEvent]
Metadata = tuple[tuple[str, str], ...]
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
MODEL = "gpt-4o"
PROMPT_TOKENS_RAW = 20  # the prompt estimate raw meter streams open with
FINISH = pb.MeterRequest(finish=pb.MeterFinish())


def channels(address: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels, each its own HTTP/2 connection (a local subchannel pool each), so
    streams spread over several connections as they would from several app instances."""
    return [
        grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1), ("bench.channel", index)]
        )
        for index in range(count)
    ]


def open_request(budget_id: str) -> pb.MeterRequest:
    return pb.MeterRequest(
        open=pb.MeterOpen(
            budget_id=budget_id,
            model=MODEL,
            prompt_tokens_estimate=PROMPT_TOKENS_RAW,
            idempotency_key="bench-" + secrets.token_hex(8),
        )
    )


def usage_request(output_tokens: int) -> pb.MeterRequest:
    usage = pb.Usage(input_tokens=PROMPT_TOKENS_RAW, output_tokens=output_tokens)
    return pb.MeterRequest(usage=pb.MeterUsage(usage=usage))


async def read_event(call: MeterCall, kind: str) -> pb.MeterEvent:
    """The next event of `kind`, skipping alerts and grants; raises on anything else."""
    while True:
        event = await call.read()
        if not isinstance(event, pb.MeterEvent):
            raise RuntimeError(f"meter stream ended before {kind}: {await call.code()}")
        got = event.WhichOneof("event")
        if got == kind:
            return event
        if got not in ("alert", "granted"):
            raise RuntimeError(f"expected {kind}, got {got}")


async def open_stream(
    stub: pb_grpc.BudgetServiceAsyncStub, budget_id: str, metadata: Metadata
) -> MeterCall:
    call: MeterCall = stub.Meter(None, metadata=metadata)
    await call.write(open_request(budget_id))
    await read_event(call, "opened")
    return call


async def bounded(limit: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the jobs, at most `limit` at a time; exceptions are returned, not raised."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True))


class Load:
    """A kind of load: connect, then answer commands by phase."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        address = spec.get("address")
        self.channels = channels(address, spec.get("channels", 1)) if address else []
        self.stubs: list[pb_grpc.BudgetServiceAsyncStub] = [
            pb_grpc.BudgetServiceStub(c) for c in self.channels
        ]
        key = spec.get("api_key")
        self.metadata: Metadata = (("authorization", f"Bearer {key}"),) if key else ()
        # One API key per channel when given (budgetd caps the streams open per key).
        keys = spec.get("api_keys") or [key] * len(self.channels)
        self.channel_metadata: list[Metadata] = [
            (("authorization", f"Bearer {k}"),) if k else () for k in keys
        ]

    async def setup(self) -> dict[str, Any]:
        await asyncio.gather(*(c.channel_ready() for c in self.channels))
        return {}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        phase = command["phase"]
        method = getattr(self, f"phase_{phase}", None)
        if method is None:
            raise ValueError(f"{type(self).__name__} has no phase {phase!r}")
        result: dict[str, Any] = await method(command)
        return result

    async def close(self) -> None:
        await asyncio.gather(*(c.close(None) for c in self.channels))


class StreamsLoad(Load):
    """Loads on open meter streams: `streams` of them over `channels`, budgets in turn."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.calls: list[MeterCall] = []
        self.sent: list[int] = []

    async def phase_open(self, command: dict[str, Any]) -> dict[str, Any]:
        budgets = command.get("budgets") or self.spec["budgets"]
        count = command.get("streams") or self.spec["streams"]
        started = time.perf_counter()
        results = await bounded(
            self.spec.get("open_concurrency", 256),
            [
                functools.partial(
                    open_stream,
                    self.stubs[i % len(self.stubs)],
                    budgets[i % len(budgets)],
                    self.channel_metadata[i % len(self.stubs)],
                )
                for i in range(count)
            ],
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(f"{len(errors)} of {count} streams failed to open: {errors[0]!r}")
        self.calls = results
        self.sent = [0] * len(self.calls)
        return {"opened": len(self.calls), "elapsed_s": time.perf_counter() - started}

    async def phase_finish(self, command: dict[str, Any]) -> dict[str, Any]:
        """Finish every stream; `committed` must carry the last usage each one sent."""
        started = time.perf_counter()

        async def finish(index: int) -> bool:
            call = self.calls[index]
            await call.write(FINISH)
            event = await read_event(call, "committed")
            await call.code()
            return event.committed.reservation.usage.output_tokens == self.sent[index]

        results = await bounded(
            self.spec.get("open_concurrency", 256),
            [functools.partial(finish, i) for i in range(len(self.calls))],
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        self.calls = []
        return {
            "committed": sum(1 for r in results if r is True),
            "mismatched": sum(1 for r in results if r is False),
            "errors": len(errors),
            "first_error": repr(errors[0]) if errors else None,
            "elapsed_s": time.perf_counter() - started,
        }


class Flood(StreamsLoad):
    async def phase_flood(self, command: dict[str, Any]) -> dict[str, Any]:
        deadline = time.perf_counter() + command["duration_s"]
        started_at = time.time()

        async def flood(index: int) -> None:
            call = self.calls[index]
            sent = 0
            while time.perf_counter() < deadline:
                sent += 1
                await call.write(usage_request(sent))
            self.sent[index] = sent

        await asyncio.gather(*(flood(i) for i in range(len(self.calls))))
        written_at = time.time()
        messages = sum(self.sent)
        outcome = await self.phase_finish(command)
        return {
            **outcome,
            "messages": messages,
            "started_at": started_at,
            "written_at": written_at,
            "ended_at": time.time(),
        }


class Paced(StreamsLoad):
    """Usage at `rate_per_s` in total, spread evenly over the streams (open loop), from
    `start` until `stop`."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self._pacers: list[asyncio.Task[None]] = []
        self._started = 0.0
        self._lag_s = 0.0

    async def phase_start(self, command: dict[str, Any]) -> dict[str, Any]:
        interval_s = len(self.calls) / command["rate_per_s"]
        self._started = start = time.perf_counter()
        self._lag_s = 0.0

        async def pace(index: int) -> None:
            call = self.calls[index]
            due = start + interval_s * index / len(self.calls)  # staggered
            while True:
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    self._lag_s = max(self._lag_s, now - due)
                self.sent[index] += 1
                await call.write(usage_request(self.sent[index]))
                due += interval_s

        self._pacers = [asyncio.create_task(pace(i)) for i in range(len(self.calls))]
        return {"started": len(self._pacers)}

    async def phase_stop(self, command: dict[str, Any]) -> dict[str, Any]:
        elapsed_s = time.perf_counter() - self._started
        for task in self._pacers:
            task.cancel()
        await asyncio.gather(*self._pacers, return_exceptions=True)
        messages = sum(self.sent)
        outcome = await self.phase_finish(command)
        return {
            **outcome,
            "messages": messages,
            "rate_per_s": messages / elapsed_s,
            "max_lag_s": self._lag_s,
        }


class Echo(StreamsLoad):
    """Bare round trips on echo streams, one in flight per stream, about every `interval_s`."""

    async def phase_echo(self, command: dict[str, Any]) -> dict[str, Any]:
        deadline = time.perf_counter() + command["duration_s"]
        interval_s = command["interval_s"]
        rtt_ms: list[float] = []

        async def probe(index: int) -> None:
            call = self.calls[index]
            rng = random.Random(index)
            await asyncio.sleep(rng.uniform(0, interval_s))
            while time.perf_counter() < deadline:
                self.sent[index] += 1
                started = time.perf_counter()
                await call.write(usage_request(self.sent[index]))
                await read_event(call, "granted")
                rtt_ms.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(rng.uniform(0.5, 1.5) * interval_s)

        await asyncio.gather(*(probe(i) for i in range(len(self.calls))))
        await self.phase_finish(command)
        return {"rtt_ms": rtt_ms}


class RawAbort(Load):
    """The server's side of an abort, over raw gRPC: on a budget that grants `at` output
    tokens, send `before` (past the refill point, so the extension is tried and refused),
    wait `pause_s`, then time from sending `at` to the `abort` event."""

    async def phase_probe(self, command: dict[str, Any]) -> dict[str, Any]:
        rtt_ms: list[float] = []

        async def probe(index: int, budget_id: str) -> None:
            stub = self.stubs[index % len(self.stubs)]
            call = await open_stream(stub, budget_id, self.metadata)
            await call.write(usage_request(command["before"]))
            await asyncio.sleep(command["pause_s"])
            started = time.perf_counter()
            await call.write(usage_request(command["at"]))
            await read_event(call, "abort")
            rtt_ms.append((time.perf_counter() - started) * 1000)
            await call.write(FINISH)
            await read_event(call, "committed")
            await call.code()

        budgets = command["budgets"]
        results = await bounded(
            command["concurrency"],
            [functools.partial(probe, i, b) for i, b in enumerate(budgets)],
        )
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {"rtt_ms": rtt_ms, "errors": len(errors), "first_errors": errors[:3]}


class Requests(Load):
    """Closed loop: `streams` workers each doing request after request through the window."""

    async def phase_run(self, command: dict[str, Any]) -> dict[str, Any]:
        budgets = command["budgets"]
        usage_messages = self.spec.get("usage_messages", 10)
        now = time.perf_counter()
        window_start = now + command["warmup_s"]
        window_end = window_start + command["duration_s"]
        latencies_ms: list[float] = []
        errors: list[str] = []
        completed = 0

        async def request(stub: pb_grpc.BudgetServiceAsyncStub, budget_id: str) -> None:
            call: MeterCall = stub.Meter(None, metadata=self.metadata)
            await call.write(open_request(budget_id))
            await read_event(call, "opened")
            for step in range(1, usage_messages + 1):
                await call.write(usage_request(step * 10))
            await call.write(FINISH)
            event = await read_event(call, "committed")
            if event.committed.reservation.usage.output_tokens != usage_messages * 10:
                raise RuntimeError("committed usage differs from the usage sent")
            await call.code()

        async def loop(index: int) -> None:
            nonlocal completed
            stub = self.stubs[index % len(self.stubs)]
            rng = random.Random(index)
            while time.perf_counter() < window_end:
                budget_id = budgets[rng.randrange(len(budgets))]
                started = time.perf_counter()
                try:
                    await request(stub, budget_id)
                except (grpc.aio.AioRpcError, RuntimeError) as error:
                    errors.append(repr(error))
                    await asyncio.sleep(0.01)
                    continue
                ended = time.perf_counter()
                if window_start <= ended < window_end:
                    completed += 1
                    latencies_ms.append((ended - started) * 1000)

        await asyncio.gather(*(loop(i) for i in range(self.spec["streams"])))
        return {
            "completed": completed,
            "window_s": window_end - window_start,
            "errors": len(errors),
            "first_errors": errors[:3],
            "p50_ms": percentile(latencies_ms, 50),
            "p99_ms": percentile(latencies_ms, 99),
        }


class Hold(StreamsLoad):
    """Many open streams: `open`, then `usage` rounds over all of them, then `finish`."""

    async def phase_usage(self, command: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        value = command["round"]

        async def write(index: int) -> None:
            await self.calls[index].write(usage_request(value))
            self.sent[index] = value

        await asyncio.gather(*(write(i) for i in range(len(self.calls))))
        return {"written": len(self.calls), "elapsed_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------- LLM client path


class ClientPath(Load):
    """Streams through budget_client.wrap_openai(openai.AsyncOpenAI) against the fake server."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__({k: v for k, v in spec.items() if k != "address"})
        import openai

        from budget_client import BudgetClient, wrap_openai

        # Fail closed, and wait long for a meter stream to open: a stream that went unmetered
        # would measure nothing; slow opens are timed and reported instead.
        self.budgets = BudgetClient(
            spec["budgetd"],
            fail_policy="closed",
            api_key=spec.get("api_key"),
            connect_timeout_s=60.0,
        )
        self.raw = openai.AsyncOpenAI(
            base_url=spec["base_url"], api_key="x", max_retries=0, timeout=120
        )
        self.oai: Any = wrap_openai(self.raw, self.budgets)

    async def setup(self) -> dict[str, Any]:
        from budget_client._tokenizer import count_chat_prompt_tokens

        await self.budgets.__aenter__()
        return {"prompt_tokens": count_chat_prompt_tokens(PROMPT, MODEL)}

    async def close(self) -> None:
        await self.budgets.close()
        await self.raw.close()


class _TimedClose:
    """Stands in for the openai stream inside a MeteredAsyncStream to time its close()."""

    def __init__(self, stream: Any, probe: Probe) -> None:
        self._stream = stream
        self._probe = probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> Any:
        return self._stream.__aiter__()

    async def close(self) -> None:
        await self._stream.close()
        if self._probe.closed_perf is None:
            self._probe.closed_perf = time.perf_counter()


class Probe:
    """Instruments one MeteredAsyncStream: when each usage total was handed to the meter
    (`Meter.set_usage`, which `add_output_text` calls), when the abort arrived, and when the
    upstream stream's close() returned. The crossing usage is the first total that reached
    the grant the stream was aborted at. An abort that happens inside `set_usage` was
    decided by the client at a final grant; any other came from the server."""

    def __init__(self, stream: Any) -> None:
        self.meter = meter = stream.meter
        self.handed: list[tuple[int, float, float]] = []
        self.abort_perf: float | None = None
        self.closed_perf: float | None = None
        self.granted_at_abort = 0
        self.output_at_abort = 0
        self.local = False
        self._counting = False
        set_usage = meter.set_usage

        def timed_set_usage(usage: Any) -> None:
            self.handed.append((usage.output_tokens, time.time(), time.perf_counter()))
            self._counting = True
            try:
                set_usage(usage)
            finally:
                self._counting = False

        meter.set_usage = timed_set_usage
        meter.on_abort(self._on_abort)
        if hasattr(stream, "_stream"):  # MeteredAsyncStream keeps the openai stream there
            stream._stream = _TimedClose(stream._stream, self)

    def _on_abort(self, _error: BaseException) -> None:
        self.abort_perf = time.perf_counter()
        self.local = self._counting
        self.granted_at_abort = self.meter.granted_output_tokens
        self.output_at_abort = self.meter.usage.output_tokens

    def timings(self) -> dict[str, Any]:
        if self.abort_perf is None:
            return {}
        found: dict[str, Any] = {
            "granted_at_abort": self.granted_at_abort,
            "output_at_abort": self.output_at_abort,
            "local": self.local,
        }
        crossing = next((h for h in self.handed if h[0] >= self.granted_at_abort), None)
        if crossing is not None:
            _, wall, perf = crossing
            found["cross_at"] = wall
            found["abort_ms"] = (self.abort_perf - perf) * 1000
            if self.closed_perf is not None:
                found["close_ms"] = (self.closed_perf - perf) * 1000
        return found


class Abort(ClientPath):
    """Each probe streams on its own small budget and is aborted a few tokens in."""

    async def phase_probe(self, command: dict[str, Any]) -> dict[str, Any]:
        from budget_client import BudgetExceeded

        headers = {"x-fake-tokens": str(command["tokens"]), "x-fake-rate": str(command["rate"])}

        async def probe(budget_id: str) -> dict[str, Any]:
            record: dict[str, Any] = {"budget": budget_id, "aborted": False}
            started = time.perf_counter()
            stream = await self.oai.chat.completions.create(
                model=MODEL, messages=PROMPT, stream=True, budget=budget_id, extra_headers=headers
            )
            record["open_ms"] = (time.perf_counter() - started) * 1000
            probe = Probe(stream)
            try:
                async for chunk in stream:
                    record["request_id"] = chunk.id
            except BudgetExceeded:
                record["aborted"] = True
            record.update(probe.timings())
            record["output_counted"] = probe.meter.counter.output_tokens
            return record

        results = await bounded(
            command["concurrency"], [functools.partial(probe, b) for b in command["budgets"]]
        )
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {
            "probes": [r for r in results if not isinstance(r, BaseException)],
            "errors": len(errors),
            "first_errors": errors[:3],
        }


class Overage(ClientPath):
    """`streams` slots share one budget; each starts response after response (lengths drawn
    from `tokens_min..tokens_max`) until budgetd refuses or aborts it.

    With `abort_at` ([low, high]) the server is the bare one instead: each slot streams once
    on a budget id that makes the bare server abort at a token count drawn from that range,
    the same client path and load with an abort that costs the server nothing.
    """

    async def phase_run(self, command: dict[str, Any]) -> dict[str, Any]:
        from budget_client import BudgetExceeded

        rng = random.Random(command["seed"])
        outcomes: list[dict[str, Any]] = []
        abort_at = command.get("abort_at")

        async def slot(index: int) -> None:
            await asyncio.sleep(rng.uniform(0, command["stagger_s"]))
            while True:
                tokens = rng.randint(command["tokens_min"], command["tokens_max"])
                budget_id = command.get("budget", "")
                outcome: dict[str, Any] = {"slot": index}
                if abort_at is not None:
                    grant = rng.randint(abort_at[0], abort_at[1])
                    budget_id = f"abort-at-{grant}-{command['seed']}-{index}"
                    tokens = grant + command["tokens_min"]
                    outcome["bare_grant"] = grant
                outcome["tokens_requested"] = tokens
                outcomes.append(outcome)
                headers = {"x-fake-tokens": str(tokens), "x-fake-rate": str(command["rate"])}
                try:
                    stream = await self.oai.chat.completions.create(
                        model=MODEL,
                        messages=PROMPT,
                        stream=True,
                        budget=budget_id,
                        extra_headers=headers,
                    )
                except BudgetExceeded:
                    outcome["refused"] = True
                    return
                meter = stream.meter
                probe = Probe(stream)
                outcome["reservation_id"] = meter.reservation_id
                try:
                    async for chunk in stream:
                        outcome.setdefault("request_id", chunk.id)
                except BudgetExceeded:
                    outcome["aborted"] = True
                outcome.update(probe.timings())
                outcome["counted_output"] = meter.counter.output_tokens
                outcome["granted"] = meter.granted_output_tokens
                committed = meter.committed
                if committed is not None:
                    outcome["charged"] = committed.charged
                    outcome["overage"] = committed.overage
                    outcome["spooled"] = committed.spooled
                if outcome.get("aborted") or abort_at is not None:
                    return

        results = await asyncio.gather(
            *(slot(i) for i in range(self.spec["streams"])), return_exceptions=True
        )
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {"streams": outcomes, "errors": len(errors), "first_errors": errors[:3]}


KINDS: dict[str, type[Load]] = {
    "flood": Flood,
    "paced": Paced,
    "echo": Echo,
    "raw_abort": RawAbort,
    "requests": Requests,
    "hold": Hold,
    "abort": Abort,
    "overage": Overage,
}


async def serve(spec: dict[str, Any]) -> None:
    load = KINDS[spec["kind"]](spec)
    loop = asyncio.get_running_loop()
    try:
        ready = await load.setup()
        print("ready " + json.dumps(ready), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            command = json.loads(line.split(" ", 1)[1])
            print(json.dumps(await load.handle(command)), flush=True)
    finally:
        with contextlib.suppress(Exception):
            await load.close()


def main() -> None:
    run(serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
