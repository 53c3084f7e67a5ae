"""Keep grpc.aio's completions reaching a busy event loop.

grpc.aio (1.85) hands completions from its poller thread to the event loop through a
socketpair: the poller writes one byte per completion, and the loop's reader callback
reads one byte, then runs every completion queued. A loop whose turns are long (an app
parsing the chunks of many streamed responses) reads one byte per turn while each turn's
completions write many, so the socket fills (a one-byte write takes a whole buffer's worth
of the socket's allowance: a few hundred fit), the poller thread blocks in write(), and no
completion reaches the loop until it has read three quarters of the backlog back, one byte
per turn. Every meter stream of the process then goes silent for seconds: usage written
but its write not seen to finish, so nothing more is sent, and aborts not seen. Measured
with 16 streams echoing against a grpc.aio server while the loop's turns took 20 ms:
round trips of up to 4.3 s; with this, under 100 ms (`tests/test_grpc_wakeup.py`). In
measure 4 of `make bench`, with its clients on one core, one client process's streams
went silent for 13 s and its streams ran 544 tokens past their grants.

The fix reads the backlog down to one byte before grpc's own handler runs, so each turn
takes every wake-up that is waiting, and grpc's handler still finds the byte it reads.
It reaches into grpc's internals (found by type, as nothing public leads to them), so it
checks that they are the ones described here and otherwise leaves grpc alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("budget_client")

_installed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

try:
    import fcntl
    import termios
except ImportError:  # Windows: no FIONREAD through fcntl; grpc is left as it is
    fcntl = None  # type: ignore[assignment]


def _pending_bytes(fd: int) -> int:
    """Bytes waiting to be read on `fd` (FIONREAD)."""
    answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", answer)[0])


def _grpc_wakeup_parts(loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, Any] | None:
    """grpc's wake-up socket bound to `loop`, and its poller; None if this grpc differs."""
    try:
        cygrpc = importlib.import_module("grpc._cython.cygrpc")
    except ImportError:
        return None
    bound_type = getattr(cygrpc, "_BoundEventLoop", None)
    poller_type = getattr(cygrpc, "PollerCompletionQueue", None)
    if bound_type is None or poller_type is None:
        return None
    bound: list[Any] = []
    pollers: list[Any] = []
    for thing in gc.get_objects():
        kind = type(thing)
        if kind is bound_type and getattr(thing, "loop", None) is loop:
            bound.append(thing)
        elif kind is poller_type:
            pollers.append(thing)
    if len(bound) != 1 or len(pollers) != 1:
        return None
    wakeups = getattr(bound[0], "read_socket", None)
    if not isinstance(wakeups, socket.socket) or wakeups.getblocking():
        return None  # a blocking socket would hang grpc's read of a byte we had taken
    if not callable(getattr(pollers[0], "_handle_events", None)):
        return None
    return wakeups, pollers[0]


def drain_wakeups_on(loop: asyncio.AbstractEventLoop) -> bool:
    """Install the fix on `loop`, which must already have a grpc.aio channel (grpc binds
    the loop when the first one is made). True if it is in place, now or before."""
    if loop in _installed:
        return True
    if fcntl is None:
        return False
    parts = _grpc_wakeup_parts(loop)
    if parts is None:
        log.debug("grpc's wake-up socket not found; its completions are left as they are")
        return False
    wakeups, poller = parts
    handle_events: Callable[[Any], None] = poller._handle_events
    fd = wakeups.fileno()

    def on_wakeups() -> None:
        # The socket is shared by every loop grpc has bound in the process. With one, the
        # byte left is there for grpc's read; with several, another loop's read may take
        # it first, and that loop's handler then hands this loop its completions (grpc
        # does so for loops sharing the socket), so the miss costs nothing.
        with contextlib.suppress(BlockingIOError):
            pending = _pending_bytes(fd)
            if pending > 1:
                wakeups.recv(pending - 1)
            handle_events(loop)

    loop.add_reader(wakeups, on_wakeups)  # replaces grpc's own reader of the socket
    _installed.add(loop)
    return True
