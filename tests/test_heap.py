"""engine/heap.py: with the mmap threshold fixed, a large buffer freed goes back to the system (issue 13)."""

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _is_mmapped(libc, n: int) -> bool:
    """Allocate n bytes with malloc and read the chunk header's IS_MMAPPED bit (0x2; malloc.c)."""
    ptr = libc.malloc(n)
    assert ptr
    size_field = ctypes.c_size_t.from_address(ptr - ctypes.sizeof(ctypes.c_size_t)).value
    libc.free(ctypes.c_void_p(ptr))
    return bool(size_field & 0x2)


def _fresh(body: str) -> str:
    """Run `body` in a fresh interpreter (its heap untouched by other tests), with `libc` set up for
    `_is_mmapped`. -> its stdout."""
    code = f"""
import ctypes, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_heap import _is_mmapped
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
""" + body
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.mark.skipif(not glibc, reason="glibc's allocator only")
def test_freed_large_buffers_do_not_raise_the_threshold():
    """Checked in a fresh interpreter: in this one, earlier tests leave large free chunks in the heap, and
    malloc serves a request from a free chunk before it considers mmap, whatever the threshold."""
    assert _fresh("""
from workbench.engine.heap import MMAP_THRESHOLD_BYTES, bound_cpu_heap
assert bound_cpu_heap()
# Freeing a 24 MiB mmapped block would lift glibc's dynamic threshold to 24 MiB, after which a
# 16 MiB buffer comes from the heap; with the threshold fixed at 8 MiB it stays mmapped.
assert _is_mmapped(libc, 24 << 20)
assert _is_mmapped(libc, 2 * MMAP_THRESHOLD_BYTES)
assert not _is_mmapped(libc, MMAP_THRESHOLD_BYTES // 4)  # small ones still come from the heap
assert bound_cpu_heap()  # idempotent
print("ok")
""") == "ok"


@pytest.mark.skipif(not glibc, reason="glibc's allocator only")
def test_without_the_bound_a_freed_large_buffer_raises_the_threshold():
    """The same probe tells the two cases apart: without bound_cpu_heap, glibc's dynamic threshold rises."""
    assert _fresh("""
assert _is_mmapped(libc, 24 << 20)
print(_is_mmapped(libc, 16 << 20))
""") == "False"
