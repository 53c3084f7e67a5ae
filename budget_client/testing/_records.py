"""What the fake server did for each request, readable while the request runs.

The server thread mutates a live record per request; tests in other threads (or
other processes, over HTTP) only ever see frozen snapshots taken under a lock,
so they never observe a half-updated record.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """One chat completion request as the fake server saw and answered it.

    Requests rejected with a 400 (bad JSON, bad `x-fake-*` header) leave no record.

    `tokens_sent`, `chunks_sent` and `text_sent` count only what `send()` handed
    to the connection; bytes already in kernel buffers when the client closed are
    counted as sent. Chunks written in the instant between the kernel reporting
    the close and the server noticing it (an event-loop turn or two) may be
    counted although the OS discarded them: at most one chunk in practice.

    Times are wall-clock `time.time()` seconds so another process can compare
    them with its own clock.
    """

    request_id: str  # the chatcmpl-... id, also the `id` of every chunk
    model: str
    stream: bool
    include_usage: bool
    style: str
    tokens_per_second: float
    prompt_tokens: int
    tokens_planned: int
    finish_reason: str  # "stop", or "length" when max_tokens cut the reply short
    tokens_sent: int = 0
    chunks_sent: int = 0  # chat.completion.chunk events written, usage chunk included
    text_sent: str = ""
    completed: bool = False  # the whole response, up to `data: [DONE]`, was written
    disconnected: bool = False  # the client went away before the response was complete
    started_at: float = 0.0
    finished_at: float | None = None  # completion, disconnect or server shutdown
    disconnected_at: float | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class LiveRecord:
    """The mutable side of a `RequestRecord`, updated by the response as it writes."""

    def __init__(self, store: RecordStore, record: RequestRecord) -> None:
        self._store = store
        self._record = record
        self._pieces: list[str] = []  # joined on snapshot: avoids quadratic appends

    @property
    def completed(self) -> bool:
        return self._record.completed

    def sent(self, text: str, tokens: int, chunk: bool) -> None:
        with self._store.lock:
            self._pieces.append(text)
            r = self._record
            self._record = dataclasses.replace(
                r, tokens_sent=r.tokens_sent + tokens, chunks_sent=r.chunks_sent + chunk
            )

    def finish(self, *, completed: bool = False, disconnected_at: float | None = None) -> None:
        with self._store.lock:
            if self._record.finished_at is not None:
                return
            self._record = dataclasses.replace(
                self._record,
                completed=completed,
                disconnected=disconnected_at is not None,
                disconnected_at=disconnected_at,
                finished_at=time.time() if disconnected_at is None else disconnected_at,
            )

    def snapshot(self) -> RequestRecord:
        """Caller holds the store lock."""
        return dataclasses.replace(self._record, text_sent="".join(self._pieces))


class RecordStore:
    """Thread-safe list of the records of one server, in arrival order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._live: list[LiveRecord] = []

    def open(self, record: RequestRecord) -> LiveRecord:
        live = LiveRecord(self, dataclasses.replace(record, started_at=time.time()))
        with self.lock:
            self._live.append(live)
        return live

    def snapshot(self) -> list[RequestRecord]:
        with self.lock:
            return [live.snapshot() for live in self._live]

    def clear(self) -> None:
        with self.lock:
            self._live.clear()

    def wait_for(
        self, predicate: Callable[[RequestRecord], bool], timeout: float = 5.0
    ) -> RequestRecord:
        """First record matching `predicate`, polling every millisecond until `timeout`.

        Polling keeps the server thread free of test callbacks; a millisecond is
        below anything a disconnect-latency assertion should care about.
        """
        deadline = time.monotonic() + timeout
        while True:
            for record in self.snapshot():
                if predicate(record):
                    return record
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no matching request record within {timeout} s")
            time.sleep(0.001)
