"""A real `budgetd serve` process under hostile traffic on its gRPC port, on loopback.

While junk arrives on raw TCP sockets (random bytes, HTTP/1.1, truncated and junk-laden
HTTP/2, lying frame lengths, floods of pings, settings, resets and open streams, HPACK
junk, CONTINUATION floods), while hundreds of connections sit half-open and others dribble
bytes slow-loris style, a well-behaved client keeps reserving and committing and keeps a
Meter stream going: every one of its calls must succeed in time. Afterwards the process
is alive, its health service says SERVING, it serves new calls, its ledger is exact, and
the descriptors the attack held are released.

Every attack is bounded in count and time, and all of it stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from tests.support import fuzz_h2 as h2
from tests.support.fuzz_wire import TEMPLATES
from tests.support.ledger import assert_ledger_clean, create
from tests.support.servers import ServerProcess, Stubs, start_server_process, stubs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HOST = "127.0.0.1"
OP_S = 5.0
"""Deadline of each of the good client's calls: the attack may slow it, never stall it."""
READ_S = 1.0
"""How long an attacker listens for the server's answer before it hangs up."""
HALF_OPEN = 200
"""Connections that connect and never send a byte."""
STALLED_PREFACES = 50
"""Connections that send the HTTP/2 preface and SETTINGS, then nothing."""
SLOW_LORIS = 20
"""Connections that dribble a byte every SLOW_LORIS_PAUSE_S."""
SLOW_LORIS_PAUSE_S = 0.1
GOOD_OPS_MIN = 100
"""Reserve/Commit pairs the good client completes at the least, attack or not."""
ATTACK_S_MIN = 3.0
"""The attack (and the good client) last at least this long, held connections included."""
FD_SLACK = 8
"""Descriptors the server may keep above its count before the attack (pools, logs)."""
RESERVE = "/budgetd.v1.BudgetService/Reserve"
METER = "/budgetd.v1.BudgetService/Meter"


@dataclass
class GoodClient:
    """What the well-behaved client did, and how long it waited."""

    committed_ops: int = 0
    charged: int = 0
    latencies_s: list[float] = field(default_factory=list)
    meter_charged: int = 0
    meter_usage_messages: int = 0


