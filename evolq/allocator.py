"""Keep freed heap memory for reuse: the cheapest speed-up of CPU inference with many large activations."""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_freed_memory_kept = False


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of giving it back to the OS; True where applied.

    Each op of a forward pass allocates its output. By default glibc serves large blocks with
    fresh ``mmap`` pages and unmaps them on free, so every evaluation page-faults (and the kernel
    zero-fills) its activations again: on 2 CPU cores that costs 1.3x (DeiT-Tiny) to 2.8x (the
    default model) the CPU time of an evaluation (``docs/performance.md``). With ``mmap`` off and a
    high trim threshold the same blocks are reused. Results are unchanged; the process keeps its
    peak heap until it exits. Process-wide and idempotent; ``BlockObjective`` calls it for CPU
    tensors and ``evolq.pipeline.prepare`` for CPU runs. A no-op (False) where the C library is not glibc.
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
