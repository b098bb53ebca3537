"""The `quantize` step: RTN or GPTQ weight quantization of the linears inside chosen blocks.

    {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 64, "sym": false,
     "act_order": "weight", "blocks": [0, 1, 2], "observer": "minmax"}

`act_order` defaults to "auto": "weight" for GPTQ (better here, see README), null for RTN.
`observer` (optional, default "minmax", so recipes written without it replay unchanged): "mse" searches
each group's range (see `gptq.grid_params`) for RTN and GPTQ alike. `true_sequential` (optional, default
false): see `quantize_block`. `hessian_shrink` (optional, default 0: GPTQ as published) shrinks each
Hessian toward its diagonal before the solve (see `gptq.prepare_hessian`); 0.4 measured best here on a
validation set drawn from the calibration split, and the app's quantize mode proposes it.
`gguf` (optional, default null): one of Q4_0, Q5_0, Q8_0, Q4_1, Q5_1 solves for that GGUF block format
exactly (group 32, float16 scales, GGUF's decode; see `gptq`): it sets bits, group_size and sym, and a
GGUF export then writes the variant's own codes, bit for bit.

Sequential calibration (the order of IST-DASLab/gptq, arXiv 2210.17323): the calibration ids are traced
once; the hidden state is carried through the variant's blocks in order; each chosen block is copied,
the Hessians H = X X^T / N of its linears are collected in one pass (linears reading the same tensor,
q/k/v and gate/up, share one Hessian), every linear is solved, and the quantized block is re-run so its
output feeds the next block. The solver lives in `gptq.py`, the carrier (`Stream`) and the Hessian
hooks (`HessianStats`) in `block_stream.py`; this module owns devices and swaps.

A quantized block is a replacement module holding the dequantized weights (so every comparison runs at
once, on any device). Each quantized linear carries `workbench_quant` (integer codes, scales, zero
points, g_idx, scheme) for the compressed export; the block carries `workbench_nbytes`, its packed size,
which `evaluate.size_of` reports. Several steps combine (mixed precision); a block quantized again is
re-solved from the module it was quantized from, not from its dequantized weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import linear_weight, set_linear_weight
from .. import fields
from ..errors import RecipeError
from ..block_stream import BlockCall, HessianStats, Stream, owned_hooks, run_chunked, trace_blocks
from ..recipe import OpContext, Step, register
from ..spill import keep_like_original
from ..variant import DROP, Variant, copy_block
from . import gptq as solver

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")
CALIB_BATCH = 8  # calibration samples per forward: bounds activation memory on long calibrations


@dataclass
class QuantRecord:
    """What the compressed export needs of one quantized linear (natural column order)."""

    codes: torch.Tensor  # (out, in) uint8 in [0, 2^bits - 1]
    scale: torch.Tensor  # (out, groups) float32
    zero: torch.Tensor  # (out, groups) int16 in [0, 2^bits - 1]
    g_idx: torch.Tensor  # (in,) int32
    bits: int
    group_size: int
    sym: bool
    act_order: str | None
    method: str
    gguf: str | None = None  # the GGUF block format the codes were solved for (Q4_0, ...)

    def scheme(self) -> solver.Scheme:
        return solver.Scheme(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order,
                             gguf=self.gguf)


def _tag(bits: int, group_size: int, gguf: str | None = None) -> str:
    if gguf:
        return f"quantized {gguf} (GGUF)"
    return f"quantized {bits}-bit " + ("per-channel" if group_size == -1 else f"g{group_size}")


@register
@dataclass(frozen=True)
class Quantize(Step):
    """Quantize the weights of every linear in `blocks` (original indices; empty: every kept block)."""

    op = "quantize"
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = False
    act_order: str | None = "auto"  # auto: "weight" for gptq (measured better here), none for rtn
    blocks: tuple = ()
    damp: float = 0.01
    observer: str = "minmax"  # "mse": each group's range is searched (shrunk) to fit its weights best
    true_sequential: bool = False  # re-collect each later stage's Hessian after the earlier stages are quantized
    hessian_shrink: float = 0.0  # GPTQ: H <- (1 - a) H + a diag(H) before the solve (see gptq.prepare_hessian)
    # RTN needs no data: only its error report (tr(dW H dW^T) per linear) needs the calibration pass,
    # so it runs only when asked. GPTQ always has it (its solve needs the Hessians anyway).
    error_report: bool = False
    gguf: str | None = None  # a GGUF-exact scheme (Q4_0, Q5_0, Q8_0, Q4_1, Q5_1): sets bits, group_size, sym

    def __post_init__(self):
        if self.act_order == "auto":
            object.__setattr__(self, "act_order", "weight" if self.method == "gptq" else None)
        if self.gguf is not None:
            if self.gguf not in solver.GGUF_SCHEMES:
                raise RecipeError(f"step 'quantize': 'gguf' must be one of {', '.join(solver.GGUF_SCHEMES)} or "
                                  f"null, got {self.gguf!r}")
            if self.act_order == "group":
                raise RecipeError(f"step 'quantize': gguf {self.gguf} has no g_idx; 'act_order' must be null or weight")
            bits, sym, _ = solver.GGUF_SCHEMES[self.gguf]
            object.__setattr__(self, "bits", bits)
            object.__setattr__(self, "sym", sym)
            object.__setattr__(self, "group_size", solver.GGUF_GROUP)
        if self.method not in METHODS:
            raise RecipeError(f"step 'quantize': 'method' must be one of {METHODS}, got {self.method!r}")
        if (self.bits not in (2, 3, 4, 8) and self.gguf is None) or isinstance(self.bits, bool):
            raise RecipeError(f"step 'quantize': 'bits' must be 2, 3, 4 or 8, got {self.bits!r}")
        if self.group_size not in (-1, 32, 64, 128) or isinstance(self.group_size, bool):
            raise RecipeError(f"step 'quantize': 'group_size' must be -1, 32, 64 or 128, got {self.group_size!r}")
        fields.boolean(self.sym, "sym", self.op)
        if self.act_order not in solver.ACT_ORDERS:
            raise RecipeError(
                f"step 'quantize': 'act_order' must be one of static, weight, group, null or auto, got {self.act_order!r}"
            )
        if self.method == "rtn" and self.act_order is not None:
            raise RecipeError("step 'quantize': 'act_order' applies to method 'gptq' only (RTN has no column order)")
        fields.number(self.hessian_shrink, "hessian_shrink", self.op, 0, 1)
        fields.boolean(self.true_sequential, "true_sequential", self.op)
        fields.boolean(self.error_report, "error_report", self.op)
        if self.observer not in solver.OBSERVERS:
            raise RecipeError(f"step 'quantize': 'observer' must be one of {', '.join(solver.OBSERVERS)}, got {self.observer!r}")
        fields.number(self.damp, "damp", self.op, 0, 1, high_open=True)
        object.__setattr__(self, "blocks", fields.block_list(self.blocks, "blocks", self.op))

    def scheme(self) -> solver.Scheme:
        return solver.Scheme(bits=self.bits, group_size=self.group_size, sym=self.sym,
                             act_order=self.act_order, damp=float(self.damp), observer=self.observer,
                             shrink=float(self.hessian_shrink), gguf=self.gguf)

    def apply(self, ctx: OpContext, variant: Variant):
        return quantize(ctx, variant, self)


# ---- the driver ---------------------------------------------------------------------------------------
def quantize(ctx: OpContext, variant: Variant, step: Quantize):
    """Run one `Quantize` step on `variant` (never modified). -> (new variant, report, resolved step)."""
    blocks = sorted(set(step.blocks)) if step.blocks else variant.kept()
    variant.check_indices(blocks)
    dropped = [b for b in blocks if variant.overrides.get(b) is DROP]
    if dropped:
        raise RecipeError(f"step 'quantize': block {dropped[0]} is dropped in this variant; it cannot be quantized")
    if step.method == "rtn" and not step.error_report:
        new, report = rtn_blocks(ctx, variant, blocks, step.scheme())
    else:
        new, report = quantize_blocks(ctx, variant, blocks, step.scheme(), step.method,
                                      true_sequential=step.true_sequential)
    resolved = step.to_dict()
    resolved["blocks"] = blocks
    if step.gguf is None:
        resolved.pop("gguf")  # recipes without GGUF schemes read as they did before the field existed
    return new, report, resolved


def check_group_size(lm, variant: Variant, blocks: list[int], scheme: solver.Scheme) -> None:
    """A group size must tile every chosen linear's input width: a clear error, never a wrong shape."""
    if scheme.group_size == -1:
        return
    for _, i, name, mod in _linears_of(lm, variant, blocks):
        cols = linear_weight(mod).shape[1]
        if cols % scheme.group_size:
            divisors = [g for g in (32, 64, 128) if cols % g == 0]
            hint = f"use group_size {' or '.join(map(str, divisors))} or -1 (per channel)" if divisors else "use group_size -1 (per channel)"
            raise RecipeError(
                f"step 'quantize': group_size {scheme.group_size} does not divide the input width {cols} of "
                f"blocks[{i}].{name}; {hint}"
            )


