"""The model's queue: one thread runs every forward, and concurrent requests share
forwards (micro-batching).

Requests wait at most ``max_wait_ms`` for company, and a batch takes requests until it
holds ``max_batch`` items (a single request of more runs alone, whole). At most
``max_queue`` requests may wait: past that, :meth:`submit` raises :class:`Overloaded`
at once, so a flood gets fast refusals instead of a growing queue.

With ``max_batch`` 1 (the CPU default) nothing is batched, but the queue still pays:
forwards from many threads at once each start their own OpenMP team (oversubscribing
the cores) and keep their activations in their own malloc arena, so memory grows with
the number of threads that ever ran one. One thread, one team, one arena.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from .errors import VsearchError

__all__ = ["MicroBatcher", "Overloaded"]

X = TypeVar("X")
Y = TypeVar("Y")


class Overloaded(VsearchError):
    """Too many requests are waiting; try again shortly."""


class MicroBatcher(Generic[X, Y]):
    def __init__(
        self,
        fn: Callable[[list[X]], Sequence[Y]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._fn = fn
        self._max_batch = max(1, max_batch)
        self._max_wait = max_wait_ms / 1000
        self._queue: queue.Queue[tuple[list[X], Future[list[Y]]] | None] = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._thread = threading.Thread(target=self._run, name="vsearch-batcher", daemon=True)
        self._thread.start()

    @property
    def full(self) -> bool:
        """Whether a request submitted now would be refused (a hint: others race for room)."""
        return self._queue.full()

    def submit(self, item: X) -> Future[Y]:
        """One item's result, as a future; :class:`Overloaded` if the queue is full."""
        single: Future[Y] = Future()
        many = self.submit_all([item])
        many.add_done_callback(lambda f: _relay(f, single))
        return single

    def submit_all(self, items: list[X], timeout: float | None = 0) -> Future[list[Y]]:
        """One request of several items (one place in the queue, results in order),
        waiting up to ``timeout`` seconds for a place (None: as long as it takes)."""
        future: Future[list[Y]] = Future()
        try:
            if timeout == 0:
                self._queue.put_nowait((items, future))
            else:
                self._queue.put((items, future), timeout=timeout)
        except queue.Full:
            raise Overloaded("too many requests waiting for the model; retry shortly") from None
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first[0])
            deadline = time.monotonic() + self._max_wait
            while size < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._finish(batch)
                    return
                batch.append(nxt)
                size += len(nxt[0])
            self._finish(batch)

    def _finish(self, batch: list[tuple[list[X], Future[list[Y]]]]) -> None:
        live = [(xs, f) for xs, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        items = [x for xs, _ in live for x in xs]
        if self._on_batch is not None:
            self._on_batch(len(items))
        try:
            results = list(self._fn(items))
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about the failure
            for _, future in live:
                future.set_exception(exc)
            return
        start = 0
        for xs, future in live:
            future.set_result(results[start : start + len(xs)])
            start += len(xs)


def _relay(source: Future[list[Y]], target: Future[Y]) -> None:
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result()[0])
