"""Sparsity masks: pure functions, tensors in, boolean keep-masks out (no model, no hooks).

Scores (which weights go first):
- magnitude: |W_ij|. Essential Sparsity (Chen et al., arXiv 2306.03805) prunes it *globally* over all
  block linears and finds a "sharp dropping point" in the curve; `layer` scope prunes the same fraction
  of every linear instead.
- wanda: S_ij = |W_ij| * ||X_j||_2, X_j the j-th input feature of the linear over the calibration tokens
  (Sun et al., arXiv 2306.11695), compared within each output row (`row` scope).
- N:M (2:4, 4:8): in every group of M consecutive weights along the input dimension keep the N with the
  highest score; the sparsity is fixed at (M-N)/M.

Pruning exactly `k` weights of a group with ties (the default model's weights come from a 4-bit grid,
so equal magnitudes are everywhere): every score below the k-th smallest value goes, then the equal
ones in flat (row-major, then block/linear) order until k are gone, i.e. a stable sort's first k.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import RecipeError

METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4", "4:8")
SCOPES = ("global", "layer", "row")
DEFAULT_SCOPE = {"magnitude": "global", "wanda": "row"}


# ---- validation -----------------------------------------------------------------------------------
def check_method(method: str) -> str:
    if method not in METHODS:
        raise RecipeError(f"unknown sparsity method '{method}' (known: {', '.join(METHODS)})")
    return method


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise RecipeError(f"pattern must be 'unstructured' or 'N:M' such as 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise RecipeError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def resolve_scope(method: str, scope: str | None) -> str:
    scope = scope or DEFAULT_SCOPE[check_method(method)]
    if scope not in SCOPES:
        raise RecipeError(f"unknown scope '{scope}' (known: {', '.join(SCOPES)})")
    return scope


def check_sparsity(s, name: str = "sparsity") -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise RecipeError(f"'{name}' must be a number in [0, 1), got {s!r}")
    return float(s)


def prune_count(sparsity: float, n: int) -> int:
    """How many of n weights a sparsity removes (floor, as Wanda does; the epsilon absorbs 0.3*10 = 2.999)."""
    return min(n, int(math.floor(sparsity * n + 1e-6)))


# ---- scores (pure) ---------------------------------------------------------------------------------
def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """(out, in) -> |W| in float32."""
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """(out, in), (in,) -> |W_ij| * ||X_j||_2 (Wanda, arXiv 2306.11695, eq. 1)."""
    return w.detach().float().abs() * in_norm.float().to(w.device)[None, :]


# ---- masks (pure: tensors in, boolean keep-masks out) ----------------------------------------------
def prune_lowest(scores: torch.Tensor, k, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask for (G, n) scores that removes the k lowest of every row (k int or (G,) tensor).

    Ties at the threshold go in column order (a stable sort's first k). `threshold` (G,), the k-th
    smallest value per row, may be passed when it was computed once beforehand.
    """
    G, n = scores.shape
    k = torch.as_tensor(k, device=scores.device).expand(G).long()
    if int(k.max()) <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if threshold is None:
        # kthvalue needs k >= 1; rows with k = 0 get -inf (nothing below or equal to it)
        kth = scores.kthvalue(int(k.max()), dim=1).values if bool((k == k[0]).all()) else _row_kth(scores, k)
        threshold = torch.where(k > 0, kth, torch.full_like(kth, -math.inf))
    t = threshold.to(scores.device, scores.dtype)[:, None]
    below = scores < t
    need = (k - below.sum(1))[:, None]  # ties still to remove per row
    equal = scores == t
    prune = below | (equal & (equal.cumsum(1) <= need))
    return ~prune