def _source_module(lm, variant: Variant, i: int) -> nn.Module:
    """The module block i is quantized from: the current one, or the one a quantized block came from."""
    o = variant.overrides.get(i)
    m = lm.adapter.blocks(lm.model)[i] if o is None else o
    return getattr(m, "workbench_quant_source", None) or m


def _linears_of(lm, variant, blocks):
    for i in blocks:
        src = _source_module(lm, variant, i)
        for name, mod in lm.adapter.linears(src).items():
            yield src, i, name, mod


HessianCollector = HessianStats  # the GPTQ Hessians now live with the block stream's other statistics


def _run(block: nn.Module, hidden: torch.Tensor, call: BlockCall, on_batch=None) -> torch.Tensor:
    """Run a block over the calibration batch in chunks of CALIB_BATCH samples."""
    return run_chunked(block, hidden, call, CALIB_BATCH, on_batch)


def _param_bytes(module: nn.Module, skip: set[int]) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in skip)


def _collect(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor, call: BlockCall) -> HessianStats:
    collector = HessianStats(linears)
    with collector.watching():  # owned hooks; the held inputs are released at the end
        _run(block, hidden, call, on_batch=collector.start_batch)
    return collector


@torch.no_grad()
def quantize_block(block: nn.Module, adapter, hidden: torch.Tensor, call: BlockCall, scheme: solver.Scheme,
                   method: str, true_sequential: bool = False) -> tuple[nn.Module, dict]:
    """Quantize one block (a copy is made; `block` is not touched) on its calibration input `hidden`.

    -> (replacement block, report). The report gives, per linear, the objective error of the method
    and of RTN with the same scheme on the same Hessian, and the block's bits per weight and bytes.

    The linears are solved in stages, in the order the forward pass first calls them (linears sharing
    an input form one stage: q/k/v, o, gate/up, down). With `true_sequential` (IST-DASLab/gptq's
    `--true-sequential`), each later stage's Hessian is collected again with the earlier stages already
    quantized, so e.g. o_proj is fitted to the output of the quantized q/k/v; otherwise every Hessian
    comes from the one pass of the unquantized block.
    """
    q_block = copy_block(block)
    linears = adapter.linears(q_block)
    collector = _collect(q_block, linears, hidden, call)
    stages = [[n for n in linears if collector.owner.get(n) == acc] for acc in collector.sums]  # call order
    uncalled = [n for n in linears if n not in collector.owner]
    if uncalled:
        raise RecipeError(f"step 'quantize': the block's forward pass never calls {uncalled}; cannot calibrate them")

    per_linear = {}
    n_weights = 0
    q_bytes = 0
    orig_bytes = _param_bytes(block, set())
    quantized_params: set[int] = set()
    for j, stage in enumerate(stages):
        # true sequential: a later stage's inputs as the already quantized earlier stages make them
        hess = _collect(q_block, {n: linears[n] for n in stage}, hidden, call) if true_sequential and j else collector
        for name in stage:
            per_linear[name], nb = _solve_linear(name, linears[name], hess, scheme, method)
            quantized_params.add(id(linears[name].weight))
            n_weights += linears[name].weight.numel()
            q_bytes += nb
    experts_report = None
    experts = adapter.experts(q_block) if getattr(adapter, "is_moe", False) else None
    if experts is not None:  # each expert's slices, on the tokens routed to it by the quantized attention
        experts_report, nw, nb = _quantize_experts(q_block, experts, hidden, call, scheme, method)
        quantized_params |= {id(experts.gate_up_proj), id(experts.down_proj)}
        n_weights += nw
        q_bytes += nb
    other = _param_bytes(q_block, quantized_params)
    q_block.workbench_nbytes = q_bytes + other
    report = {
        "linears": per_linear,
        "bits_per_weight": 8 * q_bytes / max(n_weights, 1),
        "quantized_weights": n_weights,
        "bytes_before": orig_bytes,
        "bytes_after": q_block.workbench_nbytes,
        "bytes_saved": orig_bytes - q_block.workbench_nbytes,
    }
    if experts_report is not None:
        report["experts"] = experts_report
        report["notes"] = [e["note"] for e in experts_report.values() if "note" in e]
    return q_block, report


