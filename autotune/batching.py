"""Dynamic batching: requests that arrive close together for the same key run as one batch.

A request waits at most `max_wait_s` for companions (the first of a batch starts the clock), and
at most `max_batch` ride together. Requests for other keys keep their place in the queue. The
queue is bounded: `submit` on a full queue raises `QueueFull` at once, so a caller can answer
"busy" rather than hold the request, and no request is ever dropped silently: each `Future`
gets its result or its exception. One worker thread runs the batches, one at a time.

No torch here: the work function is the caller's (the speech server's is `Voice.speak`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests already."""


@dataclass
class _Request:
    key: Hashable
    payload: Any
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0
    rejected: int = 0


class Batcher:
    """`work(key, payloads) -> results` (one per payload, in order) run on batches of requests."""

    def __init__(self, work: Callable[[Hashable, Sequence[Any]], Sequence[Any]], *, max_batch: int = 16,
                 max_wait_s: float = 0.02, max_queue: int = 64, name: str = "batcher"):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1, max_wait_s at least 0")
        self.work, self.max_batch, self.max_wait_s, self.max_queue = work, max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, key: Hashable, payload: Any) -> Future:
        """Queue one request; its Future holds the result. Raises `QueueFull` at once when full."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._queue)} requests are waiting already (the limit is {self.max_queue})")
            request = _Request(key, payload)
            self._queue.append(request)
            self._cond.notify_all()
            return request.future

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking requests; those still queued fail with RuntimeError; the running batch finishes."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for request in left:
            request.future.set_exception(RuntimeError("the server is shutting down"))
        self._thread.join(timeout_s)

    def _take_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._queue[0]
            deadline = first.queued_at + self.max_wait_s
            while not self._closed:
                same = sum(1 for r in self._queue if r.key == first.key)
                remaining = deadline - time.monotonic()
                if same >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            batch = [r for r in self._queue if r.key == first.key][:self.max_batch]
            for request in batch:
                self._queue.remove(request)
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            try:
                if live:
                    results = list(self.work(live[0].key, [r.payload for r in live]))
                    if len(results) != len(live):
                        raise RuntimeError(f"the work returned {len(results)} results for {len(live)} requests")
                    for request, result in zip(live, results):
                        request.future.set_result(result)
            except BaseException as exc:  # noqa: BLE001 - every waiting request learns what happened
                for request in live:
                    if not request.future.done():
                        request.future.set_exception(exc)
            finally:
                self.stats.batches += 1 if live else 0
                self.stats.requests += len(live)
                self.stats.largest = max(self.stats.largest, len(live))
                self._busy = False
