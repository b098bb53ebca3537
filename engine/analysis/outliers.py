"""Activation outliers and "no-op" attention heads over calibration data.

Quantizable Transformers (Bondarenko, Nagel & Blankevoort, NeurIPS 2023, arXiv 2306.12929):
- per block and module (attention output = the output projection's output, MLP input, MLP output = the
  down projection's output, residual stream = the block's output) the infinity norm ||x||_inf and the
  kurtosis mu_4 / sigma^4 of one sample's flattened activation, averaged over the calibration samples
  (the paper's utils.kurtosis; population moments, i.e. scipy.stats.kurtosis(fisher=False));
- the hidden dimensions where the largest magnitudes sit (outliers concentrate in a few of them);
- heads that learn to do "nothing" put their attention on the first token or on delimiters (".", ",",
  a newline): per head, the mean over queries t >= 1 (query 0 can only see itself) of the attention mass
  on the first token, and, as a second score, the mass on delimiter tokens after the first.

`outlier_blocks` turns the statistics into the list of blocks the quantize panel should treat with care.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..errors import WorkbenchError
from ..block_stream import check_cancel, forward_base, isolated_view, owned_hooks, point_hooks, view_blocks
from ..loading import LoadedModel
from ..variant import Variant
from .attention import attention_probs_of

log = logging.getLogger(__name__)

MODULES = ("attn_out", "mlp_in", "mlp_out", "residual")
MODULE_LABELS = {
    "attn_out": "attention output",
    "mlp_in": "MLP input",
    "mlp_out": "MLP output",
    "residual": "residual stream",
}
DELIMITERS = frozenset({".", ",", ";", ":", "!", "?", "\n", "\n\n", "...", "-", "--"})
TOP_DIMS = 8


# ---- pure statistics --------------------------------------------------------------------------------
def kurtosis(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """mu_4 / sigma^4 along `dim` with population moments (3 for a Gaussian), in float64."""
    x = x.double()
    c = x - x.mean(dim, keepdim=True)
    m2 = c.pow(2).mean(dim)
    m4 = c.pow(4).mean(dim)
    return m4 / m2.pow(2)


def sample_stats(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample of (B, T, d): (inf-norm (B,), kurtosis of the flattened T*d values (B,))."""
    flat = act.reshape(act.shape[0], -1)
    return flat.abs().amax(1).double(), kurtosis(flat, dim=1)


def noop_scores(probs: torch.Tensor, delim_mask: torch.Tensor | None = None, causal: bool = True) -> dict:
    """No-op scores of each head from attention probabilities, as sums and counts (batches add up).

    probs: (B, H, T, T), rows = queries. delim_mask: (B, T) bool, True where the token is a delimiter.
    first: over b and queries t >= 1, the mass probs[b, h, t, 0] on the first token;
    delim: over queries t >= 1 that can see a delimiter at a key position j >= 1 (j <= t when causal),
    the mass on those delimiters (the first token is left to the first score).
    Returns {"first_sum" (H,), "first_count", "delim_sum" (H,), "delim_count"}; mean = sum / count.
    """
    B, H, T, _ = probs.shape
    p = probs.double()
    zeros = torch.zeros(H, dtype=torch.float64, device=probs.device)
    out = {"first_sum": p[:, :, 1:, 0].sum((0, 2)) if T > 1 else zeros, "first_count": B * max(T - 1, 0)}
    if delim_mask is None or T < 2:
        out.update(delim_sum=zeros, delim_count=0)
        return out
    keys = delim_mask.to(probs.device).bool().clone()
    keys[:, 0] = False
    mass = (p * keys[:, None, None, :].double()).sum(-1)  # (B, H, T): mass of each query on delimiters
    if causal:
        sees = keys.long().cumsum(-1) > 0  # (B, T): a delimiter at some j <= t
    else:
        sees = keys.any(-1, keepdim=True).expand(B, T).clone()
    sees[:, 0] = False
    out["delim_sum"] = (mass * sees[:, None, :].double()).sum((0, 2))
    out["delim_count"] = int(sees.sum())
    return out