def _check_expert_groups(experts, scheme: solver.Scheme) -> None:
    if scheme.group_size == -1:
        return
    for name in ("gate_up_proj", "down_proj"):
        cols = getattr(experts, name).shape[-1]
        if cols % scheme.group_size:
            raise RecipeError(f"step 'quantize': group_size {scheme.group_size} does not divide the input width "
                              f"{cols} of the experts' {name}; use group_size -1 (per channel)")


def _quantize_experts(q_block, experts, hidden, call, scheme: solver.Scheme, method: str):
    """Per-expert GPTQ (or RTN) of an MoE block's 3-D expert tensors; the router is left alone."""
    from ..adapters.experts import RoutedInputs, quantize_experts

    _check_expert_groups(experts, scheme)
    routed = RoutedInputs(experts)
    with owned_hooks(routed.handle()):
        _run(q_block, hidden, call)

    def solve(W, H, use):
        rtn_res = solver.rtn(W, scheme, hessian=H)
        res = rtn_res if use == "rtn" else solver.gptq(W, H, scheme, grid=(rtn_res.scale, rtn_res.zero))
        return res.weight, {"shape": list(W.shape), "error": res.error, "rtn_error": rtn_res.error}

    rep = quantize_experts(experts, routed, solve, method)
    scale_bytes = min(experts.gate_up_proj.element_size(), 4)
    nb = sum(solver.packed_nbytes(*t.shape[1:], scheme, scale_bytes=scale_bytes) * t.shape[0]
             for t in (experts.gate_up_proj, experts.down_proj))
    return rep, experts.gate_up_proj.numel() + experts.down_proj.numel(), nb


