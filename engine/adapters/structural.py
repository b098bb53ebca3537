"""The structural adapter: read a decoder's layout from its module tree instead of a per-family table.

A causal LM in transformers is (almost always) an embedding, a ModuleList of decoder layers, a final
norm and a head. Each layer holds an attention module (separate q/k/v/o projections, or one fused qkv)
and an MLP (gate/up/down, a fused gate_up, fc1/fc2, c_fc/c_proj, or a mixture of experts). The names
differ by family; the candidate names below are the only per-family knowledge, and a family whose
names are not among them fails with one line naming what could not be found.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedArchitecture
from .base import Adapter, get_path, is_conv1d, linear_weight

# Where each part lives, by the names families give it (first match wins).
ATTN_NAMES = ("self_attn", "self_attention", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
# canonical linear -> names it goes by inside the attention module
ATTN_LINEARS = {
    "q": ("q_proj", "query", "q"),
    "k": ("k_proj", "key", "k"),
    "v": ("v_proj", "value", "v"),
    "qkv": ("qkv_proj", "query_key_value", "c_attn", "Wqkv"),
    "o": ("o_proj", "out_proj", "dense", "c_proj", "o"),
}
# canonical linear -> names it goes by inside the MLP (or the block itself, as OPT keeps fc1/fc2 there)
MLP_LINEARS = {
    "gate_up": ("gate_up_proj",),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "c_fc", "fc1", "dense_h_to_4h", "w3", "fc_in"),
    "down": ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out"),
}
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
POSITION_EMBED_NAMES = ("wpe", "embed_positions")
EXPERTS_NAMES = ("experts",)
ROUTER_NAMES = ("gate", "router")
# model_type -> the family name the workbench shows (and tests use)
FAMILY_NAMES = {"gemma3_text": "gemma3", "gpt_neox": "gpt-neox"}


def is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _child(parent: nn.Module, names) -> tuple[str, nn.Module] | None:
    for n in names:
        m = parent._modules.get(n) if parent is not None else None
        if m is not None:
            return n, m
    return None


def _find_attention(block: nn.Module) -> tuple[str, nn.Module] | None:
    return _child(block, ATTN_NAMES)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The first ModuleList whose first element holds an attention module."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and _find_attention(mod[0]) is not None:
            return name, mod
    return None


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _block_layout(block: nn.Module, where: str) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """-> (attention path, mlp path, canonical linear -> path, extra paths) for one decoder layer."""
    found = _find_attention(block)
    if found is None:
        raise UnsupportedArchitecture(f"{where}: no attention module (looked for {', '.join(ATTN_NAMES)})")
    attn_name, attn = found
    linears: dict[str, str] = {}
    for canon, names in ATTN_LINEARS.items():
        hit = _child(attn, names)
        if hit is not None and is_linear(hit[1]):
            linears[canon] = f"{attn_name}.{hit[0]}"
    if "qkv" in linears and {"q", "k", "v"} & set(linears):
        raise UnsupportedArchitecture(f"{where}: both a fused qkv and separate q/k/v projections")
    if "qkv" not in linears and not {"q", "k", "v"} <= set(linears):
        raise UnsupportedArchitecture(
            f"{where}: no query/key/value projections in '{attn_name}' (looked for q_proj/k_proj/v_proj or a fused "
            f"{'/'.join(ATTN_LINEARS['qkv'])})"
        )
    if "o" not in linears:
        raise UnsupportedArchitecture(
            f"{where}: no attention output projection in '{attn_name}' (looked for {', '.join(ATTN_LINEARS['o'])})"
        )
    mlp_hit = _child(block, MLP_NAMES)
    mlp_name, mlp = mlp_hit if mlp_hit is not None else ("", block)
    extra: dict[str, str] = {}
    experts = _child(mlp, EXPERTS_NAMES) if mlp_hit is not None else None
    if experts is not None and not isinstance(experts[1], nn.ModuleList) and hasattr(experts[1], "down_proj"):
        # A mixture of experts with 3-D expert tensors (transformers 5): the router stays a module apart.
        extra["experts"] = f"{mlp_name}.{experts[0]}"
        router = _child(mlp, ROUTER_NAMES)
        if router is not None:
            extra["router"] = f"{mlp_name}.{router[0]}"
        return attn_name, mlp_name, linears, extra
    prefix = f"{mlp_name}." if mlp_name else ""
    for canon, names in MLP_LINEARS.items():
        hit = _child(mlp, names)
        if hit is not None and is_linear(hit[1]):
            linears[canon] = prefix + hit[0]
    if "gate_up" in linears and {"gate", "up"} & set(linears):
        raise UnsupportedArchitecture(f"{where}: both a fused gate_up and separate gate/up projections")
    if "down" not in linears or not ({"up", "gate_up"} & set(linears)):
        raise UnsupportedArchitecture(
            f"{where}: no MLP projections (looked in '{mlp_name or 'the block'}' for "
            f"{'/'.join(MLP_LINEARS['up'])} and {'/'.join(MLP_LINEARS['down'])})"
        )
    return attn_name, mlp_name, linears, extra


def _block_norms(block: nn.Module) -> dict[str, str]:
    """Every norm inside one block (pre/post norms, q/k norms), keyed by its path."""
    out = {}
    for name, mod in block.named_modules():
        if name and "norm" in type(mod).__name__.lower() and any(p.dim() == 1 for p in mod.parameters(recurse=False)):
            out[name] = name
    return out


def structural_adapter(model: nn.Module, family: str | None = None) -> "DecoderAdapter":
    """Map `model`'s decoder by structure; raise UnsupportedArchitecture naming what is missing."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None) or type(model).__name__
    family = family or FAMILY_NAMES.get(model_type, model_type)
    found = _find_blocks(model)
    if found is None:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r}: no list of decoder layers with an attention module "
            f"(looked for {', '.join(ATTN_NAMES)} in each layer)"
        )
    blocks_path, blocks = found
    attn_path = mlp_path = None
    linear_paths: dict[str, str] = {}
    norm_paths: dict[str, str] = {}
    extra: dict[str, str] = {}
    for i, blk in enumerate(blocks):  # a union: some MoE models keep dense MLPs in some layers
        a, m, lin, ex = _block_layout(blk, f"architecture {model_type!r}, layer {i}")
        if attn_path is None:
            attn_path, mlp_path = a, m
        for k, v in lin.items():
            if linear_paths.setdefault(k, v) != v:
                raise UnsupportedArchitecture(f"architecture {model_type!r}: layer {i} names '{k}' differently")
        for k, v in ex.items():
            extra.setdefault(k, v)
        for k, v in _block_norms(blk).items():
            norm_paths.setdefault(k, v)
    base_path = blocks_path.rpartition(".")[0]
    base = get_path(model, base_path)
    final = _child(base, FINAL_NORM_NAMES)
    final_norm_path = (f"{base_path}.{final[0]}" if base_path else final[0]) if final is not None else None
    get_in = getattr(model, "get_input_embeddings", None)
    embed = _path_of(model, get_in() if get_in else None)
    if embed is None:
        raise UnsupportedArchitecture(f"architecture {model_type!r}: no token embedding found")
    embed_paths = [embed]
    pos = _child(base, POSITION_EMBED_NAMES)
    if pos is not None and isinstance(pos[1], nn.Embedding):
        embed_paths.append(f"{base_path}.{pos[0]}" if base_path else pos[0])
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out else None
    lm_head_path = _path_of(model, head) if head is not None else None
    project_out = _child(base, ("project_out",))
    if project_out is not None and project_out[1] is not None:
        extra["project_out"] = f"{base_path}.project_out"
    return DecoderAdapter(
        family=family,
        blocks_path=blocks_path,
        embed_paths=tuple(embed_paths),
        final_norm_path=final_norm_path,
        lm_head_path=lm_head_path,
        linear_paths=linear_paths,
        norm_paths=norm_paths,
        attn_path=attn_path,
        mlp_path=mlp_path,
        causal=not (getattr(cfg, "is_decoder", True) is False and model_type in ("bert", "roberta")),
        extra=extra,
    )