def delimiter_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: tokens that decode to a delimiter (punctuation, newline) or are special tokens."""
    special = {getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")}
    special.discard(None)
    is_delim = {}
    for t in torch.unique(ids).tolist():
        if t in special:
            is_delim[t] = True
            continue
        try:
            s = tokenizer.decode([t])
        except Exception:  # an id the tokenizer cannot decode alone is no delimiter
            s = ""
        is_delim[t] = s.strip(" ") in DELIMITERS or (s.strip() == "" and "\n" in s)
    lut = torch.tensor([is_delim.get(i, False) for i in range(int(ids.max()) + 1)], dtype=torch.bool)
    return lut[ids.cpu()].to(ids.device)


# ---- the calibration pass ---------------------------------------------------------------------------
@dataclass
class _Acc:
    """Running statistics of one (block, module) activation."""

    inf: list
    kurt: list
    dim_max: torch.Tensor | None = None

    def add(self, act: torch.Tensor) -> None:
        inf, k = sample_stats(act)
        self.inf.extend(inf.tolist())
        self.kurt.extend(k.tolist())
        m = act.detach().abs().reshape(-1, act.shape[-1]).amax(0).float().cpu()
        self.dim_max = m if self.dim_max is None else torch.maximum(self.dim_max, m)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def module_points(lm: LoadedModel, block) -> dict:
    """Canonical module -> (submodule, 'in' | 'out') where each of MODULES is read in one block."""
    lin = lm.adapter.linears(block)
    pts = {}
    if "o" in lin:
        pts["attn_out"] = (lin["o"], "out")
    up = next((lin[k] for k in ("gate", "up", "fc1") if k in lin), None)  # all read the MLP's input
    if up is not None:
        pts["mlp_in"] = (up, "in")
    down = next((lin[k] for k in ("down", "fc2") if k in lin), None)
    if down is not None:
        pts["mlp_out"] = (down, "out")
    pts["residual"] = (block, "out")
    return pts


@torch.no_grad()
def calibration_pass(
    lm: LoadedModel,
    variant: Variant,
    ids: torch.Tensor,
    modules: bool = True,
    attention: bool = True,
    block_io: bool = False,
    batch_size: int = 4,
    progress=None,
    cancel=None,
) -> dict:
    """One eager pass of the variant over calibration ids (B, T), reducing as it goes.

    Returns {"blocks": kept original indices, "acc": {(i, module): _Acc}, "heads": {i: summed head
    statistics}, "io": {i: summed block-update statistics}} — only the parts asked for.
    """
    view = isolated_view(lm, variant, "eager" if attention else None)
    pairs = view_blocks(lm, view, variant)
    acc: dict = {}
    heads: dict = {}
    io: dict = {}
    delim: dict = {}
    handles = []
    for i, blk in pairs:
        if modules:
            points = {(i, name): p for name, p in module_points(lm, blk).items()}
            for key in points:
                acc.setdefault(key, _Acc([], []))
            handles += point_hooks(points, lambda key, x: acc[key].add(x))
        if attention:
            def att_hook(m, args, out, i=i):
                probs = attention_probs_of(out)
                s = head_pattern_sums(probs, delim["mask"], lm.adapter.causal)
                heads[i] = s if i not in heads else {k: heads[i][k] + v for k, v in s.items()}

            handles.append(lm.adapter.attention(blk).register_forward_hook(att_hook))
        if block_io:
            def io_hook(m, args, kwargs, out, i=i):
                x = args[0] if args else kwargs["hidden_states"]
                s = update_sums(x, _first(out))
                io[i] = s if i not in io else {k: io[i][k] + v for k, v in s.items()}

            handles.append(blk.register_forward_hook(io_hook, with_kwargs=True))
    n = ids.shape[0]
    with owned_hooks(*handles):
        for start in range(0, n, batch_size):
            check_cancel(cancel, "analysis cancelled")
            batch = ids[start : start + batch_size].to(lm.device)
            delim["mask"] = delimiter_mask(lm.tokenizer, batch)
            forward_base(lm, view, batch)
            if progress:
                progress(min(1.0, (start + batch.shape[0]) / n), f"calibration samples {start + batch.shape[0]}/{n}")
    return {"blocks": [i for i, _ in pairs], "acc": acc, "heads": heads, "io": io}


def head_pattern_sums(probs: torch.Tensor, delim_mask: torch.Tensor, causal: bool) -> dict:
    """Summed per-head attention-pattern statistics of one batch (divide by the counts for means).

    first/delim: the no-op scores (see `noop_scores`); self: mass on the query itself; prev: on the token
    before; entropy: row entropy / log(visible keys); distance: mean |t - j| under the row, / t. All over
    queries t >= 1. Values are (H,) float64 tensors; counts are ints."""
    B, H, T, _ = probs.shape
    out = noop_scores(probs, delim_mask, causal)
    if T < 2:
        return out
    p = probs.double()
    t = torch.arange(T, device=probs.device)
    diag = p.diagonal(dim1=-2, dim2=-1)[..., 1:]  # (B, H, T-1)
    prev = p[..., 1:, :].gather(-1, (t[1:] - 1).view(1, 1, T - 1, 1).expand(B, H, T - 1, 1)).squeeze(-1)
    q = p[..., 1:, :].clamp_min(1e-30)
    ent = -(q * q.log()).sum(-1)  # (B, H, T-1)
    vis = (t[1:] + 1).double() if causal else torch.full((T - 1,), float(T), dtype=torch.float64, device=probs.device)
    dist = (p[..., 1:, :] * (t[1:, None] - t[None, :]).abs().double()).sum(-1) / t[1:].double()
    out.update(
        self_sum=diag.sum((0, 2)),
        prev_sum=prev.sum((0, 2)),
        entropy_sum=(ent / vis.log()).sum((0, 2)),
        distance_sum=dist.sum((0, 2)),
    )
    return out


def update_sums(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Summed statistics of one block's residual update u = y - x over all tokens of a batch."""
    x, y = x.double(), y.double()
    u = y - x
    rel = u.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)  # (B, T)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    return {
        "n": torch.tensor(float(rel.numel()), dtype=torch.float64),
        "rel": rel.sum(),
        "rel2": rel.pow(2).sum(),
        "bi": (1 - cos).sum(),
        "bi2": (1 - cos).pow(2).sum(),
        "u_sum": u.reshape(-1, u.shape[-1]).sum(0).cpu(),  # for the mean update direction
    }