@dataclass
class Attack:
    """Sockets the attack holds open until the end, and how many connections it made."""

    port: int
    held: list[asyncio.StreamWriter] = field(default_factory=list)
    connections: int = 0
    bytes_sent: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.connections += 1
        return await asyncio.wait_for(asyncio.open_connection(HOST, self.port), OP_S)

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Write; False once the server has hung up on us (which it may)."""
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), OP_S)
        except (OSError, TimeoutError):
            return False
        self.bytes_sent += len(data)
        return True

    async def send_and_hang_up(self, data: bytes, *, chunks: int = 1) -> None:
        reader, writer = await self.connect()
        try:
            step = max(1, len(data) // chunks)
            for at in range(0, len(data), step):
                if not await self.send(writer, data[at : at + step]):
                    return
            await listen(reader, READ_S)
        finally:
            await hang_up(writer)

    async def hold(self, data: bytes = b"") -> asyncio.StreamWriter:
        """Connect, send `data`, keep the connection open (read and ignore what comes)."""
        reader, writer = await self.connect()
        if data:
            await self.send(writer, data)
        self.held.append(writer)
        self.tasks.append(asyncio.create_task(listen(reader, 600)))
        return writer

    async def release(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for writer in self.held:
            await hang_up(writer)
        self.held.clear()


async def listen(reader: asyncio.StreamReader, timeout_s: float) -> int:
    """Read and drop what the server sends until it hangs up or `timeout_s` passes."""
    received = 0
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                received += len(chunk)
    return received


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), READ_S)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=OP_S
        )
    return int(answer.status)


# ----------------------------------------------------------------------------- the attacks


def junk_attacks(attack: Attack, rng: random.Random) -> list[Awaitable[None]]:
    """Connections that send something wrong once, listen briefly, and hang up."""
    authority = f"{HOST}:{attack.port}"
    grpc_call = h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.grpc_headers(RESERVE, authority))
    sends: list[bytes] = []
    # Random bytes, from one byte to 64 KiB.
    sends += [rng.randbytes(rng.choice([1, 7, 24, 100, 4096, 65536])) for _ in range(30)]
    # HTTP/1.1 of several kinds, including an h2c upgrade and a gRPC path.
    sends += [
        f"GET / HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(),
        f"POST {RESERVE} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/grpc\r\n"
        "Content-Length: 10\r\n\r\n0123456789".encode(),
        f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode(),
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 60_000 + b"\r\n\r\n",
    ]
    # Truncated prefaces, and prefaces followed by junk.
    sends += [h2.PREFACE[:cut] for cut in (1, 3, 10, len(h2.PREFACE) - 1)]
    sends += [h2.PREFACE + rng.randbytes(n) for n in (1, 9, 100, 5000)]
    preface = h2.PREFACE + h2.settings()
    sends += [
        # A frame bigger than any SETTINGS_MAX_FRAME_SIZE, and one whose length lies.
        preface + h2.frame(h2.DATA, 0, 1, b"x" * 10, length=(1 << 24) - 1),
        preface + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"abc", length=16_000),
        # SETTINGS of a length that is not a multiple of 6; on a stream; as a bad ACK.
        preface + h2.frame(h2.SETTINGS, 0, 0, b"\x00\x01\x00"),
        preface + h2.frame(h2.SETTINGS, 0, 3, b""),
        preface + h2.frame(h2.SETTINGS, h2.ACK, 0, b"\x00" * 6),
        # HPACK junk, then junk header fields in a well-formed block.
        preface + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, rng.randbytes(200)),
        preface + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.header_block([(b"\x00", b"\xff")])),
        preface
        + h2.frame(
            h2.HEADERS,
            h2.END_HEADERS,
            1,
            h2.header_block([(b":path", RESERVE.encode()), (b":method", b"GET")]),
        ),
        # Flow-control abuse: a zero increment, a window pushed past 2^31 - 1.
        preface + h2.frame(h2.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"),
        preface + h2.frame(h2.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff") * 2,
        # A gRPC call whose message says 2 GiB, one of junk bytes, one in even stream id.
        preface + grpc_call + h2.frame(h2.DATA, 0, 1, h2.grpc_message(b"\x0a", length=2**31)),
        preface
        + grpc_call
        + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(rng.randbytes(50))),
        preface + h2.frame(h2.HEADERS, h2.END_HEADERS, 2, h2.grpc_headers(RESERVE, authority)),
        # Each real request template, on a gRPC call, truncated mid-message.
        *(
            preface + grpc_call + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(t)[:-1])
            for t in TEMPLATES
        ),
        # GOAWAY from the client, then more frames.
        preface + h2.frame(h2.GOAWAY, 0, 0, b"\x00" * 8) + grpc_call,
    ]
    return [attack.send_and_hang_up(data) for data in sends]


async def flood(attack: Attack, frames: Callable[[int], bytes], count: int) -> None:
    """One connection that sends `count` frames as fast as the server takes them."""
    reader, writer = await attack.connect()
    listener = asyncio.create_task(listen(reader, 30))
    try:
        if not await attack.send(writer, h2.PREFACE + h2.settings()):
            return
        batch = 100
        for first in range(0, count, batch):
            data = b"".join(frames(i) for i in range(first, min(count, first + batch)))
            if not await attack.send(writer, data):
                return  # GOAWAY and hang-up: the server defended itself
            await asyncio.sleep(0)
    finally:
        await hang_up(writer)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


def connection_floods(attack: Attack, rng: random.Random) -> list[Awaitable[None]]:
    """Floods of connection-level frames, each on one connection."""
    headers = h2.grpc_headers(RESERVE, f"{HOST}:{attack.port}")

    def continuation(i: int) -> bytes:  # an endless header block (CVE-2024-27316 style)
        if i == 0:
            return h2.frame(h2.HEADERS, 0, 1, headers)
        return h2.frame(h2.CONTINUATION, 0, 1, h2.header_block([(b"x-junk", b"j" * 1000)]))

    return [
        flood(attack, lambda i: h2.frame(h2.PING, 0, 0, rng.randbytes(8)), 10_000),
        flood(attack, lambda i: h2.settings((0x3, 100 + i)), 5_000),
        flood(attack, continuation, 500),
    ]


def stream_floods(attack: Attack) -> list[Awaitable[None]]:
    """Floods of streams on one connection each: opened and reset at once (rapid reset,
    CVE-2023-44487), complete calls whose answers are never read, calls left open."""
    authority = f"{HOST}:{attack.port}"
    headers = h2.grpc_headers(RESERVE, authority)
    meter = h2.grpc_headers(METER, authority)
    reserve = h2.grpc_message(
        pb.ReserveRequest(budget_id="hostile:none", amount=1).SerializeToString()
    )

    def rapid_reset(i: int) -> bytes:
        stream = 2 * i + 1
        return h2.frame(h2.HEADERS, h2.END_HEADERS, stream, headers) + h2.frame(
            h2.RST_STREAM, 0, stream, h2.CANCEL.to_bytes(4, "big")
        )

    def unary_calls(i: int) -> bytes:
        stream = 2 * i + 1
        return h2.frame(h2.HEADERS, h2.END_HEADERS, stream, headers) + h2.frame(
            h2.DATA, h2.END_STREAM, stream, reserve
        )

    def open_streams(i: int) -> bytes:  # Meter calls opened and left waiting
        return h2.frame(h2.HEADERS, h2.END_HEADERS, 2 * i + 1, meter)

    return [
        flood(attack, rapid_reset, 2_000),
        flood(attack, unary_calls, 2_000),
        flood(attack, open_streams, 500),
    ]


async def hold_open(attack: Attack, stop: asyncio.Event) -> None:
    """Half-open connections and stalled prefaces, then slow-loris senders, until the end."""
    authority = f"{HOST}:{attack.port}"
    for _ in range(HALF_OPEN):
        await attack.hold()
    for _ in range(STALLED_PREFACES):
        await attack.hold(h2.PREFACE + h2.settings())
    call = h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.grpc_headers(RESERVE, authority))
    dribbles = [
        h2.PREFACE,  # the preface itself, a byte at a time
        h2.PREFACE
        + h2.settings()
        + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"", length=1000)
        + b"\x00" * 1000,  # a frame header, then its payload a byte at a time
        h2.PREFACE
        + h2.settings()
        + call
        + h2.frame(h2.DATA, 0, 1, h2.grpc_message(b"", length=1 << 20), length=1029)
        + b"\x00" * 1024,  # a gRPC message of 1 MiB, promised, sent a byte at a time
    ]
    # The prefix of each dribble goes at once; only what follows trickles.
    for i in range(SLOW_LORIS):
        data = dribbles[i % len(dribbles)]
        head = 0 if i % len(dribbles) == 0 else len(data) - 1000
        writer = await attack.hold(data[:head])
        attack.tasks.append(asyncio.create_task(trickle(attack, writer, data[head:], stop)))


async def trickle(
    attack: Attack, writer: asyncio.StreamWriter, data: bytes, stop: asyncio.Event
) -> None:
    for at in range(len(data)):
        if stop.is_set() or not await attack.send(writer, data[at : at + 1]):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SLOW_LORIS_PAUSE_S)


# ----------------------------------------------------------------------------- the good client


async def reserve_and_commit(
    api: Stubs, budget_id: str, log: GoodClient, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set() or log.committed_ops < GOOD_OPS_MIN:
        started = loop.time()
        held = await api.budget.Reserve(
            pb.ReserveRequest(
                budget_id=budget_id, amount=10, idempotency_key=f"good-{log.committed_ops}"
            ),
            timeout=OP_S,
        )
        done = await api.budget.Commit(
            pb.CommitRequest(reservation_id=held.reservation.id, amount=7), timeout=OP_S
        )
        log.latencies_s.append(loop.time() - started)
        log.committed_ops += 1
        log.charged += done.charged
        await asyncio.sleep(0.01)


async def metered_stream(api: Stubs, budget_id: str, log: GoodClient, stop: asyncio.Event) -> None:
    call = api.budget.Meter(timeout=120)
    await call.write(pb.MeterRequest(open=pb.MeterOpen(budget_id=budget_id, model="gpt-4o")))
    opened = await asyncio.wait_for(call.read(), OP_S)
    assert opened.WhichOneof("event") == "opened", opened
    output = 0
    while output == 0 or not stop.is_set():
        output += 3
        await call.write(
            pb.MeterRequest(
                usage=pb.MeterUsage(usage=pb.Usage(input_tokens=20, output_tokens=output))
            )
        )
        log.meter_usage_messages += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    await call.write(pb.MeterRequest(finish=pb.MeterFinish()))
    while True:
        event = await asyncio.wait_for(call.read(), OP_S)
        assert event is not grpc.aio.EOF, "the meter stream ended without a commit"
        if event.WhichOneof("event") == "committed":
            break
        assert event.WhichOneof("event") in ("granted", "alert"), event
    assert event.committed.charged == 20 + output
    log.meter_charged += event.committed.charged
    assert await call.code() == grpc.StatusCode.OK


# ----------------------------------------------------------------------------- the tests


@pytest.fixture
async def budgetd(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = await start_server_process(f"sqlite+aiosqlite:///{tmp_path / 'budgetd.db'}")
    try:
        yield server
    finally:
        if server.process.returncode is None:
            server.kill()
            await server.process.wait()


async def under_attack(
    api: Stubs, attack: Attack, log: GoodClient, phases: Callable[[asyncio.Event], Awaitable[None]]
) -> None:
    """Run the good client while `phases` attack (for ATTACK_S_MIN at least); then hang
    up every attacking connection. Any failed call of the good client fails the test."""
    stop = asyncio.Event()
    started = time.monotonic()
    good = [
        asyncio.create_task(reserve_and_commit(api, "hostile:good", log, stop)),
        asyncio.create_task(metered_stream(api, "hostile:good", log, stop)),
    ]
    try:
        await phases(stop)
        # The held and slow-loris connections stay while the good client goes on.
        await asyncio.sleep(max(0.0, ATTACK_S_MIN - (time.monotonic() - started)))
        assert await health(api.address) == health_pb2.HealthCheckResponse.SERVING
        failed = [t.exception() for t in good if t.done()]
        assert not failed, f"the good client failed under attack: {failed}"
    finally:
        stop.set()
        await attack.release()
        await asyncio.gather(*good, return_exceptions=True)
    await asyncio.gather(*good)


async def assert_serving_and_exact(budgetd: ServerProcess, api: Stubs, log: GoodClient) -> None:
    """budgetd survived: alive, SERVING, serving new calls, its ledger exact."""
    assert budgetd.process.returncode is None, "budgetd died"
    assert await health(budgetd.address) == health_pb2.HealthCheckResponse.SERVING
    fresh = await api.budget.Reserve(
        pb.ReserveRequest(budget_id="hostile:good", amount=1), timeout=OP_S
    )
    await api.budget.Release(pb.ReleaseRequest(reservation_id=fresh.reservation.id), timeout=OP_S)
    budget = (await api.budget.GetBudget(pb.GetBudgetRequest(budget_id="hostile:good"))).budget
    assert (budget.spent, budget.reserved) == (log.charged + log.meter_charged, 0)
    await assert_ledger_clean(api)


async def test_junk_and_stalled_connections_do_not_disturb_a_good_client(
    budgetd: ServerProcess,
) -> None:
    pid = budgetd.process.pid
    attack = Attack(int(budgetd.address.rsplit(":", 1)[1]))
    rng = random.Random(20261201)
    log = GoodClient()
    fds: list[int] = []

    async def phases(stop: asyncio.Event) -> None:
        await hold_open(attack, stop)
        await asyncio.gather(*junk_attacks(attack, rng))
        await asyncio.gather(*connection_floods(attack, rng))
        fds.append(open_fds(pid))  # while every held connection is still open

    async with stubs(budgetd.address) as api:
        await create(api, "hostile:good", 10**12)
        fds.append(open_fds(pid))
        started = time.monotonic()
        await under_attack(api, attack, log, phases)
        elapsed_s = time.monotonic() - started
        await assert_serving_and_exact(budgetd, api, log)

    # The descriptors of the attack's connections are given back once it hangs up.
    deadline = time.monotonic() + 10
    while open_fds(pid) > fds[0] + FD_SLACK and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    fds.append(open_fds(pid))
    assert fds[-1] <= fds[0] + FD_SLACK, f"descriptors before, held, after: {fds}"
    latencies = sorted(log.latencies_s)
    print(
        f"\nhostile network: {attack.connections} attack connections "
        f"({HALF_OPEN + STALLED_PREFACES + SLOW_LORIS} held open), {attack.bytes_sent} bytes "
        f"in {elapsed_s:.1f} s; good client: {log.committed_ops} reserve+commit "
        f"(p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms), {log.meter_usage_messages} meter usage "
        f"messages; server descriptors before, held, after: {fds}"
    )


STREAM_FLOOD_ROUNDS = 6
"""Rounds of stream floods; one round cancels a good call about half the time."""


async def test_stream_floods_do_not_cancel_other_clients_calls(budgetd: ServerProcess) -> None:
    attack = Attack(int(budgetd.address.rsplit(":", 1)[1]))
    log = GoodClient()

    async def phases(_stop: asyncio.Event) -> None:
        await asyncio.gather(*stream_floods(attack))

    async with stubs(budgetd.address) as api:
        await create(api, "hostile:good", 10**12)
        for _ in range(STREAM_FLOOD_ROUNDS):
            await under_attack(api, attack, log, phases)
        await assert_serving_and_exact(budgetd, api, log)
