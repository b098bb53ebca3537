"""Block pruning: drop whole blocks (the simplest structural compression)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import fields
from ..errors import RecipeError
from ..recipe import OpContext, Step, register
from ..variant import Variant


@register
@dataclass(frozen=True)
class PruneBlocks(Step):
    """Drop the listed original blocks."""

    op = "prune_blocks"
    blocks: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "blocks", fields.block_list(self.blocks, "blocks", self.op))
        if not self.blocks:
            raise RecipeError("step 'prune_blocks': 'blocks' is empty")

    def apply(self, ctx: OpContext, variant: Variant):
        return prune_blocks(ctx, variant, self)


def prune_blocks(ctx: OpContext, variant: Variant, step: PruneBlocks):
    """Drop `step.blocks` from `variant` (never modified). -> (new variant, report, resolved step)."""
    before = len(variant.kept())
    new = variant.with_dropped(step.blocks)
    report = {"op": step.op, "blocks": list(step.blocks), "blocks_before": before, "blocks_after": len(new.kept())}
    return new, report, {"op": step.op, "blocks": sorted(step.blocks)}
