"""Opt-in: have glibc keep freed heap memory for reuse, a process-wide allocator setting."""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_freed_memory_kept = False


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of giving it back to the OS; True where applied.

    Each op of a forward pass allocates its output. By default glibc serves large blocks with
    fresh ``mmap`` pages and unmaps them on free, so every evaluation page-faults (and the kernel
    zero-fills) its activations again; with ``mmap`` off and a high trim threshold the same
    blocks are reused. Results are unchanged. Whether it is faster depends on the machine
    (measured from 0.87x to 1.6x, ``docs/performance.md``), so nothing in evolq calls it on its
    own: call it yourself, or pass ``--reuse-freed-memory`` to the ``evolq`` commands.

    It changes the allocator of the whole process, for good: the process keeps its peak heap
    until it exits, and there is no undo. Idempotent. A no-op (False) where the C library is
    not glibc.
    """
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _freed_memory_kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _freed_memory_kept
