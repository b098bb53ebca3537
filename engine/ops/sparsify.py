"""One-shot weight sparsity as a recipe step (magnitude or Wanda; unstructured, 2:4 or 4:8).

    {"op": "sparsify", "method": "magnitude|wanda", "sparsity": 0.5,
     "pattern": "unstructured|2:4|4:8", "scope": "global|layer|row", "blocks": [...]}

`scope` defaults to `global` for magnitude (Essential Sparsity, arXiv 2306.03805) and `row` for Wanda
(arXiv 2306.11695); `blocks` empty = every kept block. Only block linears are pruned (embeddings, norms
and the LM head never); each touched block becomes a copy with zeros in its weights, so a dense export
stores the zeros. The report carries the sparsity measured after pruning, per linear and overall.

The machinery lives here: the targets (every block linear, and each expert's slice of an MoE block),
Wanda's input norms from one pass of the unpruned variant over the calibration text (owned hooks of
the block stream), the `Pruner` (scores and stable orderings once, a mask per sparsity), the pruned
copies and the sparsity measured after pruning. The masks themselves are pure functions in `masks.py`;
the sparsity sweep (`analysis/sparsity.py`) builds its points with the same machinery, so a point of
its curve is exactly what applying this step gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import fields
from .. import masks as M
from ..adapters import linear_weight
from ..block_stream import SquaredNorms, owned_hooks, run_stack
from ..errors import RecipeError
from ..loading import LoadedModel
from ..plan import linear_value
from ..recipe import OpContext, Step, register
from ..spill import keep_like_original
from ..variant import Variant, copy_block, current_block, view_model


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
            return M.magnitude_scores(w)
        norms = self.norms()
        if target.key in self.fallback():
            return M.magnitude_scores(w)
        return M.wanda_scores(w, norms[target.key])

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
                r, srt = M.group_ranks(sc.reshape(1, -1) if group == "layer" else sc, keep_sorted=scope == "global")
                ranks.append(r.view_as(sc))
                ordered.append(srt)
            self._ranks[(method, group)] = ranks
            self._sorted = ordered if scope == "global" else None
        if scope == "global":
            todo = sorted({M.sparsity_key(s) for s in sparsities} - {s for (m, s) in self._thresholds if m == method})
            if todo:
                if self._sorted is None:  # layer ranks came from an earlier layer-scope call
                    self._sorted = [self.scores(method, t).reshape(-1).sort().values for t in self.targets]
                total = sum(t.numel() for t in self.targets)
                ks = [M.prune_count(s, total) for s in todo]
                for s, k, th in zip(todo, ks, M.sorted_kth(self._sorted, ks)):
                    self._thresholds[(method, s)] = M.split_global(self._sorted, k, th)
                self._sorted = None
        self.stats_seconds += time.perf_counter() - t0

    def masks(self, method: str, sparsity: float, pattern: str = "unstructured", scope: str | None = None) -> list[torch.Tensor]:
        """Keep-mask per target (same order), for one point."""
        scope = M.resolve_scope(method, scope)
        nm = M.parse_pattern(pattern)
        if not self.reuse:
            self.forget()
        if nm is not None:
            return [M.nm_mask(self.scores(method, t), *nm) for t in self.targets]
        self.prepare(method, scope, [sparsity])
        if scope == "global":  # the global stable order restricted to one linear is its layer order
            per_layer = self._thresholds[(method, M.sparsity_key(sparsity))]
            return [rank >= k for rank, k in zip(self._ranks[(method, "layer")], per_layer)]
        out = []
        for rank in self._ranks[(method, scope)]:
            n = rank.numel() if scope == "layer" else rank.shape[1]
            out.append(rank >= M.prune_count(sparsity, n))
        return out


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


# ---- the step -------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class Sparsify(Step):
    """Zero the lowest-scoring weights of the block linears."""

    op = "sparsify"
    method: str = "magnitude"
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str | None = None
    blocks: tuple = ()

    def __post_init__(self):
        try:
            M.check_method(self.method)
            nm = M.parse_pattern(self.pattern)
            if self.pattern not in M.PATTERNS:
                raise RecipeError(f"unknown pattern '{self.pattern}' (known: {', '.join(M.PATTERNS)})")
            object.__setattr__(self, "scope", M.resolve_scope(self.method, self.scope))
        except RecipeError as e:
            raise RecipeError(f"step '{self.op}': {e}") from None
        object.__setattr__(self, "blocks", fields.block_list(list(self.blocks), "blocks", self.op))
        if nm is not None:
            implied = (nm[1] - nm[0]) / nm[1]
            if self.sparsity is not None and abs(float(self.sparsity) - implied) > 1e-9:
                raise RecipeError(f"step '{self.op}': pattern {self.pattern} means sparsity {implied}, got {self.sparsity}")
            object.__setattr__(self, "sparsity", implied)
        if self.sparsity is None:
            raise RecipeError(f"step '{self.op}': 'sparsity' is required for unstructured pruning")
        try:
            object.__setattr__(self, "sparsity", M.check_sparsity(self.sparsity))
        except RecipeError as e:
            raise RecipeError(f"step '{self.op}': {e}") from None

    def apply(self, ctx: OpContext, variant: Variant):
        return sparsify(ctx, variant, self)


def sparsify(ctx: OpContext, variant: Variant, step: Sparsify):
    """Apply one `Sparsify` step to `variant`: scores, masks, pruned copies, the sparsity measured.
    -> (new variant, report, resolved step)."""
    lm = ctx.lm
    ctx.progress_to(0.0, f"sparsify: {step.method} {step.pattern} {step.sparsity * 100:.0f}%")
    targets = prunable_linears(lm, variant, step.blocks)
    calib = ctx.calib_ids() if step.method == "wanda" else None
    pruner = Pruner(lm, variant, targets, calib)
    masks = pruner.masks(step.method, step.sparsity, step.pattern, step.scope)
    ctx.progress_to(0.6, "sparsify: writing pruned copies")
    new, weights = build_pruned(lm, variant, targets, masks, sparse_tag(step.sparsity, step.pattern))
    meas = measured_sparsity(targets, weights)
    del weights  # views of the copies' tensors, which may now move to disk:
    for i, m in new.overrides.items():  # offloaded plan: the new blocks on disk like the original's
        if isinstance(m, nn.Module) and m is not variant.overrides.get(i):
            keep_like_original(lm, m)
    blocks = sorted({t.block for t in targets})
    from ..adapters.experts import MIN_ROUTED_TOKENS

    fallback = pruner.fallback() if step.method == "wanda" else {}
    notes = [f"block {k.split('.')[0]} expert {k.split('.')[2]} {k.split('.')[3]}: {n} routed calibration tokens "
             f"(< {MIN_ROUTED_TOKENS}): magnitude instead of wanda" for k, n in fallback.items()]
    report = {
        "op": step.op,
        "method": step.method,
        "pattern": step.pattern,
        "scope": step.scope,
        "target_sparsity": step.sparsity,
        "sparsity": meas["overall"],
        "zeros": meas["zeros"],
        "weights": meas["weights"],
        "by_block": meas["by_block"],
        "by_type": meas["by_type"],
        "per_layer": meas["per_layer"],
        "blocks_changed": new.replaced(),
        "notes": notes,
        # picked up by the export's model card
        "card": (f"sparsify ({step.method}, {step.pattern}, {step.scope}): measured sparsity "
                 f"{meas['overall'] * 100:.2f}% of the block linear weights in blocks {blocks} "
                 f"({meas['zeros']} zeros of {meas['weights']}); embeddings, norms and LM head dense."),
    }
    resolved = {"op": step.op, "method": step.method, "sparsity": step.sparsity, "pattern": step.pattern,
                "scope": step.scope, "blocks": blocks}
    return new, report, resolved
