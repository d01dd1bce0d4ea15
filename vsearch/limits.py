"""What the server lets run at once, so that a flood of requests gets quick
refusals (503 or 429, with Retry-After) instead of eating its memory or its threads.

- :class:`DecodeBudget`: bytes that image decodes may hold at once, process-wide. A
  decode asks for its estimated size (from the header, before any pixel is read) and
  gives it back once the image is reduced to what the model needs. A small file can
  decode to hundreds of megabytes (a 620 KB JPEG of 39.7 megapixels, a 35 KB PNG of
  36), so limiting requests or bytes received does not bound memory: 16 such uploads
  at once got the server OOM-killed.
- :class:`Slots`: at most N holders (image URL fetches, which can take
  ``url_timeout_s`` each and must not hold every worker thread).
- :func:`trim_memory`, :class:`IdleTrimmer`, :func:`one_malloc_arena`: hand freed
  heap back to the OS. :mod:`vsearch.malloc` keeps freed memory in the heap (the CPU
  forward is several times faster so), which otherwise never shrinks after a burst.

The budget and the URL slots are process-wide (memory and threads are): a command
line process gets generous defaults and waits as long as it takes; the server sizes
them from its :class:`~vsearch.config.ServeConfig` with :func:`serving_limits`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .batcher import Overloaded
from .settings import settings

__all__ = [
    "Busy",
    "DecodeBudget",
    "IdleTrimmer",
    "Slots",
    "decode_budget",
    "one_malloc_arena",
    "serving_limits",
    "trim_memory",
    "url_fetch_slots",
]

MB = 1024 * 1024


class Busy(Overloaded):
    """A shared resource (decode memory, URL fetch slots) is all taken for now; the
    request may succeed in a moment (the server answers 503 with Retry-After)."""


class _Gauge:
    """A counting semaphore of ``capacity`` units; a holder that cannot get its units
    within its wait is refused with :class:`Busy`."""

    def __init__(self, capacity: int, wait_s: float = math.inf) -> None:
        self.capacity = max(1, capacity)
        self.wait_s = wait_s
        self._used = 0
        self._changed = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def _hold(self, need: int, wait: float, refusal: Callable[[], str]) -> Iterator[None]:
        with self._changed:
            if not self._changed.wait_for(lambda: self._used + need <= self.capacity, None if math.isinf(wait) else wait):
                raise Busy(refusal())
            self._used += need
        try:
            yield
        finally:
            with self._changed:
                self._used -= need
                self._changed.notify_all()  # holders differ in size: any may fit now


class DecodeBudget(_Gauge):
    """A byte semaphore: decodes together hold at most ``capacity`` bytes.

    A request for more than the whole budget is granted the whole budget (so every
    image under ``max_pixels`` can be decoded, one at a time). ``wait_s`` is how long
    :meth:`hold` waits for room before raising :class:`Busy`; ``math.inf`` waits as
    long as it takes (ingestion: nothing else competes, and failing would lose work).
    """

    @contextmanager
    def hold(self, nbytes: int, what: str = "an image", wait_s: float | None = None) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the block; ``wait_s`` None: the budget's own."""
        need = min(max(0, nbytes), self.capacity)
        refusal = f"too many large images are being decoded; {what} ({need // MB} MB) must wait; retry shortly"
        with self._hold(need, self.wait_s if wait_s is None else wait_s, lambda: refusal):
            yield


class Slots(_Gauge):
    """At most ``limit`` holders at once; past that, :class:`Busy` after ``wait_s``."""

    def __init__(self, limit: int, what: str, wait_s: float = math.inf) -> None:
        super().__init__(limit, wait_s)
        self.what = what

    @property
    def limit(self) -> int:
        return self.capacity

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._hold(1, self.wait_s, lambda: f"{self.limit} {self.what} are in progress already; retry shortly"):
            yield


DEFAULT_DECODE_BUDGET_MB = 512
_decode_budget = DecodeBudget(DEFAULT_DECODE_BUDGET_MB * MB)
_url_fetches = Slots(64, "image URL fetches")


def decode_budget() -> DecodeBudget:
    """The process's decode budget (see :func:`vsearch.images.decode`)."""
    return _decode_budget


def url_fetch_slots() -> Slots:
    """The process's URL fetch slots (see :func:`vsearch.fetch.fetch_url`)."""
    return _url_fetches


@contextmanager
def serving_limits(decode_mb: float, decode_wait_s: float, url_fetches: int, url_wait_s: float) -> Iterator[None]:
    """Install a server's budget and URL slots for the block, then restore the previous ones."""
    global _decode_budget, _url_fetches
    previous = _decode_budget, _url_fetches
    _decode_budget = DecodeBudget(int(decode_mb * MB), wait_s=decode_wait_s)
    _url_fetches = Slots(url_fetches, "image URL fetches", wait_s=url_wait_s)
    try:
        yield
    finally:
        _decode_budget, _url_fetches = previous


_M_ARENA_MAX = -8  # mallopt's parameter number


def one_malloc_arena() -> bool:
    """Make threads that first allocate from now on share glibc's main arena; False
    where that cannot be done (not glibc, or ``VSEARCH_MALLOC_TUNING=0``).

    :func:`trim_memory` gives back free pages inside every arena but cannot shrink the
    top of a thread arena's heap, and with :mod:`vsearch.malloc`'s trim threshold
    nothing else does: after 8 clients sent 36-megapixel PNGs for 15 s, RSS stayed
    165-220 MB above its start with an arena per request thread, 6 MB with one. Request
    threads only parse and decode (every forward runs on one thread), so they hardly
    contend for the arena: 8 clients' throughput was the same within noise.
    """
    if not sys.platform.startswith("linux") or not settings().malloc_tuning:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):
        return False


def trim_memory() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``); False where
    there is no such call (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


class IdleTrimmer:
    """Calls ``trim`` once the process has been quiet for ``idle_s`` after some work.

    Trimming during a burst would undo :mod:`vsearch.malloc`'s point (the next forward
    faults its pages in again); trimming once the burst is over gives back what it
    piled up (server RSS stayed at 2.1 GB after 100 clients stopped, against 0.9 GB
    before). Work is reported with :meth:`touch`.
    """

    def __init__(self, idle_s: float = 1.0, trim: Callable[[], object] = trim_memory) -> None:
        self.idle_s = idle_s
        self._trim = trim
        self._touched = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vsearch-trim", daemon=True)
        self._thread.start()

    def touch(self) -> None:
        self._touched += 1  # a racy increment is fine: any change means "not idle"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        seen, dirty = self._touched, False
        while not self._stop.wait(self.idle_s):
            if self._touched != seen:
                seen, dirty = self._touched, True
            elif dirty:
                self._trim()
                dirty = False
