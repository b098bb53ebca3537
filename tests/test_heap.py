"""engine/heap.py: with the mmap threshold fixed, a large buffer freed goes back to the system (issue 13)."""

import ctypes
import platform

import pytest

from workbench.engine.heap import MMAP_THRESHOLD_BYTES, bound_cpu_heap

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _is_mmapped(libc, n: int) -> bool:
    """Allocate n bytes with malloc and read the chunk header's IS_MMAPPED bit (0x2; malloc.c)."""
    ptr = libc.malloc(n)
    assert ptr
    size_field = ctypes.c_size_t.from_address(ptr - ctypes.sizeof(ctypes.c_size_t)).value
    libc.free(ctypes.c_void_p(ptr))
    return bool(size_field & 0x2)


@pytest.mark.skipif(not glibc, reason="glibc's allocator only")
def test_freed_large_buffers_do_not_raise_the_threshold():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert bound_cpu_heap()
    # Freeing a 24 MiB mmapped block would lift glibc's dynamic threshold to 24 MiB, after which a
    # 16 MiB buffer comes from the heap; with the threshold fixed at 8 MiB it stays mmapped.
    assert _is_mmapped(libc, 24 << 20)
    assert _is_mmapped(libc, 2 * MMAP_THRESHOLD_BYTES)
    assert not _is_mmapped(libc, MMAP_THRESHOLD_BYTES // 4)  # small ones still come from the heap
    assert bound_cpu_heap()  # idempotent
