"""Micro-batching: concurrent requests share one model forward.

Requests wait at most ``max_wait_ms`` for company, batches hold at most ``max_batch``
items, and at most ``max_queue`` items may wait: past that, :meth:`submit` raises
:class:`Overloaded` at once, so a flood gets fast refusals instead of a growing queue.
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
        self._queue: queue.Queue[tuple[X, Future[Y]] | None] = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._thread = threading.Thread(target=self._run, name="vsearch-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: X) -> Future[Y]:
        future: Future[Y] = Future()
        try:
            self._queue.put_nowait((item, future))
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
            deadline = time.monotonic() + self._max_wait
            while len(batch) < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._finish(batch)
                    return
                batch.append(nxt)
            self._finish(batch)

    def _finish(self, batch: list[tuple[X, Future[Y]]]) -> None:
        live = [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(len(live))
        try:
            results = self._fn([x for x, _ in live])
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about the failure
            for _, future in live:
                future.set_exception(exc)
            return
        for (_, future), result in zip(live, results):
            future.set_result(result)