def _record(mod: nn.Module, res, scheme: solver.Scheme, method: str) -> int:
    """Write a solver result into the linear (its own dtype) with its record. -> packed bytes."""
    set_linear_weight(mod, res.weight)
    mod.workbench_quant = QuantRecord(
        codes=res.codes, scale=res.scale, zero=res.zero, g_idx=res.g_idx, bits=scheme.bits,
        group_size=scheme.group_size, sym=scheme.sym, act_order=scheme.act_order, method=method, gguf=scheme.gguf,
    )
    rows, cols = linear_weight(mod).shape
    scale_bytes = mod.weight.element_size() if mod.weight.element_size() <= 4 else 4
    return solver.packed_nbytes(rows, cols, scheme, scale_bytes=scale_bytes)


@torch.no_grad()
def rtn_block(block: nn.Module, adapter, scheme: solver.Scheme) -> tuple[nn.Module, dict]:
    """Round-to-nearest of every linear of a copy of `block`, without data. -> (replacement, report);
    the report has sizes but no errors (those need the calibration pass: `error_report`)."""
    q_block = copy_block(block)
    linears = adapter.linears(q_block)
    per_linear, n_weights, q_bytes, done = {}, 0, 0, set()
    for name, mod in linears.items():
        W = linear_weight(mod).detach()
        nb = _record(mod, solver.rtn(W, scheme), scheme, "rtn")
        rows, cols = W.shape
        per_linear[name] = {"shape": [rows, cols], "error": None, "rtn_error": None, "relative_error": None,
                            "rtn_relative_error": None, "bits_per_weight": 8 * nb / (rows * cols)}
        done.add(id(mod.weight))
        n_weights += W.numel()
        q_bytes += nb
    experts = adapter.experts(q_block) if getattr(adapter, "is_moe", False) else None
    if experts is not None:  # every expert slice on its own grid; the router is left alone
        _check_expert_groups(experts, scheme)
        for name in ("gate_up_proj", "down_proj"):
            t = getattr(experts, name)
            for e in range(t.shape[0]):
                t.data[e] = solver.rtn(t[e].detach(), scheme).weight.to(t.dtype)
            q_bytes += solver.packed_nbytes(*t.shape[1:], scheme, scale_bytes=min(t.element_size(), 4)) * t.shape[0]
            n_weights += t.numel()
            done.add(id(t))
    orig_bytes = _param_bytes(block, set())
    q_block.workbench_nbytes = q_bytes + _param_bytes(q_block, done)
    return q_block, {"linears": per_linear, "bits_per_weight": 8 * q_bytes / max(n_weights, 1),
                     "quantized_weights": n_weights, "bytes_before": orig_bytes,
                     "bytes_after": q_block.workbench_nbytes, "bytes_saved": orig_bytes - q_block.workbench_nbytes}