def _row_kth(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = scores.sort(dim=1).values
    return s.gather(1, (k.clamp(min=1) - 1)[:, None]).squeeze(1)


def layer_mask(scores: torch.Tensor, sparsity: float, threshold=None) -> torch.Tensor:
    """Remove the lowest `sparsity` fraction of the whole tensor."""
    k = prune_count(sparsity, scores.numel())
    th = None if threshold is None else torch.as_tensor(threshold).reshape(1)
    return prune_lowest(scores.reshape(1, -1), k, th).view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float, threshold=None) -> torch.Tensor:
    """Remove the lowest `sparsity` fraction of every output row (Wanda's comparison group)."""
    return prune_lowest(scores, prune_count(sparsity, scores.shape[1]), threshold)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive weights along the input dimension (dim 1)."""
    out, inp = scores.shape
    if inp % m:
        raise RecipeError(f"N:M pattern {n}:{m} needs the input size ({inp}) to be a multiple of {m}")
    rank, _ = group_ranks(scores.reshape(out * inp // m, m))  # stable order within each group of m
    return (rank >= m - n).view(out, inp)


def global_threshold(scores: list[torch.Tensor], ks: list[int]) -> list[float]:
    """The k-th smallest value over all tensors together, for each k (one partition for all k)."""
    flat = np.concatenate([s.detach().float().cpu().reshape(-1).numpy() for s in scores])
    idx = sorted({max(k, 1) - 1 for k in ks})
    part = np.partition(flat, idx)
    return [float(part[max(k, 1) - 1]) if k > 0 else -math.inf for k in ks]


def sorted_kth(sorted_parts: list[torch.Tensor], ks: list[int]) -> list[float]:
    """The k-th smallest value over several ascending 1-D tensors of non-negative floats, for each k.

    Bisection on the float32 bit pattern (monotone for non-negative floats); each step counts with
    one binary search per tensor, so no concatenation or partition of all scores is needed."""
    parts = [p.float().cpu().contiguous() for p in sorted_parts]
    if any(bool(p.numel() and p[0] < 0) for p in parts):
        return global_threshold(parts, ks)

    def count_le(bits: int) -> int:
        t = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
        return sum(int(torch.searchsorted(p, t, right=True)) for p in parts)

    out = []
    for k in ks:
        if k <= 0:
            out.append(-math.inf)
            continue
        lo, hi = 0, 0x7F800000  # 0.0 .. +inf
        while lo < hi:  # smallest bit pattern whose value has at least k scores <= it
            mid = (lo + hi) // 2
            if count_le(mid) >= k:
                hi = mid
            else:
                lo = mid + 1
        out.append(float(torch.tensor([lo], dtype=torch.int32).view(torch.float32)))
    return out


def global_masks(scores: list[torch.Tensor], sparsity: float, threshold: float | None = None) -> list[torch.Tensor]:
    """Remove the lowest `sparsity` fraction of all tensors taken together (ties in list, then flat order)."""
    total = sum(s.numel() for s in scores)
    k = prune_count(sparsity, total)
    if k == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    t = global_threshold(scores, [k])[0] if threshold is None else threshold
    below = [int((s < t).sum()) for s in scores]
    need = k - sum(below)
    masks = []
    for s, nb in zip(scores, below):
        ties = int((s <= t).sum()) - nb if need > 0 else 0
        take = max(0, min(need, ties))
        need -= take
        if take == 0:
            masks.append(s >= t)
        elif take == ties:
            masks.append(s > t)
        else:  # the one linear where the tied weights are split: the first `take` of them in flat order
            equal = s == t
            masks.append(~((s < t) | (equal & (equal.reshape(-1).cumsum(0).view_as(s) <= take))))
    return masks


def sparsity_key(sparsity: float) -> float:
    return round(float(sparsity), 9)  # 0.1 * 6 and 0.6 name the same point


def split_global(sorted_flat: list[torch.Tensor], k: int, t: float) -> list[int]:
    """How many of each linear's weights are among the k globally lowest (ties in list order)."""
    if k == 0:
        return [0] * len(sorted_flat)
    tt = torch.tensor([t], dtype=sorted_flat[0].dtype)
    below = [int(torch.searchsorted(s, tt, right=False)) for s in sorted_flat]
    upto = [int(torch.searchsorted(s, tt, right=True)) for s in sorted_flat]
    need = k - sum(below)
    out = []
    for b, u in zip(below, upto):
        take = max(0, min(need, u - b))
        need -= take
        out.append(b + take)
    return out


def group_ranks(scores: torch.Tensor, keep_sorted: bool = False):
    """(G, n) -> (rank, sorted values or None): each element's 0-based position in its row's stable
    ascending sort (int16 if it fits). `rank >= k` is exactly the keep-mask of `prune_lowest(scores, k)`."""
    G, n = scores.shape
    srt, order = scores.sort(dim=1, stable=True)
    dtype = torch.int16 if n <= 2**15 else torch.int32
    rank = torch.empty((G, n), dtype=dtype, device=scores.device)
    rank.scatter_(1, order, torch.arange(n, device=scores.device, dtype=dtype).expand(G, n))
    return rank, (srt.reshape(-1).cpu() if keep_sorted else None)
