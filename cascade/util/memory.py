"""Keep freed memory in the process instead of handing large blocks back to the kernel.

glibc's malloc serves every block above 32 MiB (at most) with its own `mmap` and unmaps it on
free, so each training step that builds a (positions x catalogue) logit matrix, its softmax and
their gradients (hundreds of MB on a 12k-item catalogue) faults every page in again and the
kernel zeroes it: on a 2-core machine that was 30 s of system time in a 4-minute ml-100k run,
and half the cost of a full-softmax loss step. With `mmap` off for allocations and a high trim
threshold, freed blocks stay in the heap and the next step reuses them. The peak footprint is
the same; what changes is that memory freed after the peak stays with the process until it
exits (up to `TRIM_THRESHOLD` at the top of the heap). Set `CASCADE_KEEP_FREED_MEMORY=0` to
leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes of free memory at the top of the heap kept before trimming

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Configure glibc's malloc (once per process) to reuse freed large blocks; True when it
    is in effect. A no-op returning False off glibc (macOS, musl, Windows) or when
    `CASCADE_KEEP_FREED_MEMORY=0`."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("CASCADE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success, 0 on a rejected value
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
