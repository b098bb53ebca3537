"""One-shot weight sparsity: masks, the sparsity sweep with its knee, and per-layer sensitivity.

Scores (which weights go first):
- magnitude: |W_ij|. Essential Sparsity (Chen et al., arXiv 2306.03805) prunes it *globally* over all
  block linears (Q/K/V/O/MLP; embeddings, norms and the LM head excluded) and finds a "sharp dropping
  point" in the curve; `layer` scope prunes the same fraction of every linear instead.
- wanda: S_ij = |W_ij| * ||X_j||_2, X_j the j-th input feature of the linear over the calibration tokens
  (Sun et al., arXiv 2306.11695), compared within each output row (`row` scope). Here the statistics come
  from one pass of the unpruned model over the calibration text and are reused by every sparsity point
  (Wanda's own code re-collects them block by block on the partly pruned model; the curve and the
  applied step use the same one-pass statistics, so a point of the curve is exactly what applying gives).
- N:M (2:4, 4:8): in every group of M consecutive weights along the input dimension keep the N with the
  highest score (either score above); the sparsity is fixed at (M-N)/M.

Pruning exactly `k` weights of a group with ties (the default model's weights come from a 4-bit grid,
so equal magnitudes are everywhere): every score below the k-th smallest value goes, then the equal
ones in flat (row-major, then block/linear) order until k are gone, i.e. a stable sort's first k.

The sweep traces the original once on an evaluation subset (hidden state entering each block, the
original's log-probabilities) and evaluates every point from its first changed block; the calibration
statistics and the per-group thresholds for all the sweep's sparsities are computed once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..adapters import linear_weight
from ..plan import linear_value
from ..errors import Cancelled, RecipeError
from ..eval import compare, run_from
from ..block_stream import BlockTrace, SquaredNorms, owned_hooks, run_stack, trace_blocks
from ..loading import LoadedModel
from ..workspace import Variant, copy_block, current_block, original_variant, view_model

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4", "4:8")
SCOPES = ("global", "layer", "row")
DEFAULT_SCOPE = {"magnitude": "global", "wanda": "row"}
DEFAULT_EVAL_TOKENS = 2048
DEFAULT_SEQ_LEN = 256
DEFAULT_SENSITIVITY_TOKENS = 256
DEFAULT_TOLERANCE = 0.01


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


# ---- targets and calibration statistics ------------------------------------------------------------
@dataclass
class Target:
    """One prunable linear: original block index, canonical name, the module in the base variant.

    An expert's slice of a mixture-of-experts block (`param` "gate_up_proj" or "down_proj", `expert` e)
    is a target too: `module` is then the experts module and the weight its (out, in) slice e."""

    block: int
    name: str
    module: nn.Module
    param: str | None = None
    expert: int | None = None

    @property
    def key(self) -> str:
        return f"{self.block}.{self.name}"

    @property
    def kind(self) -> str:
        """The module type the report groups by (q_proj, ..., experts.gate_up_proj)."""
        return self.name if self.param is None else f"experts.{self.param}"

    def value(self) -> torch.Tensor:
        """The (out, in) weight in the base variant (an offloaded linear's read from its memory map)."""
        if self.param is None:
            return linear_value(self.module)
        return getattr(self.module, self.param)[self.expert].detach()

    def numel(self) -> int:
        return self.value().numel() if self.param is not None else self.module.weight.numel()

    def weight_in(self, adapter, block: nn.Module) -> torch.Tensor:
        """A writable (out, in) view of this target's weight in `block` (a copy of its block)."""
        if self.param is None:
            return linear_weight(adapter.linears(block)[self.name])
        return getattr(adapter.experts(block), self.param)[self.expert]


def prunable_linears(lm: LoadedModel, variant: Variant, blocks=None, types=None) -> list[Target]:
    """Every block linear the adapter names (never embeddings, norms or the LM head)."""
    blocks = variant.kept() if blocks is None or len(blocks) == 0 else sorted(set(int(b) for b in blocks))
    variant.check_indices(blocks)
    out = []
    for i in blocks:
        block = current_block(lm.model, lm.adapter, variant, i)  # raises for a dropped block
        for name, module in lm.adapter.linears(block).items():
            if types is None or name in types:
                out.append(Target(i, name, module))
        experts = lm.adapter.experts(block) if getattr(lm.adapter, "is_moe", False) else None
        if experts is not None:  # each expert's slices of the 3-D expert tensors; the router is left alone
            for param in ("gate_up_proj", "down_proj"):
                if types is None or f"experts.{param}" in types:
                    out += [Target(i, f"experts.{e}.{param}", experts, param, e)
                            for e in range(getattr(experts, param).shape[0])]
    if not out:
        raise RecipeError("nothing to prune: no block linears selected")
    return out


@torch.no_grad()
def input_norms(lm: LoadedModel, variant: Variant, targets: list[Target], ids: torch.Tensor, batch: int = 4) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every target's input features over the calibration tokens `ids` (owned hooks)."""
    norms_sq = SquaredNorms({t.key: t.module for t in targets if t.param is None})
    sq = norms_sq.sq  # the experts' hooks below add their slices' sums to the same dict

    routed: dict[str, int] = {}

    def make_experts(block_targets):
        def pre(module, args):  # hidden (N, H), top_k_index (N, k): each expert sees its routed tokens only
            from ..adapters.experts import expert_intermediate, routed_tokens

            hidden, top = args[0].detach().float(), args[1]
            for t in block_targets:
                x = hidden[routed_tokens(top, t.expert)]
                if t.param == "down_proj":
                    x = expert_intermediate(module, t.expert, x)
                s = x.pow(2).sum(0)
                sq[t.key] = s if t.key not in sq else sq[t.key] + s
                routed[t.key] = routed.get(t.key, 0) + int(x.shape[0])

        return pre

    model = view_model(lm.model, lm.adapter, variant)
    handles = norms_sq.handles()
    by_experts: dict[int, list[Target]] = {}
    for t in targets:
        if t.param is not None:
            by_experts.setdefault(id(t.module), []).append(t)
    handles += [ts[0].module.register_forward_pre_hook(make_experts(ts)) for ts in by_experts.values()]
    last = lm.adapter.blocks(model)[-1]
    with owned_hooks(*handles):
        for b0 in range(0, ids.shape[0], batch):
            run_stack(model, ids[b0 : b0 + batch].to(lm.device), stop_after=last)  # no LM head
    norms = {k: v.sqrt() for k, v in sq.items()}
    for t in targets:  # an expert's routed-token count, for the too-few-tokens fallback
        if t.param is not None:
            norms.setdefault(t.key, torch.zeros(t.value().shape[1]))
            norms[f"{t.key}#routed"] = torch.tensor(routed.get(t.key, 0))
    return norms


# ---- the pruner: statistics once, masks for any sparsity --------------------------------------------
class Pruner:
    """Scores, orderings and masks for one base variant and one set of target linears.

    `prepare(method, scope, sparsities)` does the once-per-sweep work: the calibration pass (Wanda) and
    the stable rank of every weight within its comparison group (`row`: int16, `layer`: int32, one
    argsort per linear) and, for `global`, how many weights of each linear a global cut at each
    sparsity takes (bisection over the per-linear sorted scores). A point's mask then costs one
    comparison per weight. With `reuse=False` nothing is kept
    between points (calibration pass and orderings are redone), the benchmark's baseline.
    """

    def __init__(self, lm: LoadedModel, variant: Variant, targets: list[Target], calib_ids=None, reuse: bool = True):
        self.lm, self.variant, self.targets = lm, variant, targets
        self.calib_ids = calib_ids
        self.reuse = reuse
        self._norms: dict | None = None
        self._ranks: dict = {}  # (method, scope) -> [rank tensor per target]
        self._thresholds: dict = {}  # (method, sparsity) -> per-linear prune counts of a global cut
        self._sorted = None
        self.stats_seconds = 0.0

    # statistics
    def norms(self) -> dict:
        if self._norms is None:
            if self.calib_ids is None:
                raise RecipeError("wanda needs calibration text (calibration ids were not given)")
            t0 = time.perf_counter()
            self._norms = input_norms(self.lm, self.variant, self.targets, self.calib_ids)
            self.stats_seconds += time.perf_counter() - t0
        return self._norms

    def scores(self, method: str, target: Target) -> torch.Tensor:
        w = target.value()  # an offloaded linear's weight is read from its memory map
        if method == "magnitude":
            return magnitude_scores(w)
        norms = self.norms()
        if target.key in self.fallback():
            return magnitude_scores(w)
        return wanda_scores(w, norms[target.key])

    def fallback(self) -> dict[str, int]:
        """Wanda's expert slices that too few calibration tokens reach: {key: routed tokens}. They are
        scored by magnitude instead (an input norm over a handful of tokens is noise)."""
        from ..adapters.experts import MIN_ROUTED_TOKENS

        if self._norms is None:
            return {}
        return {t.key: n for t in self.targets if t.param is not None
                and (n := int(self._norms[f"{t.key}#routed"])) < MIN_ROUTED_TOKENS}

    def forget(self) -> None:
        self._norms, self._ranks, self._thresholds, self._sorted = None, {}, {}, None

    def prepare(self, method: str, scope: str, sparsities=()) -> None:
        """Orderings (row/layer) or global thresholds for `sparsities`, computed once."""
        t0 = time.perf_counter()
        group = "layer" if scope == "global" else scope
        if (method, group) not in self._ranks:
            ranks, ordered = [], []
            for t in self.targets:
                sc = self.scores(method, t)
                r, srt = group_ranks(sc.reshape(1, -1) if group == "layer" else sc, keep_sorted=scope == "global")
                ranks.append(r.view_as(sc))
                ordered.append(srt)
            self._ranks[(method, group)] = ranks
            self._sorted = ordered if scope == "global" else None
        if scope == "global":
            todo = sorted({_key(s) for s in sparsities} - {s for (m, s) in self._thresholds if m == method})
            if todo:
                if self._sorted is None:  # layer ranks came from an earlier layer-scope call
                    self._sorted = [self.scores(method, t).reshape(-1).sort().values for t in self.targets]
                total = sum(t.numel() for t in self.targets)
                ks = [prune_count(s, total) for s in todo]
                for s, k, th in zip(todo, ks, sorted_kth(self._sorted, ks)):
                    self._thresholds[(method, s)] = _split_global(self._sorted, k, th)
                self._sorted = None
        self.stats_seconds += time.perf_counter() - t0

    def masks(self, method: str, sparsity: float, pattern: str = "unstructured", scope: str | None = None) -> list[torch.Tensor]:
        """Keep-mask per target (same order), for one point."""
        scope = resolve_scope(method, scope)
        nm = parse_pattern(pattern)
        if not self.reuse:
            self.forget()
        if nm is not None:
            return [nm_mask(self.scores(method, t), *nm) for t in self.targets]
        self.prepare(method, scope, [sparsity])
        if scope == "global":  # the global stable order restricted to one linear is its layer order
            per_layer = self._thresholds[(method, _key(sparsity))]
            return [rank >= k for rank, k in zip(self._ranks[(method, "layer")], per_layer)]
        out = []
        for rank in self._ranks[(method, scope)]:
            n = rank.numel() if scope == "layer" else rank.shape[1]
            out.append(rank >= prune_count(sparsity, n))
        return out


def _key(sparsity: float) -> float:
    return round(float(sparsity), 9)  # 0.1 * 6 and 0.6 name the same point


def _split_global(sorted_flat: list[torch.Tensor], k: int, t: float) -> list[int]:
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


def measured_sparsity(targets: list[Target], weights: list[torch.Tensor]) -> dict:
    """Fraction of exact zeros actually present, per linear, per block, per module type and overall."""
    per_layer, by_block, by_type = [], {}, {}
    zeros_total = numel_total = 0
    for t, w in zip(targets, weights):
        n = w.numel()
        z = n - int(torch.count_nonzero(w))
        per_layer.append({"block": t.block, "module": t.name, "sparsity": z / n, "zeros": z, "weights": n})
        for d, key in ((by_block, t.block), (by_type, t.kind)):
            zz, nn_ = d.get(key, (0, 0))
            d[key] = (zz + z, nn_ + n)
        zeros_total += z
        numel_total += n
    return {
        "overall": zeros_total / max(numel_total, 1),
        "zeros": zeros_total,
        "weights": numel_total,
        "by_block": {str(b): z / n for b, (z, n) in sorted(by_block.items())},
        "by_type": {k: z / n for k, (z, n) in by_type.items()},
        "per_layer": per_layer,
    }


def build_pruned(lm: LoadedModel, variant: Variant, targets: list[Target], masks: list[torch.Tensor], tag: str,
                 name=None, scratch: dict | None = None):
    """A new variant whose touched blocks are copies (`copy_block`) holding the masked weights.

    -> (variant, pruned weights in target order). Blocks whose masks remove nothing stay as they were.
    `scratch` {block: copy} lets a sweep reuse one set of copies for every point (each point rewrites
    every target of a touched block from the base weights); such a variant lives until the next point.
    """
    child = variant.derive(name)
    touched = sorted({t.block for t, keep in zip(targets, masks) if not bool(keep.all())})
    copies = scratch if scratch is not None else {}
    for i in touched:
        if i not in copies or scratch is None:
            copies[i] = copy_block(current_block(lm.model, lm.adapter, variant, i))
    weights = []
    with torch.no_grad():
        for t, keep in zip(targets, masks):
            w0 = t.value()
            if t.block not in touched:
                weights.append(w0)
                continue
            w = t.weight_in(lm.adapter, copies[t.block])  # a view of the copy's tensor
            torch.mul(w0, keep.to(w0.device), out=w)
            weights.append(w)
    for i in touched:
        child.overrides[i] = copies[i]
        child.tags[i] = tag
    return child, weights


def sparse_tag(sparsity: float, pattern: str) -> str:
    return f"sparse {pattern}" if pattern != "unstructured" else f"sparse {sparsity * 100:.0f}%"


# ---- evaluation subset -----------------------------------------------------------------------------
@dataclass
class EvalSet:
    """A stated evaluation subset, traced once through the original model."""

    ids: torch.Tensor  # (B, T)
    trace: BlockTrace
    ref_logp: torch.Tensor  # (B, T-1, V) fp16
    ref_nll: float
    source: str
    seq_len: int

    @property
    def tokens(self) -> int:
        return int(self.ids[:, 1:].numel())

    def describe(self) -> dict:
        return {"source": self.source, "sequences": int(self.ids.shape[0]), "seq_len": self.seq_len,
                "tokens_scored": self.tokens, "split": "evaluation (held out from calibration)",
                "first_tokens": True}


@torch.no_grad()
def eval_set(lm: LoadedModel, source: str = data.DEFAULT_SOURCE, tokens: int = DEFAULT_EVAL_TOKENS,
             seq_len: int = DEFAULT_SEQ_LEN) -> EvalSet:
    """The first `tokens` tokens of the evaluation split in `seq_len` windows (all of it: tokens=None)."""
    ids = data.evaluation_ids(lm.tokenizer, source, seq_len, tokens).to(lm.device)
    trace = trace_blocks(lm.model, lm.adapter, ids)
    logps, nll = [], 0.0
    for b in range(ids.shape[0]):  # one sequence at a time: (T, V) logits stay small
        logp = F.log_softmax(lm.adapter.head(lm.model, trace.output[b : b + 1])[:, :-1], dim=-1)
        nll -= logp.gather(-1, ids[b : b + 1, 1:, None]).sum().item()
        logps.append(logp.half())
    return EvalSet(ids, trace, torch.cat(logps), nll / ids[:, 1:].numel(), source, seq_len)


@torch.no_grad()
def evaluate(lm: LoadedModel, variant: Variant, es: EvalSet, start: int | None = None) -> dict:
    """Perplexity, KL(original || variant) and top-1 agreement on the subset, from block `start` on."""
    if variant.is_identity():
        return {"ppl": math.exp(es.ref_nll), "kl": 0.0, "top1": 1.0, "nll": es.ref_nll}
    start = variant.first_change() if start is None else start
    h = run_from(lm, variant, es.trace, start)
    tot = {"kl": 0.0, "agree": 0.0, "nll": 0.0, "n": 0}
    for b in range(h.shape[0]):
        logits = lm.adapter.head(lm.model, h[b : b + 1])[:, :-1]
        s = compare(es.ref_logp[b : b + 1], logits, es.ids[b : b + 1, 1:])
        for k in tot:
            tot[k] += s[k]
    n = max(tot["n"], 1)
    return {"ppl": math.exp(tot["nll"] / n), "kl": tot["kl"] / n, "top1": tot["agree"] / n, "nll": tot["nll"] / n}


# ---- knee ------------------------------------------------------------------------------------------
def knee(sparsities, ppls, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Essential sparsity and the point of maximum curvature of one curve (points sorted by sparsity).

    - essential: the largest sparsity up to which every point's perplexity stays within
      `tolerance` (relative) of the dense point (the first point, sparsity 0).
    - max curvature: of the curve x = sparsity, y = log(perplexity), both scaled to [0, 1], with
      non-uniform central differences: kappa = |y''| / (1 + y'^2)^1.5 at interior points.
    """
    xs = [float(x) for x in sparsities]
    ys = [float(y) for y in ppls]
    if not xs or xs[0] != 0.0:
        raise ValueError("the curve must start at sparsity 0 (dense)")
    limit = ys[0] * (1.0 + tolerance)
    essential = 0.0
    for x, y in zip(xs, ys):
        if not y <= limit:  # NaN counts as outside
            break
        essential = x
    kink = None
    if len(xs) >= 3:
        ly = [math.log(y) if y > 0 and math.isfinite(y) else math.inf for y in ys]
        finite = [v for v in ly if math.isfinite(v)]
        x0, x1 = xs[0], xs[-1]
        y0, y1 = min(finite), max(finite)
        sx = (x1 - x0) or 1.0
        sy = (y1 - y0) or 1.0
        X = [(x - x0) / sx for x in xs]
        Y = [((v if math.isfinite(v) else y1) - y0) / sy for v in ly]
        best = -1.0
        for j in range(1, len(X) - 1):
            h1, h2 = X[j] - X[j - 1], X[j + 1] - X[j]
            d1 = (Y[j] - Y[j - 1]) / h1
            d2 = (Y[j + 1] - Y[j]) / h2
            slope = (d1 * h2 + d2 * h1) / (h1 + h2)
            curv = 2.0 * (d2 - d1) / (h1 + h2)
            kappa = abs(curv) / (1.0 + slope * slope) ** 1.5
            if kappa > best:
                best, kink = kappa, xs[j]
    return {"tolerance": tolerance, "dense_ppl": ys[0], "ppl_limit": limit,
            "essential_sparsity": essential, "max_curvature_sparsity": kink}


# ---- sweep -----------------------------------------------------------------------------------------
def sweep_points(points: int = 10, max_sparsity: float = 0.9) -> list[float]:
    """`points` sparsities evenly from 0 to max_sparsity (10 -> 0, 0.1, ..., 0.9)."""
    if points < 2:
        raise RecipeError("a sweep needs at least 2 points")
    check_sparsity(max_sparsity, "max_sparsity")
    return [round(max_sparsity * j / (points - 1), 6) for j in range(points)]


@dataclass
class SweepConfig:
    methods: tuple = ("magnitude", "wanda")
    patterns: tuple = ("unstructured", "2:4")
    points: int = 10
    max_sparsity: float = 0.9
    scope: dict = field(default_factory=dict)  # method -> scope; default DEFAULT_SCOPE
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS  # None: the full evaluation split
    seq_len: int = DEFAULT_SEQ_LEN
    source: str = data.DEFAULT_SOURCE
    tolerance: float = DEFAULT_TOLERANCE
    blocks: tuple = ()  # () = every kept block
    reuse: bool = True  # False: recompute statistics per point (benchmark baseline)

    def __post_init__(self):
        for m in self.methods:
            check_method(m)
        for p in self.patterns:
            if p not in PATTERNS:
                raise RecipeError(f"unknown pattern '{p}' (known: {', '.join(PATTERNS)})")
        if not self.methods:
            raise RecipeError("choose at least one method")
        if not 0 <= self.tolerance < 10:
            raise RecipeError(f"tolerance must be a small non-negative fraction, got {self.tolerance}")


def _check(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("sparsity sweep cancelled")


def sweep(lm: LoadedModel, cfg: SweepConfig | None = None, variant: Variant | None = None, calib_ids=None,
          es: EvalSet | None = None, progress=None, cancel=None) -> dict:
    """Perplexity and KL against sparsity for each method (unstructured curves, N:M marked points).

    Calibration statistics and thresholds are computed once (per method) and reused by every point;
    the original's block inputs on the evaluation subset are traced once. Each point's variant is
    built, measured (zeros actually reached), evaluated and dropped.
    """
    cfg = cfg or SweepConfig()
    variant = variant or original_variant(lm.num_blocks)
    t_start = time.perf_counter()
    say = progress or (lambda f, m: None)
    targets = prunable_linears(lm, variant, cfg.blocks)
    if "wanda" in cfg.methods and calib_ids is None:
        calib_ids = data.calibration_ids(lm.tokenizer, data.Calibration(source=cfg.source)).to(lm.device)
    say(0.0, "tracing the evaluation subset")
    es = es or eval_set(lm, cfg.source, cfg.eval_tokens, cfg.seq_len)
    base = evaluate(lm, variant, es)
    pruner = Pruner(lm, variant, targets, calib_ids, reuse=cfg.reuse)
    xs = sweep_points(cfg.points, cfg.max_sparsity)
    jobs = [(m, "unstructured", x) for m in cfg.methods if "unstructured" in cfg.patterns for x in xs]
    jobs += [(m, p, None) for m in cfg.methods for p in cfg.patterns if p != "unstructured"]
    curves = {m: {"scope": resolve_scope(m, cfg.scope.get(m)), "points": []} for m in cfg.methods}
    nm_points = []
    eval_s = 0.0
    scratch: dict = {}  # one copy of each block, rewritten by every point
    stats_by_method = {}
    for m in cfg.methods:
        if cfg.reuse and "unstructured" in cfg.patterns:
            say(0.02, f"{m}: calibration statistics and orderings (once)")
            before = pruner.stats_seconds
            pruner.prepare(m, curves[m]["scope"], xs)
            stats_by_method[m] = pruner.stats_seconds - before
    for j, (m, p, x) in enumerate(jobs):
        _check(cancel)
        nm = parse_pattern(p)
        s = (nm[1] - nm[0]) / nm[1] if nm else x
        say(0.05 + 0.95 * j / len(jobs), f"{m} {p} {s * 100:.0f}%")
        t0 = time.perf_counter()
        masks = pruner.masks(m, s, p, curves[m]["scope"])
        point_variant, weights = build_pruned(lm, variant, targets, masks, sparse_tag(s, p), scratch=scratch)
        meas = measured_sparsity(targets, weights)
        del masks, weights
        t1 = time.perf_counter()
        res = evaluate(lm, point_variant, es)  # derived from `variant`: runs from its first change on
        eval_s += time.perf_counter() - t1
        t2 = time.perf_counter()
        row = {"target_sparsity": s, "sparsity": meas["overall"], "by_type": meas["by_type"], **res,
               "seconds": t2 - t0, "prune_s": t1 - t0, "eval_s": t2 - t1}
        if nm:
            nm_points.append({"method": m, "pattern": p, **row})
        else:
            curves[m]["points"].append(row)
        del point_variant
    for m, c in curves.items():
        if c["points"]:
            c["knee"] = knee([r["target_sparsity"] for r in c["points"]], [r["ppl"] for r in c["points"]], cfg.tolerance)
    say(1.0, "sweep done")
    return {
        "methods": list(cfg.methods),
        "patterns": list(cfg.patterns),
        "sparsities": xs,
        "tolerance": cfg.tolerance,
        "evaluation": es.describe(),
        "calibration_tokens": int(calib_ids.numel()) if calib_ids is not None else 0,
        "dense": base,
        "curves": curves,
        "nm": nm_points,
        "prunable_weights": sum(t.numel() for t in targets),
        "blocks": sorted({t.block for t in targets}),
        "reuse_statistics": cfg.reuse,
        "timing": {"statistics_s": pruner.stats_seconds, "statistics_by_method_s": stats_by_method, "eval_s": eval_s,
                   "total_s": time.perf_counter() - t_start},
    }


# ---- per-layer sensitivity -------------------------------------------------------------------------
def sensitivity(lm: LoadedModel, method: str = "magnitude", sparsity: float = 0.5, pattern: str = "unstructured",
                variant: Variant | None = None, types=None, blocks=None, calib_ids=None, es: EvalSet | None = None,
                tokens: int = DEFAULT_SENSITIVITY_TOKENS, source: str = data.DEFAULT_SOURCE, progress=None,
                cancel=None) -> dict:
    """KL to the original when one linear (module type t of block i) alone is pruned: a (type x block)
    grid. Magnitude compares within the linear (layer scope), Wanda within its rows. Each cell runs
    only the blocks from i on, from the cached hidden state entering block i."""
    check_method(method)
    sparsity = check_sparsity(sparsity)
    variant = variant or original_variant(lm.num_blocks)
    say = progress or (lambda f, m: None)
    targets = prunable_linears(lm, variant, blocks, types)
    if method == "wanda" and calib_ids is None:
        calib_ids = data.calibration_ids(lm.tokenizer, data.Calibration(source=source)).to(lm.device)
    t0 = time.perf_counter()
    es = es or eval_set(lm, source, tokens, min(DEFAULT_SEQ_LEN, tokens or DEFAULT_SEQ_LEN))
    pruner = Pruner(lm, variant, targets, calib_ids)
    scope = "layer" if method == "magnitude" else "row"
    masks = pruner.masks(method, sparsity, pattern, scope)
    type_names = list(dict.fromkeys(t.name for t in targets))
    block_ids = sorted({t.block for t in targets})
    kl = [[None] * len(block_ids) for _ in type_names]
    ppl = [[None] * len(block_ids) for _ in type_names]
    reached = [[None] * len(block_ids) for _ in type_names]
    for j, (t, keep) in enumerate(zip(targets, masks)):
        _check(cancel)
        say(j / len(targets), f"block {t.block} {t.name}")
        v, w = build_pruned(lm, variant, [t], [keep], sparse_tag(sparsity, pattern))
        r = evaluate(lm, v, es)
        a, b = type_names.index(t.name), block_ids.index(t.block)
        kl[a][b], ppl[a][b] = r["kl"], r["ppl"]
        reached[a][b] = float((w[0] == 0).float().mean())
    say(1.0, "sensitivity done")
    return {"method": method, "sparsity": sparsity, "pattern": pattern, "scope": scope, "types": type_names,
            "blocks": block_ids, "kl": kl, "ppl": ppl, "reached": reached, "dense": evaluate(lm, variant, es),
            "evaluation": es.describe(), "seconds": time.perf_counter() - t0}


def self_check(device: str = "cuda") -> dict:
    """Masks and orderings computed on `device` equal the CPU ones (a quick check for a GPU run)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 9, (64, 96), generator=g).float()  # many ties
    d = s.to(device)
    checks = {
        "layer_mask": torch.equal(layer_mask(s, 0.37), layer_mask(d, 0.37).cpu()),
        "row_mask": torch.equal(row_mask(s, 0.61), row_mask(d, 0.61).cpu()),
        "nm_2_4": torch.equal(nm_mask(s, 2, 4), nm_mask(d, 2, 4).cpu()),
        "nm_4_8": torch.equal(nm_mask(s, 4, 8), nm_mask(d, 4, 8).cpu()),
        "ranks": torch.equal(group_ranks(s)[0], group_ranks(d)[0].cpu()),
        "global": all(torch.equal(a, b.cpu()) for a, b in zip(global_masks([s, s[:7] * 2], 0.5),
                                                              global_masks([d, d[:7] * 2], 0.5))),
    }
    return {"device": str(device), "ok": all(checks.values()), **checks}
