"""glibc allocator tuning for CNN inference on CPU.

With glibc's defaults, each large activation tensor is mmap'ed and unmapped again
on every forward, and the page faults cost as much CPU as the convolutions. Keeping
large blocks on the heap and never trimming it makes the forward several times
faster with bit-identical output (3.8x for EfficientNet-Lite2 on 2 cores, measured
by scripts/bench_embed.py). No-op off glibc; VSEARCH_MALLOC_TUNING=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from .settings import settings

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def tune_malloc() -> bool:
    """Apply the settings once per process; return whether they are in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or not settings().malloc_tuning:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    _applied = ok
    return ok
