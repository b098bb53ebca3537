"""FuseGPT fusion vs plain block removal on the default model (issue 6).

k = 7 of 30 blocks (25 %). Plans on the calibration split (engine.analysis.influence.removal_plan):
MI iterative (FuseGPT), BI (ShortGPT), perplexity-greedy (SLEB-like). Each plan's plain removal and the
fusion of the MI blocks (same blocks, same order: `fuse_blocks` with explicit `blocks`) are evaluated on
the held-out evaluation split. The headline fused variant goes through `engine.evaluate.full_eval` (ppl,
KL and top-1 against the original); the others are scored by `heldout_ppl`, the same NLL on the same
tokens without re-running the original each time (the dense figure is printed both ways as a check).

The curve re-runs the whole fusion with a smaller step budget per block (same blocks, same data), so
each point is what that budget really buys; 0 steps is plain removal by construction.

    python bench/fuse.py [--steps 16] [--curve 0,4] [--samples 16] [--batch 16] [--seq-len 128] [--group 7]
                         [--rank 8] [--lr 0.05] [--eval-tokens 1024] [--threads 1] [--device auto]
                         [--iterative]   # pick each block by MI on the fused model (FuseGPT), not by the plan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.engine.analysis.influence import SCAN_SAMPLES, SCAN_SEQ_LEN, removal_plan
from workbench.engine.data import Calibration, calibration_ids, evaluation_ids
from workbench.engine.evaluate import full_eval, perplexity
from workbench.engine.loading import load_model
from workbench.engine.ops.fuse import FuseBlocks
from workbench.engine.recipe import OpContext
from workbench.engine.variant import original_variant, view_model


def heldout_ppl(lm, variant, seq_len: int, max_tokens: int, batch_size: int = 4) -> float:
    """Perplexity of the variant on the evaluation split: full_eval's tokens and NLL, variant only."""
    ids = evaluation_ids(lm.tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    return perplexity(view_model(lm.model, lm.adapter, variant), ids, batch_size, lm.device)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--plan-samples", type=int, default=SCAN_SAMPLES)
    ap.add_argument("--plan-seq-len", type=int, default=SCAN_SEQ_LEN)
    ap.add_argument("--steps", type=int, default=16, help="optimiser steps per fused block (the headline run)")
    ap.add_argument("--curve", default="0,4", help="smaller step budgets to re-run for the curve")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=7)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--coef", default="lowrank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--iterative", action="store_true", help="k mode: MI recomputed on the fused model")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json-out", default="bench/results/fuse.json")
    ap.add_argument("--plan-cache", default="bench/results/fuse_plans.json")
    ap.add_argument("--fresh-plans", action="store_true", help="recompute the removal plans even if cached")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    lm = load_model(args.model, device=args.device)
    v0 = original_variant(lm.num_blocks)
    k = args.k
    print(f"model: {lm.name}, {lm.num_blocks} blocks, device {lm.device}; removing k={k} ({k / lm.num_blocks:.0%})")
    print(f"plans on {args.plan_samples} x {args.plan_seq_len} calibration tokens; fusion trains on "
          f"{args.samples} x {args.seq_len} (batch {args.batch}), group {args.group}, {args.coef} rank {args.rank}, "
          f"lr {args.lr}, {args.dtype}; held-out: {args.eval_tokens} tokens in windows of {args.eval_seq_len}")

    plan_ids = calibration_ids(lm.tokenizer, Calibration(samples=args.plan_samples, seq_len=args.plan_seq_len))
    # Plans cost minutes on a shared CPU and do not depend on fusion: cached per model and plan data.
    cache_path = Path(args.plan_cache)
    key = f"{lm.source}|{args.plan_samples}x{args.plan_seq_len}|k{k}"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() and not args.fresh_plans else {}
    plans = {}
    for metric in ("mi", "bi", "ppl"):
        t0 = time.perf_counter()
        hit = cache.get(key, {}).get(metric)
        plans[metric] = hit or removal_plan(lm, v0, plan_ids.to(lm.device), metric, k)["order"]
        how = "cached from an earlier run; --fresh-plans recomputes" if hit else f"{time.perf_counter() - t0:.0f} s"
        print(f"plan {metric:>3}: {plans[metric]}  ({how})", flush=True)
    cache[key] = plans
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps(cache, indent=2))

    def ppl_of(variant):
        return heldout_ppl(lm, variant, args.eval_seq_len, args.eval_tokens)

    t0 = time.perf_counter()
    dense = ppl_of(v0)
    plain = {m: ppl_of(v0.with_dropped(b)) for m, b in plans.items()}
    t_eval = (time.perf_counter() - t0) / 4
    print(f"held-out ppl: dense {dense:.2f} | removal MI {plain['mi']:.2f}, BI {plain['bi']:.2f}, "
          f"ppl-greedy {plain['ppl']:.2f}  ({t_eval:.0f} s per evaluation)", flush=True)

    calib = Calibration(samples=args.samples, seq_len=args.seq_len)
    ctx = OpContext(lm=lm, calibration=calib)
    common = dict(warmup=args.warmup, group=args.group, rank=args.rank, coef=args.coef, samples=args.samples, seq_len=args.seq_len,
                  batch=args.batch, lr=args.lr, dtype=args.dtype, patience=0)

    def fuse(steps: int, blocks=None):
        spec = dict(k=k) if blocks is None else dict(blocks=blocks)
        t = time.perf_counter()
        variant, report, resolved = FuseBlocks(steps=steps, **spec, **common).apply(ctx, v0)
        return variant, report, resolved, time.perf_counter() - t

    def gap_closed(p):
        return (plain["mi"] - p) / (plain["mi"] - dense)

    fused, report, resolved, seconds = fuse(args.steps, None if args.iterative else plans["mi"])
    per_block = [r["seconds"] for r in report["per_block"]]
    print(f"fused blocks {resolved['blocks']}: {seconds:.0f} s, per fused block mean {sum(per_block) / len(per_block):.0f} s "
          f"(max {max(per_block):.0f} s), {args.steps} steps each", flush=True)
    for r in report["per_block"]:
        print(f"  block {r['block']:>2} into {r['neighbours']}: {r['loss']} {r['loss_start']:.4g} -> {r['loss_end']:.4g} "
              f"({1 - r['loss_end'] / r['loss_start']:.0%} lower), {r['seconds']:.0f} s")
    full = full_eval(lm, fused, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
    print(f"fused full_eval: ppl {full['ppl']:.2f}, KL {full['kl']:.3f}, top-1 {full['top1']:.3f}; "
          f"dense by full_eval {full['ppl_original']:.2f} (by heldout_ppl {dense:.2f})")

    curve = [{"steps": args.steps, "ppl": full["ppl"], "gap_closed": gap_closed(full["ppl"]), "seconds": seconds}]
    fused_blocks = resolved["blocks"]
    for s in sorted({int(x) for x in args.curve.split(",") if x.strip()} - {args.steps}):
        if s == 0 and sorted(fused_blocks) == sorted(plans["mi"]):
            p, sec = plain["mi"], 0.0  # 0 steps = plain removal of the same blocks (tested exactly)
        else:
            v, _, _, sec = fuse(s, fused_blocks)
            p = ppl_of(v)
        curve.append({"steps": s, "ppl": p, "gap_closed": gap_closed(p), "seconds": sec})
        print(f"  curve: {s:>3} steps/block -> ppl {p:.2f}", flush=True)
    curve.sort(key=lambda c: c["steps"])

    print()
    print("| variant | blocks removed | held-out ppl |")
    print("| --- | --- | --- |")
    print(f"| dense | - | {dense:.2f} |")
    print(f"| plain removal, MI plan | {sorted(plans['mi'])} | {plain['mi']:.2f} |")
    print(f"| plain removal, BI plan | {sorted(plans['bi'])} | {plain['bi']:.2f} |")
    print(f"| plain removal, ppl-greedy plan | {sorted(plans['ppl'])} | {plain['ppl']:.2f} |")
    print(f"| fused (FuseGPT), {args.steps} steps/block | {sorted(fused_blocks)} | {full['ppl']:.2f} |")
    print()
    print("| steps per block | held-out ppl | gap closed (MI removal -> dense) | fusion wall time |")
    print("| --- | --- | --- | --- |")
    for c in curve:
        print(f"| {c['steps']} | {c['ppl']:.2f} | {c['gap_closed']:.0%} | {c['seconds']:.0f} s |")
    closed = gap_closed(full["ppl"])
    beats = all(full["ppl"] < p for p in plain.values())
    print()
    print(f"goal: fused closes >= 50% of the gap: {'yes' if closed >= 0.5 else 'no'} ({closed:.0%}); "
          f"beats every plain removal: {'yes' if beats else 'no'}")
    print(f"total bench time {time.perf_counter() - t_all:.0f} s")

    out = {
        "model": lm.name, "device": str(lm.device), "k": k, "args": vars(args), "plans": plans,
        "dense": dense, "plain": plain, "fused": {"blocks": fused_blocks, "full_eval": full, "report": report},
        "curve": curve, "gap_closed": closed, "beats_every_plain_removal": beats,
        "seconds_per_fused_block": per_block, "total_seconds": time.perf_counter() - t_all,
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
