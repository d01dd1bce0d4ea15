"""An index directory's write lock, across processes and threads.

The catalog needs none (SQLite serialises writers itself); this lock is for the
files beside it: ``index.faiss``, ``manifest.json`` and ``projection.npz``. Whoever
writes them holds it, so a saved index and the manifest that describes it are
always written by one process at a time, and each save starts from the newest
state (:meth:`vsearch.writer.IndexWriter.save` catches up with the catalog first).

An advisory ``flock`` on ``DIR/write.lock``: the kernel drops it when its process
dies, kill -9 included, so a crash never leaves the directory locked. Re-entrant
within a process (a swap's save runs inside the swap's hold).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import IndexBusyError, StorageError

__all__ = ["DirLock", "LOCK_TIMEOUT_S"]

LOCK_TIMEOUT_S = 60.0  # a holder writes one index file and a manifest: seconds even at 10M vectors


class DirLock:
    def __init__(self, path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._mutex = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock (waiting up to ``timeout_s``; then IndexBusyError)."""
        with self._mutex:
            if self._depth == 0:
                self._fd = self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    os.close(self._fd)  # closing the descriptor releases the flock
                    self._fd = None

    def _acquire(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot write to {self.path.parent}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise IndexBusyError(f"{self.path.parent} is being written by another process; try again") from None
                time.sleep(0.01)
