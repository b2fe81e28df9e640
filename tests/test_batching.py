"""Dynamic batching: requests close together for one key ride together, other keys wait
their turn, a full queue refuses at once, and every request gets its answer or its error."""

from __future__ import annotations

import threading
import time

import pytest

from autotune.batching import Batcher, QueueFull


def test_requests_for_one_key_are_batched_and_keys_never_mix():
    seen: list[tuple[str, list[int]]] = []
    gate = threading.Event()

    def work(key, payloads):
        gate.wait(5)
        seen.append((key, list(payloads)))
        return [p * 10 for p in payloads]

    batcher = Batcher(work, max_batch=3, max_wait_s=0.2, max_queue=20)
    try:
        futures = [batcher.submit("a" if i % 2 == 0 else "b", i) for i in range(8)]
        gate.set()
        assert [f.result(10) for f in futures] == [i * 10 for i in range(8)]
    finally:
        batcher.close()
    assert all(len(p) <= 3 for _, p in seen)
    assert all(all(x % 2 == (0 if key == "a" else 1) for x in p) for key, p in seen)
    assert sorted(x for _, p in seen for x in p) == list(range(8))
    assert max(len(p) for _, p in seen) == 3 and batcher.stats.requests == 8


def test_a_full_queue_refuses_at_once_and_errors_reach_every_request():
    release = threading.Event()

    def work(key, payloads):
        release.wait(5)
        if key == "bad":
            raise ValueError("broken batch")
        return payloads

    batcher = Batcher(work, max_batch=1, max_wait_s=0.0, max_queue=2)
    try:
        first = batcher.submit("bad", 1)
        deadline = time.monotonic() + 5
        while not batcher.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = [batcher.submit("ok", 2), batcher.submit("ok", 3)]
        started = time.monotonic()
        with pytest.raises(QueueFull):
            batcher.submit("ok", 4)
        assert time.monotonic() - started < 0.5
        assert batcher.stats.rejected == 1
        release.set()
        with pytest.raises(ValueError, match="broken batch"):
            first.result(5)
        assert [f.result(5) for f in queued] == [2, 3]
    finally:
        batcher.close()


def test_closing_fails_what_still_waits():
    hold = threading.Event()
    batcher = Batcher(lambda key, p: (hold.wait(5), p)[1], max_batch=1, max_wait_s=0.0, max_queue=5)
    running = batcher.submit("k", 1)
    deadline = time.monotonic() + 5
    while not batcher.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = batcher.submit("k", 2)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(RuntimeError, match="shutting down"):
        waiting.result(5)
    hold.set()
    closer.join(5)
    assert running.result(5) == 1
