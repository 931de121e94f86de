"""qfi.keep_freed_memory: large blocks come from the heap and are reused (glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    from qfi.allocator import keep_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    on = keep_freed_memory() if sys.argv[1] == "on" else False
    a = np.ones(48 << 18, dtype=np.float32)  # 48 MiB: above glibc's largest default mmap threshold
    mapped = libc.mallinfo2().hblkhd
    print(on, mapped >= a.nbytes)
    """
)


def _probe(mode: str, env: dict | None = None) -> str:
    e = dict(os.environ, **(env or {}))
    cmd = [sys.executable, "-c", PROBE, mode]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_come_from_the_heap_once_kept() -> None:
    """Without the call a 48 MiB array is an mmap'ed block; with it, heap memory."""
    assert _probe("off") == "False True"
    assert _probe("on") == "True False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_qfi_malloc_system_turns_it_off() -> None:
    assert _probe("on", {"QFI_MALLOC": "system"}) == "False True"
