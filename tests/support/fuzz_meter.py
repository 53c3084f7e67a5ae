"""A Meter stream driven from synchronous code: requests from a queue, events into another.

grpc's sync stream-stream call takes a request iterator and returns an event iterator that
blocks; a reader thread moves events into a queue so the caller can wait with a timeout,
and learns the stream's final status when it ends.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc

EVENT_WAIT_S = 10.0
"""Longest wait for an event or for the end of a stream that the test expects."""

_CLOSE = object()  # ends the request iterator: the client half-closes the stream
_END = object()  # the server ended the stream


class SyncMeterStream:
    """One Meter call; `send`, `half_close`, `cancel`, and `next_event` / `wait_end`."""

    def __init__(self, stub: pb_grpc.BudgetServiceStub, first: Any | None = None) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        self._events: queue.Queue[object] = queue.Queue()
        self.code: grpc.StatusCode | None = None  # set when the stream has ended
        self.details = ""
        self.ended = threading.Event()
        self._closed = False
        if first is not None:
            self._requests.put(first)
        self._call = stub.Meter(self._iterate_requests())
        self._reader = threading.Thread(target=self._read, name="meter-reader", daemon=True)
        self._reader.start()

    def send(self, request: pb.MeterRequest) -> None:
        if not self._closed:
            self._requests.put(request)

    def half_close(self) -> None:
        """End the client's side of the stream without `finish` (like a crashed app's last
        flush): the server ends the call and keeps the reservation for a resume."""
        if not self._closed:
            self._closed = True
            self._requests.put(_CLOSE)

    def cancel(self) -> None:
        """Break the stream (a client that died): the server sees a cancelled call."""
        self._call.cancel()
        self.half_close()

    def next_event(self, timeout_s: float = EVENT_WAIT_S) -> pb.MeterEvent | None:
        """The next event; None when the stream has ended. Fails when nothing comes."""
        try:
            item = self._events.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no meter event and no end of stream in {timeout_s} s") from None
        if item is _END:
            self._events.put(_END)  # stays ended for later readers
            return None
        assert isinstance(item, pb.MeterEvent)
        return item

    def poll_event(self) -> pb.MeterEvent | None:
        """An event that has already arrived, or None."""
        try:
            item = self._events.get_nowait()
        except queue.Empty:
            return None
        if item is _END:
            self._events.put(_END)
            return None
        assert isinstance(item, pb.MeterEvent)
        return item

    def wait_end(self, timeout_s: float = EVENT_WAIT_S) -> list[pb.MeterEvent]:
        """Wait for the stream to end; return the events that came before the end."""
        events: list[pb.MeterEvent] = []
        while (event := self.next_event(timeout_s)) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        """Release the threads whatever state the stream is in (test teardown)."""
        if not self.ended.is_set():
            self.cancel()
        self.half_close()
        self._reader.join(EVENT_WAIT_S)

    def _iterate_requests(self) -> Any:
        while True:
            try:
                item = self._requests.get(timeout=0.2)
            except queue.Empty:
                if self.ended.is_set():
                    return
                continue
            if item is _CLOSE:
                return
            yield item

    def _read(self) -> None:
        try:
            for event in self._call:
                self._events.put(event)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.code = error.code()
            self.details = error.details() or ""
        finally:
            self.ended.set()
            self._events.put(_END)
