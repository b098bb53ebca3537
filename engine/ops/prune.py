"""Block pruning: drop whole blocks (the simplest structural compression)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError
from ..recipe import OpContext, Step, register
from ..variant import Variant


def _int_list(value, field_name: str, op: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        raise RecipeError(f"step '{op}': '{field_name}' must be a list of block indices, got {value!r}")
    return tuple(value)


@register
@dataclass(frozen=True)
class PruneBlocks(Step):
    """Drop the listed original blocks."""

    op = "prune_blocks"
    blocks: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "blocks", _int_list(self.blocks, "blocks", self.op))
        if not self.blocks:
            raise RecipeError("step 'prune_blocks': 'blocks' is empty")

    def apply(self, ctx: OpContext, variant: Variant):
        before = len(variant.kept())
        new = variant.with_dropped(self.blocks)
        report = {"op": self.op, "blocks": list(self.blocks), "blocks_before": before, "blocks_after": len(new.kept())}
        return new, report, {"op": self.op, "blocks": sorted(self.blocks)}
