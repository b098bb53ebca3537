"""One keyed result cache: every analysis result of a workspace, keyed by (variant, analysis, parameters),
with the bytes it holds.

A variant's results never go stale: variants never change once made. The original model's results are
the same for every session, so the store gives each model one shared cache for them (`variant_key` is
"original" for any variant without overrides) and each workspace its own for its variants.
Entries may be `pinned` (the quick set's reference: the model's, like its weights): those are neither
counted against the memory budget nor released.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn

_tick = itertools.count()


def storages(obj, seen_ids: set | None = None, depth: int = 0) -> dict[int, int]:
    """{storage pointer: bytes} of every tensor reachable from obj (modules, dataclasses, containers)."""
    seen_ids = set() if seen_ids is None else seen_ids
    out: dict[int, int] = {}
    if depth > 8 or id(obj) in seen_ids or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return out
    seen_ids.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            s = obj.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
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


def variant_key(variant) -> int | str:
    return "original" if variant is None or variant.is_identity() else variant.id


@dataclass
class Entry:
    value: object
    storages: dict  # {storage pointer: bytes}
    pinned: bool = False
    used: int = 0  # recency (a global counter)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


class ResultCache:
    """(variant key, analysis, params) -> Entry. `limits` caps the entries kept per analysis (oldest
    first out), e.g. attention captures, which are large. Thread-safe for single operations; the
    computation in `get_or_compute` runs outside the lock (the store runs one computation at a time)."""

    def __init__(self, limits: dict[str, int] | None = None):
        self.limits = dict(limits or {})
        self._entries: dict[tuple, Entry] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(variant, analysis: str, params=()) -> tuple:
        return (variant_key(variant), analysis, params)

    def peek(self, variant, analysis: str, params=(), default=None):
        """The cached value, or `default`; never computes."""
        with self._lock:
            e = self._entries.get(self.key(variant, analysis, params))
            if e is None:
                return default
            e.used = next(_tick)
            return e.value

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def put(self, variant, analysis: str, params, value, pinned: bool = False):
        k = self.key(variant, analysis, params)
        with self._lock:
            self._entries[k] = Entry(value, {} if pinned else storages(value), pinned, next(_tick))
            limit = self.limits.get(analysis)
            if limit is not None:
                same = sorted((e.used, kk) for kk, e in self._entries.items() if kk[1] == analysis and kk != k)
                for _, kk in same[: max(0, len(same) + 1 - limit)]:
                    del self._entries[kk]
        return value

    def get_or_compute(self, variant, analysis: str, params, compute, pinned: bool = False):
        missing = object()
        got = self.peek(variant, analysis, params, missing)
        if got is not missing:
            return got
        return self.put(variant, analysis, params, compute(), pinned)

    def latest(self, variant, analysis: str):
        """The most recently used value of `analysis` for the variant, whatever its parameters (or None)."""
        vk = variant_key(variant)
        with self._lock:
            hits = [e for k, e in self._entries.items() if k[0] == vk and k[1] == analysis]
        return max(hits, key=lambda e: e.used).value if hits else None

    def items(self) -> list[tuple[tuple, Entry]]:
        with self._lock:
            return list(self._entries.items())

    def drop(self, key: tuple) -> bool:
        with self._lock:
            return self._entries.pop(key, None) is not None

    def drop_variant(self, variant) -> int:
        vk = variant_key(variant)
        with self._lock:
            gone = [k for k in self._entries if k[0] == vk]
            for k in gone:
                del self._entries[k]
        return len(gone)

    def storages(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, e in self.items():
            out.update(e.storages)
        return out

    def nbytes(self) -> int:
        return sum(self.storages().values())

    def __len__(self) -> int:
        return len(self._entries)