class DecoderAdapter(Adapter):
    """An Adapter read from structure: adds the head's family conventions and canonical views."""

    def head(self, model: nn.Module, hidden):
        """Final norm (+ OPT's project_out) + LM head, then Granite's logit scaling and Gemma 2's soft-cap."""
        norm = self.final_norm(model)
        if norm is not None:
            hidden = norm(hidden)
        if "project_out" in self.extra:
            hidden = get_path(model, self.extra["project_out"])(hidden)
        head = self.lm_head(model)
        if head is None:
            raise UnsupportedArchitecture(f"{self.family} has no language-model head")
        logits = head(hidden)
        scaling = getattr(model.config, "logits_scaling", None)
        if scaling:
            logits = logits / scaling
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    def canonical_linears(self, model: nn.Module, block: nn.Module) -> dict[str, tuple[nn.Module, "torch.Tensor | None"]]:
        """q, k, v, o, gate, up, down -> (module, rows): `rows` index a fused module's (out, in) weight
        (None: the whole module). Ops keep working on `linears(block)`, one tensor per fused projection."""
        from .fused import gate_up_rows, qkv_rows

        out = {}
        lin = self.linears(block)
        for name, mod in lin.items():
            if name == "qkv":
                for part, rows in qkv_rows(model.config).items():
                    out[part] = (mod, rows)
            elif name == "gate_up":
                for part, rows in gate_up_rows(linear_weight(mod).shape[0]).items():
                    out[part] = (mod, rows)
            else:
                out[name] = (mod, None)
        return out

    def experts(self, block: nn.Module) -> nn.Module | None:
        """The 3-D expert tensors' module of an MoE block (None for a dense block)."""
        return get_path(block, self.extra["experts"]) if "experts" in self.extra else None

    def router(self, block: nn.Module) -> nn.Module | None:
        return get_path(block, self.extra["router"]) if "router" in self.extra else None

    @property
    def is_moe(self) -> bool:
        return "experts" in self.extra
