"""Handing freed memory back to the system after work on large buffers.

glibc's malloc keeps what the process frees for later allocations. Decoding a large image
allocates buffers of up to 16 MiB (Pillow's blocks); after the first such block is freed,
glibc raises its threshold for serving allocations from fresh memory maps to that size, so
later blocks come from the per-thread heaps, where freed memory mostly stays: measured on a
burst of 4000x4000 PNGs to Explain, 100-200 MB of resident memory kept for good. A
``malloc_trim`` after each decode returns it (1-2 microseconds when there is nothing to
return). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_freed_memory() -> None:
    """Return the C allocator's free memory to the system, where it can (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
