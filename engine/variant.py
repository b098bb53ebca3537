"""Workspace: the original model (never modified) and any number of cheap variants.

A variant is the original plus per-block overrides: a block is either dropped or replaced by a new
module. Unchanged blocks are the original's own modules, so a variant costs only the blocks it changed.
Block indices are always the original model's 0-based indices.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter
from .adapters.base import rebind_hooked_forward
from .plan import onloaded, strip_hooks
from .errors import BlockIndexError


class _Drop:
    def __repr__(self):
        return "DROP"


DROP = _Drop()

_ids = itertools.count(1)


@dataclass
class Variant:
    """The original model plus `overrides` {original block index: DROP | replacement module}.

    `steps` are the recipe steps (dicts, as resolved) that produced it, `reports` what each measured.
    `tags` record per-block annotations shown in the UI (e.g. {3: "quantized 4-bit"}).
    """

    name: str
    num_blocks: int
    overrides: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)
    parent: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    description: str = ""  # one line in plain words where the steps do not say it (a sibling's purpose)

    # ---- queries --------------------------------------------------------------------------------
    def kept(self) -> list[int]:
        """Original indices of the blocks still present, in order."""
        return [i for i in range(self.num_blocks) if self.overrides.get(i) is not DROP]

    def dropped(self) -> list[int]:
        return [i for i, o in sorted(self.overrides.items()) if o is DROP]

    def replaced(self) -> list[int]:
        return [i for i, o in sorted(self.overrides.items()) if o is not DROP]

    def first_change(self) -> int | None:
        return min(self.overrides) if self.overrides else None

    def is_identity(self) -> bool:
        return not self.overrides

    def block_state(self, i: int) -> str:
        o = self.overrides.get(i)
        if o is None:
            return "kept"
        if o is DROP:
            return "dropped"
        return self.tags.get(i, "changed")

    # ---- derivation -----------------------------------------------------------------------------
    def derive(self, name: str | None = None) -> "Variant":
        """A child variant sharing every override module (they are never mutated after creation)."""
        return Variant(
            name=name or f"{self.name}+",
            num_blocks=self.num_blocks,
            overrides=dict(self.overrides),
            steps=list(self.steps),
            reports=list(self.reports),
            tags=dict(self.tags),
            parent=self.name,
        )

    def with_dropped(self, blocks, name: str | None = None) -> "Variant":
        blocks = sorted(set(int(b) for b in blocks))
        self.check_indices(blocks)
        child = self.derive(name)
        for b in blocks:
            child.overrides[b] = DROP
            child.tags.pop(b, None)
        if not child.kept():
            raise BlockIndexError("this would remove every block; keep at least one")
        return child

    def check_indices(self, blocks) -> None:
        bad = [b for b in blocks if not 0 <= int(b) < self.num_blocks]
        if bad:
            raise BlockIndexError(
                f"block index {bad[0]} is out of range: the model has blocks 0..{self.num_blocks - 1}"
            )


def original_variant(num_blocks: int) -> Variant:
    return Variant(name="original", num_blocks=num_blocks)


def block_modules(model: nn.Module, adapter: Adapter, variant: Variant) -> list[tuple[int, nn.Module]]:
    """(original index, module) for each block the variant keeps, replacements substituted."""
    blocks = adapter.blocks(model)
    out = []
    for i in variant.kept():
        o = variant.overrides.get(i)
        out.append((i, blocks[i] if o is None else o))
    return out


def current_block(model: nn.Module, adapter: Adapter, variant: Variant, i: int) -> nn.Module:
    """The module that stands for original block i in the variant (the original one if unchanged)."""
    o = variant.overrides.get(i)
    if o is DROP:
        raise BlockIndexError(f"block {i} is dropped in variant '{variant.name}'")
    return adapter.blocks(model)[i] if o is None else o


def copy_block(block: nn.Module) -> nn.Module:
    """A full copy of one block (new tensors), to be edited into a replacement. An offloaded block's
    weights are materialised for the copy, and the copy carries no offload hooks: a plain module."""
    with onloaded(block):
        clone = strip_hooks(copy.deepcopy(block))
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def view_model(model: nn.Module, adapter: Adapter, variant: Variant) -> nn.Module:
    """A runnable model for the variant that shares every tensor with the original.

    The module objects on the path to the block list are shallow-copied; the block list is new; kept
    blocks are rebound so their attention `layer_idx` counts 0..n-1 (a KV cache sizes itself from the
    config, which is copied and edited to the kept block count). Nothing of the original is modified.
    """
    if variant.is_identity():
        return model
    kept = block_modules(model, adapter, variant)
    config = copy.deepcopy(model.config)
    adapter.set_num_blocks(config, [i for i, _ in kept])
    new_blocks = nn.ModuleList(adapter.rebind_block(m, j) for j, (_, m) in enumerate(kept))

    root = _shallow(model)
    root.config = config
    parts = adapter.blocks_path.split(".")
    parent = root
    for part in parts[:-1]:
        child = _shallow(parent._modules[part])
        if hasattr(child, "config"):
            child.config = config
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = new_blocks
    if hasattr(root, "generation_config"):
        root.generation_config = copy.deepcopy(model.generation_config)
    dmap = getattr(model, "hf_device_map", None)
    if isinstance(dmap, dict):  # a model under a memory plan: the view's map names its own block indices
        root.hf_device_map = _renumbered_map(dmap, adapter.blocks_path, [i for i, _ in kept])
    return root


def _renumbered_map(dmap: dict, blocks_path: str, kept: list[int]) -> dict:
    """A device map for the view: block j is the original block kept[j] (replacements compute on the CPU
    device they were made on, which is where the original block's entry says; generation sizes its KV
    cache from these names)."""
    prefix = blocks_path + "."
    out = {k: v for k, v in dmap.items() if not k.startswith(prefix)}
    for j, i in enumerate(kept):
        for k, v in dmap.items():
            if k == f"{prefix}{i}" or k.startswith(f"{prefix}{i}."):
                out[f"{prefix}{j}{k[len(prefix) + len(str(i)):]}"] = v
    return out


def _shallow(module: nn.Module) -> nn.Module:
    clone = rebind_hooked_forward(copy.copy(module), module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def state_fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached clone of every tensor, for bit-identity checks in tests."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