@torch.no_grad()
def rtn_blocks(ctx: OpContext, variant: Variant, blocks: list[int], scheme: solver.Scheme) -> tuple[Variant, dict]:
    """RTN of `blocks` without a calibration pass: each block's weights alone decide its grid, so no
    trace is made (the same weights as quantize_blocks' RTN, which also measures the errors)."""
    lm = ctx.lm
    check_group_size(lm, variant, blocks, scheme)
    t0 = time.perf_counter()
    new = variant.derive()
    per_block = {}
    for done, i in enumerate(blocks):
        ctx.progress_to(done / len(blocks), f"quantize: block {i} (rtn {scheme.bits}-bit, no calibration)")
        src = _source_module(lm, variant, i)
        q_block, per_block[i] = rtn_block(src, lm.adapter, scheme)
        object.__setattr__(q_block, "workbench_quant_source", src)
        new.overrides[i] = keep_like_original(lm, q_block)  # offloaded plan: on disk like the original's
        new.tags[i] = _tag(scheme.bits, scheme.group_size, scheme.gguf)
    report = _report("rtn", scheme, per_block, 0, sequential=False, true_sequential=False, t0=t0)
    ctx.progress_to(1.0, f"quantize: {len(per_block)} blocks done")
    return new, report


def _report(method, scheme, per_block, calibration_tokens, sequential, true_sequential, t0) -> dict:
    n_w = sum(r["quantized_weights"] for r in per_block.values())
    bits_total = sum(r["bits_per_weight"] * r["quantized_weights"] for r in per_block.values())
    errors = [e["error"] for r in per_block.values() for e in r["linears"].values()]
    rtn_errors = [e["rtn_error"] for r in per_block.values() for e in r["linears"].values()]
    return {
        "op": "quantize",
        "method": method,
        "scheme": {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym,
                   "act_order": scheme.act_order, "damp": scheme.damp, "observer": scheme.observer,
                   "hessian_shrink": scheme.shrink, "gguf": scheme.gguf},
        "blocks": {str(i): r for i, r in sorted(per_block.items())},
        "total": {
            "blocks": len(per_block),
            "quantized_weights": n_w,
            "bits_per_weight": bits_total / max(n_w, 1),
            "bytes_before": sum(r["bytes_before"] for r in per_block.values()),
            "bytes_after": sum(r["bytes_after"] for r in per_block.values()),
            "bytes_saved": sum(r["bytes_saved"] for r in per_block.values()),
            "error": None if None in errors else sum(errors),
            "rtn_error": None if None in rtn_errors else sum(rtn_errors),
        },
        "calibration_tokens": int(calibration_tokens),
        "sequential": sequential,
        "true_sequential": true_sequential,
        "seconds": time.perf_counter() - t0,
    }


