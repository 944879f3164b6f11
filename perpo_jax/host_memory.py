"""Keep freed host memory in the process instead of returning it to the OS (glibc malloc).

XLA:CPU allocates each step's working buffers anew and frees them at its end. glibc serves
allocations above 32 MiB (and large ones from threads' arenas) with fresh mmap()s, so every
step page-faults its whole working set back in: the naive list step of `bench/list_step.py`
(3 GB of temporaries) took ~800,000 minor faults and ~1.3 s of kernel time per 3.5 s step on
2 CPU cores. With one arena, no mmap and no trimming, the freed blocks are reused and the
step runs with ~1,000 faults (2.9 s). The cost: the process keeps its peak heap until it
exits -- what a training process holds anyway.

Call `keep_host_memory()` once, early (before the first jax computation starts XLA's thread
pools), from an entry point: never at import. On other C libraries it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt() parameters, glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),  # threads' arenas are capped at 64 MiB heaps and mmap anything larger
    (_M_MMAP_MAX, 0),  # big blocks come from the heap, where freed ones can be reused
    (_M_TRIM_THRESHOLD, -1),  # mallopt(3): -1 disables trimming (freed memory stays)
    (_M_TOP_PAD, 256 * 2**20),  # grow the heap in 256 MiB steps, not per allocation
)


def keep_host_memory() -> bool:
    """Set glibc's malloc to reuse freed memory (see the module docstring). Returns True
    when every setting was accepted, False when the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl and others: no glibc mallopt
    return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
