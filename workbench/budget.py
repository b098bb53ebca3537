"""What the session store holds in memory, counted in bytes, and the budget it is kept within.

Counted: the tensors of every variant's replacement blocks (a storage shared by several variants, or
with the original model, is counted once, and the original's own weights are not counted: they are
loaded once for everyone), the tensors the store caches per session (block scores), and the analysis
caches kept on a loaded model (`_*_cache` dicts: outlier statistics, attention captures, maps).
Not counted: the loaded models themselves and their quick-set reference, Python objects without tensors (figures, recipes), Gradio's
own state, and the allocator's free-but-unreturned memory (glibc keeps freed arenas; `trim()` asks it
to give them back).
"""

from __future__ import annotations

import ctypes
import dataclasses
import re

import torch
from torch import nn

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2G' / '512MiB' / '1.5g' / '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 2G, 512M)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def storages(obj, seen_ids: set | None = None, depth: int = 0) -> dict[int, int]:
    """{storage pointer: bytes} of every tensor reachable from obj (modules, dataclasses, containers)."""
    seen_ids = set() if seen_ids is None else seen_ids
    out: dict[int, int] = {}
    if depth > 8 or id(obj) in seen_ids or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return out
    seen_ids.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            ptr, n = _storage(obj)
            out[ptr] = n
        return out
    if isinstance(obj, nn.Module):
        for m in obj.modules():
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None:
                    out.update(storages(t, seen_ids, depth + 1))
            for k, v in m.__dict__.items():  # e.g. a quantized linear's codes and scales
                if not k.startswith("_") and not isinstance(v, nn.Module):
                    out.update(storages(v, seen_ids, depth + 1))
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out.update(storages(getattr(obj, f.name, None), seen_ids, depth + 1))
        return out
    if isinstance(obj, dict):
        for v in obj.values():
            out.update(storages(v, seen_ids, depth + 1))
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            out.update(storages(v, seen_ids, depth + 1))
    else:
        nb = getattr(obj, "nbytes", None)  # numpy arrays
        if isinstance(nb, int) and hasattr(obj, "dtype"):
            out[id(obj)] = nb
    return out


def model_caches(model_obj) -> dict:
    """The analysis caches kept on a loaded model, per variant (dicts): attribute name -> cache. The quick
    set's reference (`_quick_cache`, the original's side of every comparison, one per model) is the
    model's, like its weights: not counted, never released."""
    return {k: v for k, v in vars(model_obj).items() if k.startswith("_") and k.endswith("_cache") and isinstance(v, dict)}


def trim() -> bool:
    """Ask glibc to return freed memory to the system (no-op elsewhere). -> whether it could."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
