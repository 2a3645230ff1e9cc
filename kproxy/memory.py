"""Giving freed memory back to the system.

glibc keeps the pages of a big burst of allocations that is freed again (a
parsed transaction, a store snapshot loaded and slimmed) for reuse, so a
daemon's RSS stays at its peak. malloc_trim(0) returns them.
"""

from __future__ import annotations

import ctypes

_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent outside glibc


def release_free_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)
