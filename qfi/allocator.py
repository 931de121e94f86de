"""Keep freed memory for reuse: large CPU tensors without page faults on every forward.

glibc serves every allocation above its mmap threshold (at most 32 MiB, however it adapts) with
a fresh ``mmap`` and gives it back with ``munmap`` when freed, so each forward pass that makes a
feature map or a convolution workspace that large touches brand-new pages: one page fault per
4 KiB, every time.  On the 2-core machine this was measured on, a 9-convolution CNN at batch 64
and 64x64 (32 MiB per feature map) ran its forward in ~0.46 s with glibc's defaults and in ~0.15 s
once freed memory stays in the heap (``benchmarks/bench_inject.py --only conv`` prints both).

``keep_freed_memory()`` raises the mmap threshold and the trim threshold (``mallopt``), so
blocks up to ``limit_mb`` come from the heap and freed ones are reused.  The cost is that a
process keeps its peak heap instead of returning it to the system: right for a campaign, which
repeats the same forward thousands of times, and the reason the library never does this on
import.  The ``qfi`` CLI and qfi's Ray workers call it; ``QFI_MALLOC=system`` turns it off.
Elsewhere than glibc (macOS, Windows, musl) it does nothing and returns False.  It covers the
main thread's heap, where the CLI and Ray actors run the model: glibc's per-thread arenas are
capped at 64 MiB, so a thread other than the main one still maps larger blocks afresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done = False


def keep_freed_memory(limit_mb: int = 1024) -> bool:
    """Serve allocations up to ``limit_mb`` MiB from the heap and keep freed memory for reuse
    (glibc ``mallopt``); True when the allocator took the settings.  Idempotent; a no-op returning
    False without glibc or with the environment variable ``QFI_MALLOC=system``."""
    global _done
    if _done:
        return True
    if os.environ.get("QFI_MALLOC", "").strip().lower() == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    size = min(int(limit_mb) << 20, 2**31 - 1)  # mallopt takes a C int
    trim = min(2 * size, 2**31 - 1)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, size) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    _done = ok
    return ok


def _glibc():
    try:
        try:
            libc = ctypes.CDLL("libc.so.6")  # glibc's soname: no ldconfig / compiler lookup at start-up
        except OSError:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


__all__ = ["keep_freed_memory"]
