"""Replacement blocks of an offloaded model live on disk like the original's blocks (issue 13).

Under the offload plan the original's blocks stay memory-mapped from the checkpoint, but a variant's
replacement blocks (quantized, sparsified, fused) are new tensors: RTN of every block alone made a whole
second model in anonymous RAM (1.7x the checkpoint on a bf16 0.4B Llama whose plan allowed a fifth of it).
`keep_like_original` writes each of a replacement block's CPU tensors to a file in the plan's offload
folder, maps the file back (`torch.from_file`, private mapping: a write would copy the page, never touch
the file) and unlinks it at once: the pages are then file-backed, so the kernel can drop and re-read them
like the checkpoint's instead of holding them, and nothing is left on disk when the block is freed. The
values are the same bits; compute, export and later steps see ordinary CPU tensors.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import torch
from torch import nn

from .heap import give_back

SUBFOLDER = "replacements"
MIN_BYTES = 1 << 16  # smaller tensors (norms, biases, scales) stay in RAM: a page each would cost more


def _spilled(t: torch.Tensor, folder: Path) -> torch.Tensor:
    """`t`'s values in a private mapping of a file that no longer has a name."""
    path = folder / f"{uuid.uuid4().hex}.bin"
    src = t.detach().contiguous()
    with open(path, "wb") as fh:
        fh.write(memoryview(src.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    try:
        mapped = torch.from_file(str(path), shared=False, size=src.numel(), dtype=src.dtype)
    finally:
        os.unlink(path)
    return mapped.view(src.shape)


def _worth(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 0 \
        and t.numel() * t.element_size() >= MIN_BYTES and not t.is_sparse and not t.is_meta


def spill_block(block: nn.Module, folder: str | Path) -> int:
    """Move `block`'s large CPU tensors (parameters, buffers, quantization records) into unlinked mapped
    files under `folder`. -> bytes moved. Tensors shared by several names are moved once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    moved: dict[tuple, torch.Tensor] = {}  # the same tensor under several names -> one mapping (ties kept)
    total = 0

    def move(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)  # an address alone: a view of another shape
        if key not in moved:
            moved[key] = _spilled(t, folder)
            total += t.numel() * t.element_size()
        return moved[key]

    for mod in block.modules():
        for p in mod._parameters.values():
            if p is not None and _worth(p):
                p.data = move(p.data)
        for name, b in list(mod._buffers.items()):  # replaced in place: a copy of the items
            if b is not None and _worth(b):
                mod._buffers[name] = move(b)
        rec = getattr(mod, "workbench_quant", None)
        if rec is not None and dataclasses.is_dataclass(rec):
            for f in dataclasses.fields(rec):
                v = getattr(rec, f.name)
                if _worth(v):
                    setattr(rec, f.name, move(v))
    return total


def keep_like_original(lm, block: nn.Module) -> nn.Module:
    """Under an offload plan, spill a new replacement block to the plan's offload folder (see the module
    docstring); under the other plans, nothing. -> the block."""
    plan = getattr(lm, "plan", None)
    if plan is None or plan.kind != "offload" or not plan.offload_folder:
        return block
    spill_block(block, Path(plan.offload_folder) / SUBFOLDER)
    give_back()  # the freed copies were below glibc's mmap threshold on small models: kept in its heap
    return block