# ---- the analysis -----------------------------------------------------------------------------------
def _mean(v: list) -> float:
    return float(sum(v) / len(v)) if v else float("nan")


def outlier_stats(
    lm: LoadedModel,
    variant: Variant,
    ids: torch.Tensor,
    top_k: int = TOP_DIMS,
    progress=None,
    cancel=None,
) -> dict:
    """Inf-norm, kurtosis and top outlier dimensions per block and module, and no-op scores per head.

    Lists are indexed by ORIGINAL block index (None where the variant dropped the block)."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise WorkbenchError("outlier statistics need calibration ids of shape (samples, tokens >= 2)")
    res = calibration_pass(lm, variant, ids, modules=True, attention=True, progress=progress, cancel=cancel)
    n = variant.num_blocks
    out = {
        "variant": variant.name,
        "blocks": res["blocks"],
        "num_blocks": n,
        "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "modules": list(MODULES),
        "inf_norm": {m: [None] * n for m in MODULES},  # mean over samples of per-sample ||x||_inf
        "inf_norm_max": {m: [None] * n for m in MODULES},
        "kurtosis": {m: [None] * n for m in MODULES},  # mean over samples of per-sample mu4/sigma^4
        "kurtosis_max": {m: [None] * n for m in MODULES},
        "top_dims": {m: [None] * n for m in MODULES},  # [{"dim", "max_abs", "x_median"}]
        "noop_first": [None] * n,  # [block][head]
        "noop_delim": [None] * n,
        "delimiter_queries": 0,
    }
    for (i, m), a in res["acc"].items():
        out["inf_norm"][m][i] = _mean(a.inf)
        out["inf_norm_max"][m][i] = max(a.inf)
        out["kurtosis"][m][i] = _mean(a.kurt)
        out["kurtosis_max"][m][i] = max(a.kurt)
        med = float(a.dim_max.median())
        vals, dims = a.dim_max.topk(min(top_k, a.dim_max.numel()))
        out["top_dims"][m][i] = [
            {"dim": int(d), "max_abs": float(v), "x_median": float(v) / med if med > 0 else math.inf}
            for v, d in zip(vals.tolist(), dims.tolist())
        ]
    for i, s in res["heads"].items():
        out["noop_first"][i] = (s["first_sum"] / max(s["first_count"], 1)).tolist()
        out["noop_delim"][i] = (s["delim_sum"] / s["delim_count"]).tolist() if s["delim_count"] else None
        out["delimiter_queries"] = int(s["delim_count"])
    return out


BLOCK_LOCAL = ("attn_out", "mlp_in", "mlp_out")


def outlier_blocks(
    stats: dict,
    inf_norm_factor: float = 4.0,
    kurtosis_factor: float = 10.0,
    min_kurtosis: float = 20.0,
    modules: tuple[str, ...] = BLOCK_LOCAL,
) -> list[dict]:
    """Blocks that carry activation outliers, for the quantize panel (original indices).

    Only a block's own activations count (attention output, MLP input and output): the residual stream
    carries an outlier on from the block that made it into every later block, so it would flag them all.
    A block is flagged when, for one of `modules`, its mean inf-norm exceeds `inf_norm_factor` x that
    module's median over the blocks, or its mean kurtosis exceeds both `kurtosis_factor` x the median and
    `min_kurtosis` (a Gaussian has 3). Returns [{"block", "modules", "kurtosis", "inf_norm"}] by block.
    """
    flagged: dict[int, dict] = {}
    for m in modules:
        infs = [v for v in stats["inf_norm"].get(m, []) if v is not None]
        kurts = [v for v in stats["kurtosis"].get(m, []) if v is not None]
        if not infs:
            continue
        med_inf = sorted(infs)[len(infs) // 2]
        med_k = sorted(kurts)[len(kurts) // 2]
        for i, (inf, k) in enumerate(zip(stats["inf_norm"][m], stats["kurtosis"][m])):
            if inf is None:
                continue
            big = med_inf > 0 and inf > inf_norm_factor * med_inf
            heavy = k > kurtosis_factor * med_k and k > min_kurtosis
            if big or heavy:
                f = flagged.setdefault(i, {"block": i, "modules": [], "kurtosis": 0.0, "inf_norm": 0.0})
                f["modules"].append(m)
                f["kurtosis"] = max(f["kurtosis"], k)
                f["inf_norm"] = max(f["inf_norm"], inf)
    return [flagged[i] for i in sorted(flagged)]


def blocks_with_outliers(lm: LoadedModel, variant: Variant, ids: torch.Tensor, stats: dict | None = None,
                         **rule) -> list[int]:
    """Original indices of the blocks `outlier_blocks` flags (from `stats` where the caller has them):
    the one call the quantize panel needs. `rule` passes thresholds on to `outlier_blocks`."""
    return [f["block"] for f in outlier_blocks(stats or outlier_stats(lm, variant, ids), **rule)]
