"""The sparsity sweep and its knee, and per-layer sensitivity (analyses; the op is `ops/sparsify.py`).

The sweep measures perplexity, KL and top-1 agreement against sparsity for each method (magnitude,
Wanda; unstructured curves, N:M marked points) and finds the knee: Essential Sparsity's "sharp dropping
point" (Chen et al., arXiv 2306.03805) and the point of maximum curvature. Here the Wanda statistics come
from one pass of the unpruned model over the calibration text and are reused by every sparsity point
(Wanda's own code re-collects them block by block on the partly pruned model; the curve and the applied
step use the same one-pass statistics, so a point of the curve is exactly what applying gives).

The evaluation subset is traced once through the original (`evaluate.reference_cache`: the hidden state
entering each block, the original's log-probabilities) and every point is evaluated from its first
changed block; the calibration statistics and the per-group thresholds for all the sweep's sparsities
are computed once (`ops.sparsify.Pruner`). Masks are the pure functions of `masks.py`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from .. import data
from ..block_stream import check_cancel
from ..evaluate import QuickCache, reference_cache
from ..loading import LoadedModel
from ..masks import (  # noqa: F401  (callers read the method and pattern names here)
    DEFAULT_SCOPE,
    METHODS,
    PATTERNS,
    check_method,
    check_sparsity,
    parse_pattern,
    resolve_scope,
)
from ..errors import RecipeError
from ..ops.sparsify import (  # noqa: F401  (the sweep builds its points with the op's own machinery)
    Pruner,
    build_pruned,
    measured_sparsity,
    prunable_linears,
    sparse_tag,
)
from ..variant import Variant, original_variant

log = logging.getLogger(__name__)

DEFAULT_EVAL_TOKENS = 2048
DEFAULT_SEQ_LEN = 256
DEFAULT_SENSITIVITY_TOKENS = 256
DEFAULT_TOLERANCE = 0.01


# ---- evaluation subset -----------------------------------------------------------------------------
@dataclass
class EvalSet:
    """A stated evaluation subset, traced once through the original model: the engine's one traced
    evaluator (`evaluate.QuickCache`: block inputs, the original's log-probabilities) on these tokens."""

    reference: QuickCache
    source: str
    seq_len: int

    @property
    def ids(self) -> torch.Tensor:
        return self.reference.ids  # (B, T)

    @property
    def ref_nll(self) -> float:
        return self.reference.ref_nll

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
    return EvalSet(reference_cache(lm, ids), source, seq_len)


@torch.no_grad()
def evaluate(lm: LoadedModel, variant: Variant, es: EvalSet, start: int | None = None) -> dict:
    """Perplexity, KL(original || variant) and top-1 agreement on the subset, from block `start` on."""
    return es.reference.evaluate(lm, variant, start)


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
    check_cancel(cancel, "sparsity sweep cancelled")


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
        calib_ids = data.calibration_ids_on(lm, data.Calibration(source=cfg.source))
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
        calib_ids = data.calibration_ids_on(lm, data.Calibration(source=source))
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
