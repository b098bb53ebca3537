"""One-shot weight sparsity as a recipe step (magnitude or Wanda; unstructured, 2:4 or 4:8).

    {"op": "sparsify", "method": "magnitude|wanda", "sparsity": 0.5,
     "pattern": "unstructured|2:4|4:8", "scope": "global|layer|row", "blocks": [...]}

`scope` defaults to `global` for magnitude (Essential Sparsity, arXiv 2306.03805) and `row` for Wanda
(arXiv 2306.11695); `blocks` empty = every kept block. Only block linears are pruned (embeddings, norms
and the LM head never); each touched block becomes a copy with zeros in its weights, so a dense export
stores the zeros. The report carries the sparsity measured after pruning, per linear and overall.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis import sparsity as sp
from ..errors import RecipeError
from ..recipe import OpContext, Step, register
from ..variant import Variant
from .prune import _int_list


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
            sp.check_method(self.method)
            nm = sp.parse_pattern(self.pattern)
            if self.pattern not in sp.PATTERNS:
                raise RecipeError(f"unknown pattern '{self.pattern}' (known: {', '.join(sp.PATTERNS)})")
            object.__setattr__(self, "scope", sp.resolve_scope(self.method, self.scope))
        except RecipeError as e:
            raise RecipeError(f"step '{self.op}': {e}") from None
        object.__setattr__(self, "blocks", _int_list(list(self.blocks), "blocks", self.op))
        if nm is not None:
            implied = (nm[1] - nm[0]) / nm[1]
            if self.sparsity is not None and abs(float(self.sparsity) - implied) > 1e-9:
                raise RecipeError(f"step '{self.op}': pattern {self.pattern} means sparsity {implied}, got {self.sparsity}")
            object.__setattr__(self, "sparsity", implied)
        if self.sparsity is None:
            raise RecipeError(f"step '{self.op}': 'sparsity' is required for unstructured pruning")
        try:
            object.__setattr__(self, "sparsity", sp.check_sparsity(self.sparsity))
        except RecipeError as e:
            raise RecipeError(f"step '{self.op}': {e}") from None

    def apply(self, ctx: OpContext, variant: Variant):
        lm = ctx.lm
        ctx.report(0.0, f"sparsify: {self.method} {self.pattern} {self.sparsity * 100:.0f}%")
        targets = sp.prunable_linears(lm, variant, self.blocks)
        calib = ctx.calib_ids() if self.method == "wanda" else None
        pruner = sp.Pruner(lm, variant, targets, calib)
        masks = pruner.masks(self.method, self.sparsity, self.pattern, self.scope)
        ctx.report(0.6, "sparsify: writing pruned copies")
        new, weights = sp.build_pruned(lm, variant, targets, masks, sp.sparse_tag(self.sparsity, self.pattern))
        meas = sp.measured_sparsity(targets, weights)
        blocks = sorted({t.block for t in targets})
        from ..adapters.experts import MIN_ROUTED_TOKENS

        fallback = pruner.fallback() if self.method == "wanda" else {}
        notes = [f"block {k.split('.')[0]} expert {k.split('.')[2]} {k.split('.')[3]}: {n} routed calibration tokens "
                 f"(< {MIN_ROUTED_TOKENS}): magnitude instead of wanda" for k, n in fallback.items()]
        report = {
            "op": self.op,
            "method": self.method,
            "pattern": self.pattern,
            "scope": self.scope,
            "target_sparsity": self.sparsity,
            "sparsity": meas["overall"],
            "zeros": meas["zeros"],
            "weights": meas["weights"],
            "by_block": meas["by_block"],
            "by_type": meas["by_type"],
            "per_layer": meas["per_layer"],
            "blocks_changed": new.replaced(),
            "notes": notes,
            # picked up by the export's model card
            "card": (f"sparsify ({self.method}, {self.pattern}, {self.scope}): measured sparsity "
                     f"{meas['overall'] * 100:.2f}% of the block linear weights in blocks {blocks} "
                     f"({meas['zeros']} zeros of {meas['weights']}); embeddings, norms and LM head dense."),
        }
        resolved = {"op": self.op, "method": self.method, "sparsity": self.sparsity, "pattern": self.pattern,
                    "scope": self.scope, "blocks": blocks}
        return new, report, resolved