def _solve_linear(name: str, mod: nn.Module, collector: HessianStats, scheme: solver.Scheme,
                  method: str) -> tuple[dict, int]:
    """Quantize one linear in place with its Hessian from `collector`. -> (report entry, packed bytes)."""
    W = linear_weight(mod).detach()  # (out, in)
    H = collector.hessian(name)
    rtn_res = solver.rtn(W, scheme, hessian=H)
    res = rtn_res if method == "rtn" else solver.gptq(W, H, scheme, grid=(rtn_res.scale, rtn_res.zero))
    base = solver.objective(W, torch.zeros_like(W), H)  # tr(W H W^T): the output energy
    nb = _record(mod, res, scheme, method)
    rows, cols = W.shape
    entry = {
        "shape": [rows, cols],
        "error": res.error,
        "rtn_error": rtn_res.error,
        "relative_error": res.error / base if base > 0 else 0.0,
        "rtn_relative_error": rtn_res.error / base if base > 0 else 0.0,
        "bits_per_weight": 8 * nb / (rows * cols),
        "hessian_shared_with": [n for g in collector.shared_groups() if name in g for n in g if n != name],
        "tokens": collector.counts[collector.owner[name]],
    }
    if method == "gptq":
        entry["gptq_error"] = res.error
    return entry, nb


@torch.no_grad()
def quantize_blocks(ctx: OpContext, variant: Variant, blocks: list[int], scheme: solver.Scheme,
                    method: str, sequential: bool = True, true_sequential: bool = False) -> tuple[Variant, dict]:
    """Sequentially quantize `blocks` of `variant`. -> (new variant, report).

    `sequential=False` (for ablations only) calibrates every block on the unquantized variant's
    hidden states instead, as a non-sequential prototype would."""
    lm = ctx.lm
    check_group_size(lm, variant, blocks, scheme)
    t0 = time.perf_counter()
    ids = ctx.calib_ids()
    ctx.progress_to(0.0, f"quantize: tracing {ids.numel()} calibration tokens")
    trace = trace_blocks(lm.model, lm.adapter, ids, upto=max(blocks))  # later blocks' inputs are never read
    # The carrier: each chosen block is calibrated on what the blocks before it (quantized ones included,
    # when sequential) feed it; unchanged blocks before the variant's first change come from the trace.
    stream = Stream(lm, trace, batch=CALIB_BATCH, cancel=ctx.cancel, progress=ctx.progress_to)
    new = variant.derive()
    per_block: dict[int, dict] = {}
    for i, h in stream.each(blocks, lambda: new if sequential else variant,
                            lambda i: f"quantize: block {i} ({method} {scheme.bits}-bit)"):
        src = _source_module(lm, variant, i)
        q_block, rep = quantize_block(src, lm.adapter, h, trace.calls[i], scheme, method, true_sequential)
        # A plain attribute (not a registered submodule): sizes and state dicts ignore it.
        object.__setattr__(q_block, "workbench_quant_source", src)
        new.overrides[i] = keep_like_original(lm, q_block)
        new.tags[i] = _tag(scheme.bits, scheme.group_size, scheme.gguf)
        per_block[i] = rep
        if sequential:
            stream.changed_from(i)  # the quantized output feeds the next block
    report = _report(method, scheme, per_block, ids.numel(), sequential, true_sequential, t0)
    ctx.progress_to(1.0, f"quantize: {len(per_block)} blocks done")
    return new, report
