"""Canonical q/k/v and gate/up views of fused projections.

Ops and exports keep a fused projection as the one tensor the checkpoint has; the analyses that want
the separate projections read them through row indices into that tensor. The layout is the family's:
- contiguous blocks [q | k | v] (GPT-2's c_attn, Phi-3's qkv_proj, GQA-sized);
- per head [q_h k_h v_h] (GPT-NeoX's query_key_value; Falcon's without multi-query or the new layout);
- per KV group [q_1 .. q_g k v] (Falcon's new_decoder_architecture);
- [q_1 .. q_n k v] with one shared key/value head (Falcon multi-query);
- gate_up: [gate | up] (Phi-3).
"""

from __future__ import annotations

import torch


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) from a config, whatever the family calls them."""
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if getattr(config, "model_type", None) == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kv = int(config.num_kv_heads)
        else:
            kv = 1 if getattr(config, "multi_query", False) else heads
    else:
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return heads, kv, head_dim


def qkv_layout(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt == "gpt_neox":
        return "per_head"
    if mt == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return "per_group"
        return "multi_query" if getattr(config, "multi_query", False) else "per_head"
    return "blocks"


def qkv_rows(config) -> dict[str, torch.Tensor]:
    """Row indices of q, k and v inside a fused qkv weight (out, in), in each part's own row order."""
    nh, nkv, hd = head_counts(config)
    layout = qkv_layout(config)
    d = torch.arange(hd)
    if layout == "blocks":
        q, k = nh * hd, nkv * hd
        return {"q": torch.arange(q), "k": torch.arange(q, q + k), "v": torch.arange(q + k, q + 2 * k)}
    if layout == "per_head":  # (nh, 3, hd)
        base = torch.arange(nh)[:, None] * 3 * hd
        return {n: (base + j * hd + d).reshape(-1) for j, n in enumerate("qkv")}
    if layout == "multi_query":  # (nh + 2, hd)
        return {"q": torch.arange(nh * hd), "k": nh * hd + d, "v": (nh + 1) * hd + d}
    g = nh // nkv  # per_group: (nkv, g + 2, hd)
    base = torch.arange(nkv)[:, None, None] * (g + 2) * hd
    q = (base + torch.arange(g)[None, :, None] * hd + d).reshape(-1)
    k = (base[:, 0] + g * hd + d).reshape(-1)
    v = (base[:, 0] + (g + 1) * hd + d).reshape(-1)
    return {"q": q, "k": k, "v": v}


def gate_up_rows(out_features: int) -> dict[str, torch.Tensor]:
    half = out_features // 2
    return {"gate": torch.arange(half), "up": torch.arange(half, out_features)}
