"""Per-block importance. (A first metric; Macro Influence and its peers extend this module.)

- Block Influence (ShortGPT, arXiv 2403.03853): BI_i = 1 - mean over tokens of cos(block input, block
  output), one forward pass. Higher = the block changes the hidden state more = more important.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hooks import run_block, trace_blocks
from ..loading import LoadedModel
from ..workspace import Variant, block_modules

METRICS = {"bi": "Block influence (ShortGPT): 1 - cos(block input, block output)"}


@torch.no_grad()
def variant_block_io(lm: LoadedModel, variant: Variant, ids: torch.Tensor):
    """Yield (original index, input, output) of each block the variant keeps, on token ids `ids`."""
    trace = trace_blocks(lm.model, lm.adapter, ids)
    h = trace.inputs[0]
    for i, module in block_modules(lm.model, lm.adapter, variant):
        out = run_block(module, h, trace.calls[i])
        yield i, h, out
        h = out


def block_influence(lm: LoadedModel, variant: Variant, ids: torch.Tensor) -> list[float | None]:
    """ShortGPT BI per original block (None where the variant dropped the block)."""
    values: list[float | None] = [None] * variant.num_blocks
    for i, x, y in variant_block_io(lm, variant, ids):
        values[i] = float(1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1).mean())
    return values


def block_scores(lm: LoadedModel, variant: Variant, ids: torch.Tensor, metric: str = "bi", progress=None, cancel=None) -> dict:
    """{"metric", "values" (per original block, None if dropped), "higher_is_more_important"}."""
    if metric != "bi":
        from ..errors import WorkbenchError

        raise WorkbenchError(f"unknown metric '{metric}' (known: {', '.join(METRICS)})")
    return {"metric": metric, "values": block_influence(lm, variant, ids), "higher_is_more_important": True}
