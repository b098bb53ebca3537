"""What the session store holds in memory, counted in bytes, and the budget it is kept within.

Counted: the tensors of every variant's replacement blocks (a storage shared by several variants, or
with the original model, is counted once, and the original's own weights are not counted: they are
loaded once for everyone) and the tensors of every result cache (each workspace's and each model's shared
one for the original: block scores, outlier statistics, attention captures, maps; engine/results.py).
Not counted: the loaded models themselves and their quick-set reference (a pinned entry), Python objects
without tensors (figures, recipes), Gradio's
own state, and the allocator's free-but-unreturned memory (glibc keeps freed arenas; `trim()` asks it
to give them back).
"""

from __future__ import annotations

import ctypes
import re

from workbench.engine.results import storages  # noqa: F401  (what the store counts)

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2G' / '512MiB' / '1.5g' / '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 2G, 512M)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def trim() -> bool:
    """Ask glibc to return freed memory to the system (no-op elsewhere). -> whether it could."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
