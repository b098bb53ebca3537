"""Adapter base: canonical names -> real module paths for one architecture family.

Only adapters spell paths like `model.layers`; everything else asks the adapter for `blocks`,
`linears(block)`, `final_norm` and friends (TransformerLens-style canonical names).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedArchitecture


def get_path(root: nn.Module, path: str):
    """Follow a dotted attribute path; '' returns root. Missing -> None."""
    obj = root
    if not path:
        return obj
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 stores linears as Conv1D with weight (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module in (out, in) orientation (a view where possible)."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def set_linear_weight(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Write an (out, in) weight into a linear-like module, keeping its own orientation and dtype."""
    w = w_out_in.t() if is_conv1d(module) else w_out_in
    with torch.no_grad():
        module.weight.data = w.contiguous().to(module.weight.dtype)


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    w = linear_weight(module)
    return int(w.shape[1]), int(w.shape[0])


@dataclass
class Adapter:
    """Maps canonical names to one model's modules.

    Paths are relative to the top model object (the *ForCausalLM or the encoder model).
    `linear_paths` map canonical linear names (q, k, v, o, gate, up, down, qkv, fc1, fc2, ...) to paths
    relative to a block; `norm_paths` likewise for the block's norms.
    """

    family: str
    blocks_path: str
    embed_paths: tuple[str, ...]
    final_norm_path: str | None
    lm_head_path: str | None
    linear_paths: dict[str, str]
    norm_paths: dict[str, str]
    attn_path: str
    mlp_path: str
    causal: bool = True
    extra: dict = field(default_factory=dict)

    # ---- lookup ---------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.blocks_path)

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in (get_path(model, p) for p in self.embed_paths) if m is not None]

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return get_path(model, self.final_norm_path) if self.final_norm_path else None

    def lm_head(self, model: nn.Module) -> nn.Module | None:
        return get_path(model, self.lm_head_path) if self.lm_head_path else None

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """Canonical name -> linear-like module of one block, in a fixed order."""
        out = {}
        for name, path in self.linear_paths.items():
            m = get_path(block, path)
            if m is not None:
                out[name] = m
        return out

    def norms(self, block: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, p in self.norm_paths.items() if (m := get_path(block, p)) is not None}

    def attention(self, block: nn.Module) -> nn.Module:
        return get_path(block, self.attn_path)

    def mlp(self, block: nn.Module) -> nn.Module:
        return get_path(block, self.mlp_path)

    def num_heads(self, model: nn.Module) -> int:
        cfg = model.config
        for key in ("num_attention_heads", "n_head"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        raise UnsupportedArchitecture("the config names no number of attention heads")

    # ---- forward pieces -------------------------------------------------------------------------
    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden states after the last block -> logits (float32)."""
        norm = self.final_norm(model)
        if norm is not None:
            hidden = norm(hidden)
        return self.logits(model, hidden)

    def logits(self, model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """LM head alone (and the logit soft-cap where the family has one) on hidden states that went
        through the final norm already, as the base model returns them -> logits (float32)."""
        head = self.lm_head(model)
        if head is None:
            raise UnsupportedArchitecture(f"{self.family} has no language-model head")
        logits = head(normed)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    # ---- structural edits (never in place on the original) --------------------------------------
    def rebind_block(self, block: nn.Module, new_idx: int) -> nn.Module:
        """A shallow copy of `block` whose submodules carrying `layer_idx` say `new_idx`.

        Weights stay shared; only the small module objects on the path to a `layer_idx` are copied, so
        the original block keeps its index. Needed for a KV cache on a model with fewer blocks.
        """
        return _rebind(block, new_idx)

    def set_num_blocks(self, config, kept: list[int]) -> None:
        """Edit a config (a copy) so it describes only the `kept` original blocks, in order."""
        total = None
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(config, key, None), int):
                total = total or getattr(config, key)
                setattr(config, key, len(kept))
        # Per-layer lists (layer_types and the like) follow the kept blocks.
        for key, value in list(vars(config).items()):
            if isinstance(value, (list, tuple)) and total and len(value) == total and key.startswith("layer"):
                setattr(config, key, [value[i] for i in kept])


def _carries_layer_idx(module: nn.Module) -> bool:
    return any(hasattr(m, "layer_idx") for m in module.modules())


def rebind_hooked_forward(clone: nn.Module, original: nn.Module) -> nn.Module:
    """Point a shallow copy's accelerate-hooked forward at the copy itself.

    A model loaded under a device map (engine/plan.py) has `forward` replaced, per module, by a partial
    bound to that module, and `_old_forward` bound to it too. copy.copy keeps both in the copy's
    __dict__, so calling the copy would run the original (its blocks, its layer_idx): a variant's view
    would silently compute the original model. Rebinding both to the copy fixes that.
    """
    if "_old_forward" not in original.__dict__ or not isinstance(original.__dict__.get("forward"), functools.partial):
        return clone
    old = original.__dict__["_old_forward"]
    clone._old_forward = old.__func__.__get__(clone) if getattr(old, "__self__", None) is original else old
    clone.forward = functools.update_wrapper(functools.partial(original.forward.func, clone), clone._old_forward)
    return clone


def _rebind(module: nn.Module, new_idx: int) -> nn.Module:
    clone = copy.copy(module)
    rebind_hooked_forward(clone, module)
    clone._modules = dict(module._modules)  # own child table; children still shared
    if hasattr(clone, "layer_idx"):
        clone.layer_idx = new_idx
    for name, child in module._modules.items():
        if child is not None and _carries_layer_idx(child):
            clone._modules[name] = _rebind(child, new_idx)
    return clone
