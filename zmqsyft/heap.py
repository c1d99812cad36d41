"""How a worker's C heap gives memory back: kept for reuse up to a bound. No sockets here.

A worker allocates and frees tensors of the same few sizes over and over (a model received each
round, its gradients, an average). With glibc's defaults, a freed tensor of more than 128 KiB
goes back to the system at once (its own mapping, or the top of the heap trimmed), and the next
one gets new pages, each a page fault; on a virtual machine a page the guest takes anew can
cost a fault on the host too. Measured on this project's 2-vCPU KVM guest (``benchmarks/
RESULTS.md``, 2026-12-03): allocating and filling a 1 M-parameter model's tensors and gradients,
as one federated round does, took 9.9 ms with the defaults and 1.5 ms with freed memory kept.
:func:`keep_freed` tells glibc to serve allocations of up to 32 MiB from the heap and to keep up
to ``nbytes`` of free memory at its top: freed pages are used again, and a worker holds at most
that much more than it uses. Larger tensors still get their own mapping, given back when freed.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["keep_freed", "MMAP_ABOVE"]

MMAP_ABOVE = 32 << 20  # allocations larger than this get their own mapping (glibc's upper bound)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def keep_freed(nbytes: int) -> bool:
    """Keep up to ``nbytes`` of freed C-heap memory for reuse (``Config.malloc_keep``); 0
    leaves glibc's defaults. Returns whether the setting took (False off glibc)."""
    if nbytes <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = min(nbytes, (1 << 31) - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, min(MMAP_ABOVE, limit))
                and mallopt(_M_TRIM_THRESHOLD, limit))
