"""Pure math of the block-importance metrics: tensors in, numbers or tensors out.

No model, no hooks, no devices chosen here; the drivers in `influence.py` feed these functions the
hidden states they computed. Shapes: hidden states are (B, T, d); cosines are taken over d per token
and always in float32 so that half-precision models give the same ranking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last (hidden) dimension, per token: (..., d), (..., d) -> (...)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def macro_influence(h_ref: torch.Tensor, h_without: torch.Tensor) -> float:
    """FuseGPT's Macro Influence of one block (arXiv 2411.14507):
    MI = 1 - mean over tokens of cos(h_L, h_L without the block), h_L = last block's output."""
    return float(1.0 - token_cosine(h_ref, h_without).mean())


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT's Block Influence (arXiv 2403.03853): BI = 1 - mean over tokens of cos(input, output)."""
    return float(1.0 - token_cosine(x_in, x_out).mean())


def angular(a: torch.Tensor, b: torch.Tensor, last_token: bool = False) -> float:
    """Angular distance of Gromov et al. (arXiv 2403.17887): arccos(cos(a, b)) / pi, in [0, 1].

    The paper averages it over the data at the last token; `last_token=False` averages over every
    token (each position is the last token of its own prefix in a causal model), which is steadier
    on a small calibration batch."""
    if last_token:
        a, b = a[..., -1:, :], b[..., -1:, :]
    cos = token_cosine(a, b).clamp(-1.0, 1.0)
    return float((torch.arccos(cos) / math.pi).mean())


def angular_matrix(states: list[torch.Tensor], last_token: bool = False) -> list[list[float | None]]:
    """d(l, n) for every start l and run length n over hidden states h_0..h_P (P + 1 of them).

    states[l] is the hidden state entering block position l (states[P]: after the last block).
    Returns rows n = 1..P, each with P entries indexed by start l; None where l + n > P."""
    p = len(states) - 1
    rows = []
    for n in range(1, p + 1):
        rows.append([angular(states[l], states[l + n], last_token) if l + n <= p else None for l in range(p)])
    return rows


def best_runs(matrix: list[list[float | None]]) -> list[dict]:
    """For each run length n, the start with the smallest angular distance: [{"n", "start", "distance"}]."""
    out = []
    for n, row in enumerate(matrix, start=1):
        cands = [(d, l) for l, d in enumerate(row) if d is not None]
        d, l = min(cands)
        out.append({"n": n, "start": l, "distance": d})
    return out


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token NLL (nats): logits (B, T, V) predict ids[:, 1:]. -> (B,)"""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return nll.mean(dim=1)


def lowest(values: list[float | None], k: int) -> list[int]:
    """Indices of the k smallest non-None values, smallest first (ties broken by index)."""
    cands = sorted((v, i) for i, v in enumerate(values) if v is not None)
    return [i for _, i in cands[:k]]
