from __future__ import annotations

import threading
import time

import pytest

from vsearch.batcher import MicroBatcher, Overloaded
from vsearch.locks import RWLock


def test_concurrent_submits_share_one_call() -> None:
    sizes: list[int] = []
    batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=8, max_wait_ms=200, on_batch=sizes.append)
    try:
        futures = [batcher.submit(i) for i in range(8)]
        assert [f.result(timeout=5) for f in futures] == [i * 2 for i in range(8)]
        assert sizes == [8]
    finally:
        batcher.close()


def test_batches_are_capped_and_a_lone_request_waits_only_briefly() -> None:
    sizes: list[int] = []
    batcher = MicroBatcher(lambda xs: xs, max_batch=3, max_wait_ms=20, on_batch=sizes.append)
    try:
        assert [f.result(timeout=5) for f in [batcher.submit(i) for i in range(7)]] == list(range(7))
        assert max(sizes) <= 3 and sum(sizes) == 7
        start = time.monotonic()
        batcher.submit(99).result(timeout=5)
        assert time.monotonic() - start < 2
    finally:
        batcher.close()


def test_full_queue_refuses_at_once_and_errors_reach_every_waiter() -> None:
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        gate.wait(5)
        if 13 in xs:
            raise ValueError("bad item")
        return xs

    batcher = MicroBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        first = batcher.submit(1)
        time.sleep(0.1)  # the worker has taken the first item and is blocked in slow()
        queued = [batcher.submit(2), batcher.submit(13)]
        with pytest.raises(Overloaded):
            batcher.submit(3)
        gate.set()
        assert first.result(timeout=5) == 1 and queued[0].result(timeout=5) == 2
        with pytest.raises(ValueError, match="bad item"):
            queued[1].result(timeout=5)
    finally:
        gate.set()
        batcher.close()


def test_rwlock_excludes_writers_from_readers() -> None:
    lock = RWLock()
    inside: list[str] = []
    errors: list[str] = []

    def reader() -> None:
        for _ in range(200):
            with lock.read():
                inside.append("r")
                if "w" in inside:
                    errors.append("reader saw a writer")
                inside.remove("r")

    def writer() -> None:
        for _ in range(50):
            with lock.write():
                if inside:
                    errors.append(f"writer saw {inside}")
                inside.append("w")
                with lock.write(), lock.read():  # re-entrant for the writing thread
                    pass
                inside.remove("w")

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
