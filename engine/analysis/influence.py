"""Per-block importance of a model or a variant, and removal plans built from it.

Metrics (higher = more important, for every one of them):
- mi: Macro Influence (FuseGPT, arXiv 2411.14507): MI_i = 1 - mean over calibration tokens of
  cos(h_L, h_L without block i), h_L = output of the last block (before the final norm). Exact.
- bi: Block Influence (ShortGPT, arXiv 2403.03853): BI_i = 1 - mean cos(block input, block output).
- angular: angular distance (Gromov et al., arXiv 2403.17887) of one block, arccos(cos(h_i, h_i+1))/pi;
  `angular_distances` gives d(l, n) for every run of n contiguous blocks and the best run per n.
- ppl: perplexity drop (SLEB-like, arXiv 2402.09025): the calibration NLL (nats/token) with block i
  skipped minus the NLL with it, i.e. log(ppl without i / ppl).

Speed. Every scan starts from one traced pass of the variant, which records the hidden state entering
each kept block. "Without block p" then needs only the blocks after p, run from the recorded input of p:
P(P-1)/2 block passes for all p instead of the naive P(P-1). The skipped-block variants are advanced
together, stacked along the batch dimension (a group of them per block call, as many as memory allows),
and the LM head runs only for `ppl`. Math lives in `influence_math.py`; this module owns models,
traces, devices, progress and cancellation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BlockIndexError, Cancelled, UnsupportedArchitecture, WorkbenchError
from ..block_stream import BlockCall, map_call, run_block, trace_blocks
from ..loading import LoadedModel
from ..plan import SCAN_TOKENS_PER_CALL
from ..variant import Variant, block_modules, view_model
from . import influence_math as im

log = logging.getLogger(__name__)

# Every metric here scores a block so that higher = more important (the removal order takes the lowest).
METRICS = {
    "mi": "Macro Influence (FuseGPT): 1 - cos(last hidden state, same without the block); iterative plan",
    "bi": "Block influence (ShortGPT): 1 - cos(block input, block output)",
    "angular": "Angular distance (Gromov et al.): arccos(cos(block input, block output)) / pi",
    "ppl": "Perplexity drop (SLEB-like): calibration NLL without the block minus with it (nats); greedy plan",
}
ITERATIVE = {"mi", "ppl"}  # metrics whose removal plan is recomputed after every removal

# Calibration for a scan when nothing else is asked: small enough that one exact MI scan of the default
# model (30 blocks, 465 block passes) takes well under a minute on a 2-core CPU.
SCAN_SAMPLES = 4
SCAN_SEQ_LEN = 64
CPU_TOKENS_PER_CALL = SCAN_TOKENS_PER_CALL  # tokens per stacked block call on CPU (see plan.py)


# ---- the traced variant -------------------------------------------------------------------------
@dataclass
class VariantStates:
    """The hidden state entering each kept block of a variant, and what the model passed each block.

    blocks: original indices of the kept blocks, in order; inputs[p]: (B, T, d) entering blocks[p];
    output: (B, T, d) after the last kept block (before the final norm). `passes` counts block calls
    (one per block per batch of samples) spent on it so far."""

    ids: torch.Tensor
    blocks: list[int]
    modules: list[nn.Module]
    calls: list[BlockCall]
    inputs: list[torch.Tensor]
    output: torch.Tensor
    passes: int = 0
    extra: dict = field(default_factory=dict)

    def hidden(self) -> list[torch.Tensor]:
        """h_0 .. h_P: the state entering each kept block, then the output."""
        return [*self.inputs, self.output]

    def without(self, pos: int, cancel=None) -> "VariantStates":
        """The states of the same variant with kept position `pos` removed: the blocks after it are
        re-run from the input of the removed block; everything before it is reused."""
        keep = [p for p in range(len(self.blocks)) if p != pos]
        st = VariantStates(
            ids=self.ids,
            blocks=[self.blocks[p] for p in keep],
            modules=[self.modules[p] for p in keep],
            calls=[self.calls[p] for p in keep],
            inputs=[self.inputs[p] for p in keep],
            output=self.output,
            passes=self.passes,
        )
        h = self.inputs[pos]
        for q in range(pos, len(st.blocks)):
            _check(cancel)
            st.inputs[q] = h
            h = run_block(st.modules[q], h, st.calls[q])
            st.passes += 1
        st.output = h
        return st


@torch.no_grad()
def variant_states(lm: LoadedModel, variant: Variant, ids: torch.Tensor) -> VariantStates:
    """One pass of the variant (kept blocks only, replacements used, no LM head), recorded."""
    ids = ids.to(lm.device)
    vmodel = view_model(lm.model, lm.adapter, variant)
    trace = trace_blocks(vmodel, lm.adapter, ids)
    modules = list(lm.adapter.blocks(vmodel))
    blocks = variant.kept()
    assert len(modules) == len(blocks) == len(trace.inputs)
    return VariantStates(ids, blocks, modules, list(trace.calls), list(trace.inputs), trace.output, passes=len(blocks))


@torch.no_grad()
def variant_block_io(lm: LoadedModel, variant: Variant, ids: torch.Tensor):
    """Yield (original index, input, output) of each block the variant keeps, on token ids `ids`."""
    trace = trace_blocks(lm.model, lm.adapter, ids)
    h = trace.inputs[0]
    for i, module in block_modules(lm.model, lm.adapter, variant):
        out = run_block(module, h, trace.calls[i])
        yield i, h, out
        h = out


# ---- the skipped-block scan ---------------------------------------------------------------------
def _check(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("influence scan cancelled")


def _tile_call(call: BlockCall, reps: int, batch: int) -> BlockCall:
    """Call arguments for `reps` copies of the batch stacked along dim 0. Per-sample tensors (dim 0 ==
    batch > 1, at least 2-D) are repeated; batch-1 tensors broadcast and are left alone."""
    if reps == 1 or batch == 1:
        return call

    per_sample = lambda v: v.dim() >= 2 and v.shape[0] == batch  # noqa: E731
    return map_call(call, lambda v: v.repeat(reps, *([1] * (v.dim() - 1))) if per_sample(v) else v)


def default_max_rows(lm: LoadedModel, st: VariantStates) -> int:
    """Samples per stacked block call: a token budget on CPU, a share of free memory on a GPU."""
    b, t, d = st.inputs[0].shape
    if lm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.device)
        cfg = lm.model.config
        ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * d
        heads = lm.adapter.num_heads(lm.model)
        per_token = st.inputs[0].element_size() * (12 * d + 4 * ffn + 2 * heads * t)
        rows = int(free * 0.3 // max(1, per_token * t))
    else:
        rows = CPU_TOKENS_PER_CALL // t
    return max(b, rows)


@torch.no_grad()
def skip_scan(st: VariantStates, finish, max_rows: int | None = None, progress=None, cancel=None) -> None:
    """For every kept position p, compute the last hidden state of the variant without block p and
    call `finish(p, h)` with it (h: (B, T, d)). Exactly P(P-1)/2 block passes.

    Groups of g consecutive skip positions advance together: at block q the states of the group's
    variants that skipped an earlier block are stacked into one (n*B, T, d) batch and run once; then
    the variant skipping q joins with the recorded input of q (it will go straight to q+1)."""
    p_total = len(st.blocks)
    x0 = st.inputs[0]
    b = x0.shape[0]
    rows = max_rows or CPU_TOKENS_PER_CALL // x0.shape[1]
    g = max(1, rows // b)
    total = p_total * (p_total - 1) // 2
    done = 0
    for a in range(0, p_total, g):
        end = min(p_total, a + g)
        stack = torch.empty((end - a, *x0.shape), dtype=x0.dtype, device=x0.device)  # (g, B, T, d)
        n = 0
        for q in range(a, p_total):
            _check(cancel)
            if n:
                flat = stack[:n].view(n * b, *x0.shape[1:])  # (n*B, T, d)
                out = run_block(st.modules[q], flat, _tile_call(st.calls[q], n, b))
                stack[:n] = out.reshape(n, *x0.shape)
                st.passes += n
                done += n
                if progress is not None:
                    progress(done / max(total, 1), f"block {st.blocks[q]}: {done}/{total} block passes")
            if q < end:
                stack[q - a] = st.inputs[q]
                n += 1
        for j in range(end - a):
            finish(a + j, stack[j])
        del stack


def _logits_nll(lm: LoadedModel, h: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of hidden states h (B, T, d) after final norm + LM head, a few rows at a time
    so that the (rows, T, V) logits stay small."""
    head = lm.adapter.lm_head(lm.model)
    if head is None:
        raise UnsupportedArchitecture(f"{lm.adapter.family} has no language-model head: 'ppl' needs one")
    vocab = head.weight.shape[0]
    rows = max(1, (64 * 2**20) // max(1, h.shape[1] * vocab * 4))
    per_sample = []
    for r0 in range(0, h.shape[0], rows):
        logits = lm.adapter.head(lm.model, h[r0 : r0 + rows])
        per_sample.append(im.mean_nll(logits, ids[r0 : r0 + rows]))
    return float(torch.cat(per_sample).mean())


def _scan_values(lm, st: VariantStates, metrics: set[str], max_rows, progress, cancel) -> dict[str, list[float]]:
    """MI and/or NLL-without of every kept position, from one skipped-block scan."""
    out = {m: [0.0] * len(st.blocks) for m in metrics}

    def finish(p, h):
        if "mi" in metrics:
            out["mi"][p] = im.macro_influence(st.output, h)
        if "ppl" in metrics:
            out["ppl"][p] = _logits_nll(lm, h, st.ids)

    skip_scan(st, finish, max_rows or default_max_rows(lm, st), progress, cancel)
    return out


def _per_block(variant_blocks: int, kept: list[int], values: list[float]) -> list[float | None]:
    full: list[float | None] = [None] * variant_blocks
    for i, v in zip(kept, values):
        full[i] = v
    return full


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise WorkbenchError(f"unknown metric '{metric}' (known: {', '.join(METRICS)})")


# ---- public drivers -----------------------------------------------------------------------------
@torch.no_grad()
def block_scores(
    lm: LoadedModel,
    variant: Variant,
    ids: torch.Tensor,
    metric: str = "bi",
    progress=None,
    cancel=None,
    max_rows: int | None = None,
    last_token: bool = False,
) -> dict:
    """Importance of every block the variant keeps, by `metric` (see METRICS; higher = more important).

    -> {"metric", "values" (per ORIGINAL block, None if dropped), "unit",
        "blocks" (kept original indices), "block_passes", "seconds", ...metric extras}."""
    _check_metric(metric)
    t0 = time.perf_counter()
    _check(cancel)
    if progress is not None:
        progress(0.0, f"{metric}: tracing the variant")
    st = variant_states(lm, variant, ids)
    _check(cancel)
    h = st.hidden()
    res: dict = {"metric": metric, "blocks": list(st.blocks)}
    if metric == "bi":
        vals = [im.block_influence(h[p], h[p + 1]) for p in range(len(st.blocks))]
        res["unit"] = "1 - cosine"
    elif metric == "angular":
        vals = [im.angular(h[p], h[p + 1], last_token) for p in range(len(st.blocks))]
        res["unit"] = "angle / pi"
        res["last_token"] = last_token
    elif metric == "mi":
        vals = _scan_values(lm, st, {"mi"}, max_rows, progress, cancel)["mi"]
        res["unit"] = "1 - cosine"
    else:  # ppl
        base = _logits_nll(lm, st.output, st.ids)
        nll = _scan_values(lm, st, {"ppl"}, max_rows, progress, cancel)["ppl"]
        vals = [v - base for v in nll]
        res["unit"] = "nats per token"
        res["ppl_base"] = math.exp(base)
        res["ppl_without"] = _per_block(variant.num_blocks, st.blocks, [math.exp(v) for v in nll])
    res["values"] = _per_block(variant.num_blocks, st.blocks, vals)
    res["block_passes"] = st.passes
    res["tokens"] = int(st.ids.numel())
    res["seconds"] = time.perf_counter() - t0
    if progress is not None:
        progress(1.0, f"{metric}: done")
    return res


@torch.no_grad()
def removal_plan(
    lm: LoadedModel,
    variant: Variant,
    ids: torch.Tensor,
    metric: str,
    k: int,
    progress=None,
    cancel=None,
    max_rows: int | None = None,
) -> dict:
    """The k blocks to remove, in order, by `metric`.

    mi and ppl are iterative (FuseGPT's `--iterative`, SLEB's greedy loop): remove the least important
    block, re-score the reduced model, repeat. bi and angular rank once (ShortGPT, and the per-block
    angular distance). -> {"metric", "k", "iterative", "order" (original indices, removal order),
    "scores" (the removed block's score when it was chosen), "steps" (per step: all values then),
    "block_passes", "seconds", ...}; with mi also "mi_to_start" (1 - cos of h_L against the starting
    variant after each removal), with ppl "ppl_after" (calibration perplexity after each removal)."""
    _check_metric(metric)
    kept = variant.kept()
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < len(kept):
        raise BlockIndexError(f"k must be between 1 and {len(kept) - 1} (the variant keeps {len(kept)} blocks), got {k!r}")
    t0 = time.perf_counter()
    if metric not in ITERATIVE:
        res = block_scores(lm, variant, ids, metric, progress, cancel, max_rows)
        order = im.lowest(res["values"], k)
        out = {"metric": metric, "k": k, "iterative": False, "order": order, "unit": res["unit"],
               "scores": [res["values"][i] for i in order], "steps": [res["values"]],
               "block_passes": res["block_passes"], "seconds": time.perf_counter() - t0}
        if metric == "angular":
            runs = angular_distances(lm, variant, ids)
            out["best_run"] = runs["best"][k - 1]
        return out

    st = variant_states(lm, variant, ids)
    start_h = st.output
    order, scores, steps, after = [], [], [], []
    for step in range(k):
        def sub(frac, msg, step=step):
            if progress is not None:
                progress((step + frac) / k, f"step {step + 1}/{k}: {msg}")

        sub(0.0, "scoring the remaining blocks")
        if metric == "mi":
            vals = _scan_values(lm, st, {"mi"}, max_rows, sub, cancel)["mi"]
        else:
            base = _logits_nll(lm, st.output, st.ids)
            nll = _scan_values(lm, st, {"ppl"}, max_rows, sub, cancel)["ppl"]
            vals = [v - base for v in nll]
        pos = im.lowest(vals, 1)[0]
        order.append(st.blocks[pos])
        scores.append(vals[pos])
        steps.append(_per_block(variant.num_blocks, st.blocks, vals))
        if metric == "ppl":
            after.append(math.exp(nll[pos]))
        st = st.without(pos, cancel)
        if metric == "mi":
            after.append(im.macro_influence(start_h, st.output))
    if progress is not None:
        progress(1.0, f"plan: remove {order}")
    out = {"metric": metric, "k": k, "iterative": True, "order": order, "scores": scores, "steps": steps,
           "unit": "1 - cosine" if metric == "mi" else "nats per token",
           "block_passes": st.passes, "tokens": int(st.ids.numel()), "seconds": time.perf_counter() - t0}
    out["mi_to_start" if metric == "mi" else "ppl_after"] = after
    return out


@torch.no_grad()
def angular_distances(lm: LoadedModel, variant: Variant, ids: torch.Tensor, last_token: bool = False,
                      progress=None, cancel=None) -> dict:
    """Gromov et al.'s d(l, n) = arccos(cos(h_l, h_l+n)) / pi for every run of n contiguous kept blocks.

    -> {"blocks": kept original indices, "matrix": rows n = 1..P of P values by start position (None
    where the run would pass the end), "best": per n {"n", "start", "blocks", "distance"} (the run whose
    removal changes the hidden state least), "last_token", "block_passes"}. One traced pass."""
    _check(cancel)
    st = variant_states(lm, variant, ids)
    _check(cancel)
    matrix = im.angular_matrix(st.hidden(), last_token)
    best = im.best_runs(matrix)
    for b in best:
        b["blocks"] = st.blocks[b["start"] : b["start"] + b["n"]]
    if progress is not None:
        progress(1.0, "angular distances: done")
    return {"blocks": list(st.blocks), "matrix": matrix, "best": best, "last_token": last_token,
            "block_passes": st.passes, "tokens": int(st.ids.numel())}


@torch.no_grad()
def all_scores(lm: LoadedModel, variant: Variant, ids: torch.Tensor, progress=None, cancel=None,
               max_rows: int | None = None) -> dict:
    """Every metric at once from one trace and one skipped-block scan (MI and ppl share it).

    -> {metric: the block_scores result for that metric}."""
    t0 = time.perf_counter()
    st = variant_states(lm, variant, ids)
    h = st.hidden()
    n = variant.num_blocks
    base = _logits_nll(lm, st.output, st.ids) if lm.adapter.lm_head(lm.model) is not None else None
    wanted = {"mi"} | ({"ppl"} if base is not None else set())
    scan = _scan_values(lm, st, wanted, max_rows, progress, cancel)
    common = {"blocks": list(st.blocks), "block_passes": st.passes,
              "tokens": int(st.ids.numel())}
    out = {
        "mi": {"metric": "mi", "values": _per_block(n, st.blocks, scan["mi"]), "unit": "1 - cosine", **common},
        "bi": {"metric": "bi", "unit": "1 - cosine", **common,
               "values": _per_block(n, st.blocks, [im.block_influence(h[p], h[p + 1]) for p in range(len(st.blocks))])},
        "angular": {"metric": "angular", "unit": "angle / pi", "last_token": False, **common,
                    "values": _per_block(n, st.blocks, [im.angular(h[p], h[p + 1]) for p in range(len(st.blocks))])},
    }
    if base is not None:
        out["ppl"] = {"metric": "ppl", "unit": "nats per token", **common, "ppl_base": math.exp(base),
                      "values": _per_block(n, st.blocks, [v - base for v in scan["ppl"]]),
                      "ppl_without": _per_block(n, st.blocks, [math.exp(v) for v in scan["ppl"]])}
    for r in out.values():
        r["seconds"] = time.perf_counter() - t0
    return out
