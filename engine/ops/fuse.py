"""FuseGPT fusion (Pei et al., arXiv 2411.14507; official code JarvisPei/FuseGPT): remove a block but
recycle its weights into its neighbours through a few learned coefficients.

One fusion of block b, on the current variant:
1. group: the blocks the variant keeps within a window around b (default b-4 .. b+3 in kept positions,
   clamped at the ends); the neighbours are the group without b;
2. inject: every linear of b goes into the same-named linear of each neighbour,
   W_eff = W + (P Q) ⊙ W_b with P = 0 (so step 0 is plain removal), see `fuse_linear.FuseLinear`;
3. train: local distillation on calibration text: the teacher is the group's output with b present, the
   student the group without b with injected weights, both fed the hidden states that the *current*
   variant produces at the group's entry; MSE over the hidden dim, or KL of the next-token distributions
   when the group ends at the variant's last block; Adam (coefficients at `lr`, norms/LoRA at
   `lr_other`), cosine schedule, early stop;
4. merge: fold into plain weights; the neighbours become replacement modules ("fused"), b is dropped.

`k` mode picks b by Macro Influence, recomputed on the current variant before each fusion (FuseGPT's
`--iterative`); `blocks` mode fuses the given original indices in the given order. The variant passed in
is never modified: a cancelled job leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_path, linear_weight, set_linear_weight
from ..data import Calibration, calibration_ids_on
from .. import fields
from ..errors import BlockIndexError, RecipeError
from ..block_stream import Stream, run_block, slice_call, trace_blocks
from ..recipe import OpContext, Step, register
from ..spill import keep_like_original
from ..variant import DROP, Variant, copy_block, current_block, view_model
from .fuse_linear import COEF_MODES, FuseLinear

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
LOSSES = ("auto", "mse", "kl", "nmse", "auto_nmse")


# ---- pure helpers ---------------------------------------------------------------------------------
def neighbour_window(kept: list[int], b: int, group: int) -> tuple[list[int], list[int]]:
    """(group blocks including b, neighbours) for fusing b: ceil(group/2) kept blocks before b and
    floor(group/2) after (7 -> b-4 .. b+3, FuseGPT's window), clamped at the ends, original indices."""
    pos = kept.index(b)
    before, after = (group + 1) // 2, group // 2
    blocks = kept[max(0, pos - before) : pos + after + 1]
    return blocks, [i for i in blocks if i != b]


def group_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, head=None) -> torch.Tensor:
    """MSE over the hidden dim (mean over tokens); "nmse": each token's squared error relative to the
    teacher's squared norm at that token, averaged over tokens (a few tokens with massive activations
    dominate the plain MSE and say little about the next-token distribution); or KL(teacher || student)
    of the next-token distributions per token (`head` maps hidden states to logits)."""
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "nmse":
        t = teacher.float()
        return ((student.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()
    logp_s = F.log_softmax(head(student).float(), dim=-1)  # (B, T, V)
    with torch.no_grad():
        logp_t = F.log_softmax(head(teacher).float(), dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()


def lr_factor(t: int, steps: int, warmup: int) -> float:
    """Multiplier of the base rate at optimiser step t (0-based): linear warm-up over `warmup` steps,
    then cosine decay towards 0 over the rest (FuseGPT: cosine only, over thousands of steps)."""
    if t < warmup:
        return (t + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))


# ---- the step -------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class FuseBlocks(Step):
    """Fuse blocks into their neighbours (FuseGPT). Give `blocks` (original indices, fused in that
    order) or `k` (the k lowest-Macro-Influence blocks, re-scored after each fusion)."""

    op = "fuse_blocks"
    blocks: tuple = ()
    k: int = 0
    group: int = 7  # neighbours per fusion (FuseGPT: 7, i.e. b-4 .. b+3)
    rank: int = 8  # rank r of P Q ("lowrank"); the official code uses 128 on a GPU
    coef: str = "lowrank"  # "lowrank" (P Q), "vector" (one scale per output row) or "full"
    lora_rank: int = 0  # optional LoRA term on each neighbour weight (0 = none)
    steps: int = 16  # optimiser steps per fused block (upper bound; early stop may end sooner)
    samples: int = 16  # calibration windows for training (FuseGPT: 128..1024 x 2048 tokens on a GPU)
    seq_len: int = 128
    batch: int = 16  # windows per optimiser step (= samples: full batch, exact best-state tracking)
    lr: float = 0.05  # coefficients (FuseGPT: 1e-3 over ~2,500 steps; few CPU steps need more)
    lr_other: float = 1e-4  # norm gains / LoRA
    warmup: int = 2  # steps of linear warm-up before the cosine decay (Adam's first steps overshoot)
    train_norms: bool = True
    loss: str = "auto"  # "auto": MSE, or KL where the group ends at the last block; "auto_nmse": nmse there
    patience: int = 10  # steps without a 0.1 % better (smoothed) loss before stopping; 0 = never
    mi_samples: int = 2  # calibration windows (of the training ones) for Macro Influence in `k` mode
    dtype: str = "fp32"  # "bf16": autocast the group's forward (CUDA)
    seed: int = 0
    # Output guard: > 0 scores each fusion and plain removal of the same block by KL(original || variant)
    # of the model's output on this many other calibration windows (seed + 1), and keeps removal when
    # the fusion is not better there: the local loss can fall while the output gets worse. 0 = off
    # (older recipes replay unchanged); the app's fuse mode turns it on.
    guard_samples: int = 0
    # With the guard on, also score the fused weights moved only part of the way from the neighbours' own
    # (w = w_neighbour + s (w_fused - w_neighbour) for each s here; 1.0 is the fusion as trained) and keep
    # the best of these and removal: a fusion that overshoots the output at s = 1 can still beat removal
    # at a smaller step. (1.0,) = the fusion alone (older recipes replay unchanged).
    guard_scales: tuple = (1.0,)

    def __post_init__(self):
        object.__setattr__(self, "blocks", fields.block_list(self.blocks, "blocks", self.op))
        ints = {"k": 0, "group": 1, "rank": 1, "lora_rank": 0, "steps": 0, "samples": 1, "seq_len": 2,
                "batch": 1, "patience": 0, "mi_samples": 1, "seed": 0, "warmup": 0, "guard_samples": 0}
        for name, low in ints.items():
            fields.integer(getattr(self, name), name, self.op, low)
        for name in ("lr", "lr_other"):
            fields.number(getattr(self, name), name, self.op)
        if not isinstance(self.guard_scales, (list, tuple)) or not self.guard_scales:
            raise RecipeError(f"step 'fuse_blocks': 'guard_scales' must be a list of numbers in (0, 1], "
                              f"got {self.guard_scales!r}")
        for s in self.guard_scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
                raise RecipeError(f"step 'fuse_blocks': 'guard_scales' must be a list of numbers in (0, 1], "
                                  f"got {list(self.guard_scales)!r}")
        object.__setattr__(self, "guard_scales", tuple(float(s) for s in self.guard_scales))
        if bool(self.blocks) == bool(self.k):
            raise RecipeError("step 'fuse_blocks': give either 'blocks' (a list) or 'k' (how many), not both or neither")
        if len(set(self.blocks)) != len(self.blocks):
            raise RecipeError(f"step 'fuse_blocks': 'blocks' repeats an index: {list(self.blocks)}")
        if self.coef not in COEF_MODES:
            raise RecipeError(f"step 'fuse_blocks': 'coef' must be one of {COEF_MODES}, got {self.coef!r}")
        if self.dtype not in DTYPES:
            raise RecipeError(f"step 'fuse_blocks': 'dtype' must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.loss not in LOSSES:
            raise RecipeError(f"step 'fuse_blocks': 'loss' must be one of {LOSSES}, got {self.loss!r}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["guard_scales"] = list(self.guard_scales)  # as the recipe's JSON holds it (a list, not a tuple)
        return d

    def apply(self, ctx: OpContext, variant: Variant):
        return fuse_blocks(ctx, variant, self)


# ---- the driver -----------------------------------------------------------------------------------
def fuse_blocks(ctx: OpContext, variant: Variant, step: FuseBlocks):
    """Run one `FuseBlocks` step on `variant` (never modified). -> (new variant, report, resolved step)."""
    lm = ctx.lm
    n = len(step.blocks) or step.k
    kept = variant.kept()
    if getattr(lm.adapter, "is_moe", False):
        raise RecipeError(
            f"step 'fuse_blocks': {lm.adapter.family} blocks are mixtures of experts, which fusion does not "
            "handle yet (their experts are 3-D tensors routed per token); prune or quantize them instead"
        )
    if step.blocks:
        variant.check_indices(step.blocks)
        gone = [b for b in step.blocks if b not in kept]
        if gone:
            raise BlockIndexError(f"step 'fuse_blocks': block {gone[0]} is already dropped in '{variant.name}'")
    if n >= len(kept):
        raise BlockIndexError(f"step 'fuse_blocks': cannot fuse {n} of the {len(kept)} blocks kept; keep at least one")
    t0 = time.perf_counter()
    calib = Calibration(source=ctx.calibration.source, samples=step.samples, seq_len=step.seq_len,
                        seed=ctx.calibration.seed, bos=ctx.calibration.bos)
    ids = calibration_ids_on(lm, calib)
    trace = trace_blocks(lm.model, lm.adapter, ids)  # h_0 and every block's call arguments
    stream = Stream(lm, trace, cancel=ctx.cancel)  # the current variant's input of each group
    guard = _OutputGuard(lm, Calibration(source=calib.source, samples=step.guard_samples, seq_len=step.seq_len,
                                         seed=calib.seed + 1)) if step.guard_samples else None
    cur = variant.derive(f"{variant.name}+fused")
    order, per_block = [], []
    for t in range(n):
        base = t / n
        if step.blocks:
            b, mi = step.blocks[t], None
        else:
            ctx.progress_to(base, f"fuse {t + 1}/{n}: Macro Influence of {len(cur.kept())} blocks")
            b, mi = _lowest_mi(step, ctx, cur, ids[: step.mi_samples], base, 1 / n)
        cur, rep = _fuse_one(step, ctx, cur, b, trace, stream, guard, base, 1 / n, f"fuse {t + 1}/{n}")
        rep["mi"] = mi
        order.append(b)
        per_block.append(rep)
    ctx.progress_to(1.0, f"fused {order}")
    report = {
        "op": step.op,
        "blocks": order,
        "blocks_before": len(kept),
        "blocks_after": len(cur.kept()),
        "per_block": per_block,
        "seconds": time.perf_counter() - t0,
        "tokens": int(ids.numel()),
    }
    resolved = step.to_dict()
    resolved.update(blocks=order, k=0)
    return cur, report, resolved


def _lowest_mi(step: FuseBlocks, ctx: OpContext, variant: Variant, ids, base: float, span: float) -> tuple[int, float]:
    from ..analysis.influence import block_scores

    def prog(frac, msg):
        ctx.progress_to(base + 0.2 * span * frac, f"Macro Influence: {msg}")

    res = block_scores(ctx.lm, variant, ids, metric="mi", progress=prog, cancel=ctx.cancel)
    vals = [(v, i) for i, v in enumerate(res["values"]) if v is not None]
    v, i = min(vals)  # every metric: higher = more important
    return i, float(v)


def _fuse_one(step: FuseBlocks, ctx: OpContext, variant: Variant, b: int, trace, stream: Stream, guard, base: float,
              span: float, label: str):
    lm = ctx.lm
    t0 = time.perf_counter()
    kept = variant.kept()
    group, neighbours = neighbour_window(kept, b, step.group)
    if not neighbours:
        raise BlockIndexError(f"step 'fuse_blocks': block {b} has no neighbour left to fuse into")
    ends_last = group[-1] == kept[-1]
    auto = {"auto": "mse", "auto_nmse": "nmse"}
    kind = (("kl" if ends_last and lm.adapter.lm_head(lm.model) else auto[step.loss]) if step.loss in auto
            else step.loss)
    if kind == "kl" and not ends_last:
        raise RecipeError("step 'fuse_blocks': loss 'kl' needs a group that ends at the last block")
    x = stream.input_of(variant, group[0])  # (N, T, d) what the current variant feeds the group
    calls = {i: trace.calls[i] for i in group}
    pruned = current_block(lm.model, lm.adapter, variant, b)
    with torch.no_grad():
        teacher = x
        for i in group:
            teacher = run_block(current_block(lm.model, lm.adapter, variant, i), teacher, calls[i])
    gen = torch.Generator().manual_seed(step.seed * 1_000_003 + b)
    students = [
        (j, inject_block(lm.adapter, current_block(lm.model, lm.adapter, variant, j), pruned, step.coef,
                         step.rank, step.lora_rank, step.train_norms, gen))
        for j in neighbours
    ]
    head = (lambda h: lm.adapter.head(lm.model, h)) if kind == "kl" else None

    n_rows = x.shape[0]

    def forward(rows: slice) -> torch.Tensor:
        h = x[rows]
        with _autocast(lm.device, step.dtype):
            for j, blk in students:
                h = run_block(blk, h, slice_call(calls[j], rows, n_rows))
        return group_loss(h, teacher[rows], kind, head)

    coef = [p for _, blk in students for m in blk.modules() if isinstance(m, FuseLinear) for p in m.coef_parameters()]
    other = [p for _, blk in students for p in blk.parameters() if p.requires_grad and not any(p is c for c in coef)]
    history = _train(step, ctx, forward, coef, other, x.shape[0], base, span, f"{label}: block {b}")
    loss_end = history["loss_end"]
    stream.changed_from(group[0])
    new = variant.derive(variant.name)
    new.overrides[b] = DROP
    new.tags.pop(b, None)
    for j, blk in students:
        new.overrides[j] = keep_like_original(lm, merge_block(lm.adapter, blk))
        new.tags[j] = "fused"
    guarded = None
    if guard is not None:
        removal = variant.with_dropped([b], name=variant.name)
        kl_removal = guard.kl(removal)
        by_scale = {1.0: new} | {s: partway(lm, variant, new, neighbours, s) for s in step.guard_scales if s != 1.0}
        kls = {s: guard.kl(v) for s, v in by_scale.items()}
        s_best = min(kls, key=lambda s: (kls[s], -s))
        kept = "fused" if kls[s_best] < kl_removal else "removal"
        guarded = {"kl_fused": kls[1.0], "kl_removal": kl_removal, "tokens": guard.tokens, "kept": kept,
                   "kl_by_scale": {str(s): k for s, k in kls.items()}, "scale": s_best if kept == "fused" else 0.0}
        new = by_scale[s_best] if kept == "fused" else removal
    return new, {
        "block": b,
        "group": group,
        "neighbours": neighbours,
        "loss": kind,
        "loss_start": history["loss_start"],
        "loss_end": loss_end,
        "steps_run": history["steps_run"],
        "history": history["history"],
        "guard": guarded,
        "seconds": time.perf_counter() - t0,
    }


def _train(step: FuseBlocks, ctx: OpContext, forward, coef, other, n_rows: int, base: float, span: float, label: str) -> dict:
    """Adam (betas 0.9/0.95 as FuseGPT), warm-up + cosine schedule, over minibatches of rows; early stop when
    the loss averaged over one pass of the data has not improved by 0.1 % for `patience` steps."""
    groups = [{"params": coef, "lr": step.lr}]
    if other:
        groups.append({"params": other, "lr": step.lr_other})
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, step.steps, step.warmup))
    batch = min(step.batch, n_rows)
    starts = list(range(0, n_rows - batch + 1, batch)) or [0]
    window: list[float] = []
    best, since = math.inf, 0
    history: list[list[float]] = []
    t_train = base + 0.2 * span if not step.blocks else base
    params = coef + other
    with torch.no_grad():
        loss_start = float(forward(slice(None)))
    history.append([0, loss_start])
    ctx.progress_to(t_train, f"{label}: step 0/{step.steps} loss {loss_start:.4g}")
    # The best state seen (by the loss over one pass of the data, measured before each update);
    # Adam at a high rate can overshoot on some groups, and a fusion must never end worse than removal.
    kept_state, kept_loss = [p.detach().clone() for p in params], loss_start
    it = 0
    for it in range(1, step.steps + 1):
        s = starts[(it - 1) % len(starts)]
        snapshot = [p.detach().clone() for p in params] if len(starts) == 1 else None
        loss = forward(slice(s, s + batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        if snapshot is not None and value < kept_loss:  # full batch: exact loss of `snapshot`
            kept_state, kept_loss = snapshot, value
        opt.step()
        sched.step()
        history.append([it, value])
        frac = t_train + (base + span - t_train) * it / max(1, step.steps)
        ctx.progress_to(min(frac, base + span), f"{label}: step {it}/{step.steps} loss {value:.4g}")
        window = (window + [value])[-len(starts):]
        if it >= len(starts):
            smooth = sum(window) / len(window)
            if smooth < best * (1 - 1e-3):
                best, since = smooth, 0
            else:
                since += 1
            if step.patience and since >= step.patience:
                break
    with torch.no_grad():
        final = float(forward(slice(None)))
        if final > kept_loss:  # the last update overshot: go back to the best state measured
            for p, v in zip(params, kept_state):
                p.copy_(v)
            final = float(forward(slice(None)))
    return {"loss_start": loss_start, "loss_end": final, "history": history, "steps_run": it}


class _OutputGuard:
    """KL(original || variant) of the next-token distributions on held-out calibration windows; the
    original's log-probabilities are computed once."""

    def __init__(self, lm, calib: Calibration):
        self.lm = lm
        self.ids = calibration_ids_on(lm, calib)
        self.tokens = int(self.ids[:, 1:].numel())
        self.ref = self._logp(lm.model)

    @torch.no_grad()
    def _logp(self, model) -> torch.Tensor:
        return F.log_softmax(model(input_ids=self.ids, use_cache=False).logits[:, :-1].float(), dim=-1)  # (B, T-1, V)

    def kl(self, variant: Variant) -> float:
        logp = self._logp(view_model(self.lm.model, self.lm.adapter, variant))
        return float((self.ref.exp() * (self.ref - logp)).sum(-1).mean())


def partway(lm, variant: Variant, fused: Variant, neighbours, scale: float) -> Variant:
    """`fused` with each neighbour's parameters moved only `scale` of the way from the neighbour's own in
    `variant` (p = p_own + scale (p_fused - p_own)); the fused block stays dropped."""
    out = fused.derive(fused.name)
    with torch.no_grad():
        for j in neighbours:
            own = current_block(lm.model, lm.adapter, variant, j)
            blk = copy_block(own)  # materialised, hook-free: an offloaded neighbour's weights are read here
            for p, q in zip(blk.parameters(), fused.overrides[j].parameters(), strict=True):
                p.lerp_(q.to(p.device, p.dtype), scale)
            out.overrides[j] = blk
    return out


# ---- injection and merge (module surgery on copies) ---------------------------------------------------
def inject_block(adapter, neighbour: nn.Module, pruned: nn.Module, coef: str = "lowrank", rank: int = 8,
                 lora_rank: int = 0, train_norms: bool = True, generator: torch.Generator | None = None) -> nn.Module:
    """A copy of `neighbour` whose every linear is a FuseLinear(own weight, same-named weight of `pruned`).
    Only the coefficients (and, with `train_norms`, the norm gains) require grad; `neighbour` is untouched."""
    blk = copy_block(neighbour)
    src = adapter.linears(pruned)
    for name, mod in adapter.linears(blk).items():
        add = src.get(name)
        if add is None or not _plain_linear(mod) or not _plain_linear(add):
            raise RecipeError(
                f"step 'fuse_blocks': linear '{name}' is not a plain weight (quantized?); fuse before quantizing"
            )
        fl = FuseLinear(linear_weight(mod), getattr(mod, "bias", None), linear_weight(add),
                        getattr(add, "bias", None), mode=coef, rank=rank, lora_rank=lora_rank, generator=generator)
        fl.original = [mod]  # outside the module tree (a list): restored by merge_block
        _set_path(blk, adapter.linear_paths[name], fl)
    if train_norms:
        for norm in adapter.norms(blk).values():
            for p in norm.parameters():
                p.requires_grad_(True)
    return blk


def merge_block(adapter, blk: nn.Module) -> nn.Module:
    """Fold every FuseLinear of `blk` into its original module (plain weights, own orientation and
    dtype), in place on `blk` (a copy made by inject_block); freeze everything. Returns `blk`."""
    for path in adapter.linear_paths.values():
        fl = get_path(blk, path)
        if not isinstance(fl, FuseLinear):
            continue
        mod = fl.original[0]
        w, bias = fl.merged()
        set_linear_weight(mod, w)
        if bias is not None:
            mod.bias.data = bias.to(mod.bias.dtype)
        _set_path(blk, path, mod)
    for p in blk.parameters():
        p.requires_grad_(False)
    return blk


# ---- small module helpers -------------------------------------------------------------------------
def _plain_linear(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point()


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path)
    setattr(parent, name, module)


def _autocast(device: torch.device, dtype: str):
    target = DTYPES[dtype]
    return torch.autocast(device_type=device.type, dtype=target, enabled=target is not None)
