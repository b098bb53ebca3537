"""The CPU heap: keep freed activation buffers from piling up in glibc's heap (issue 13).

glibc serves an allocation from its heap unless it is at least M_MMAP_THRESHOLD bytes, and it raises that
threshold (up to 32 MiB on 64-bit) each time a large mmapped block is freed. A block forward on CPU frees
activations of a few to tens of MiB every call, so after the first calls they all land in the heap, which
fragments and is not returned: on a bf16 0.4B Llama the MI scan's anonymous memory grew to 1.0 GiB (0.75
GiB of it freed but kept) against 0.4 GiB with the threshold fixed at 8 MiB. Setting the threshold once turns the
dynamic adjustment off, so large buffers are mmapped and go back to the system when freed.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 8 << 20  # allocations of 8 MiB and more are mmapped and returned on free; at 1 MiB
# the page faults of re-mapping every activation made the 0.4B MI scan ~35 % slower, at 8 MiB within noise

_done = False


def bound_cpu_heap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (once; a no-op off glibc).
    Changes no computed value, only where freed buffers go. -> whether glibc took it."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
    _done = ok
    return ok


def give_back() -> bool:
    """Return the heap's free pages to the system now (glibc's malloc_trim(0): the top of every arena and
    the free pages inside them). For buffers below the mmap threshold, which a free() keeps in the heap:
    a replacement block moved to disk (spill.py) frees a few MiB per tensor. -> whether glibc did it."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False
