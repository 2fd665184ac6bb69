"""Hand freed tensor memory back to the operating system between modules.

glibc keeps freed heap memory in per-thread arenas, and raises its mmap threshold after large frees,
so streaming a model module by module would let the resident size creep up to many modules' worth
even though only two are alive at a time. Both calls are no-ops where glibc is absent.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist (glibc, not musl)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> None:
    """Return free pages of every arena to the OS (``malloc_trim(0)``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(threshold_bytes: int = 1 << 20) -> None:
    """Serve allocations above ``threshold_bytes`` by mmap, so freeing them unmaps them at once.

    A process-wide setting: the CLI sets it; a library caller may choose to.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
