"""One full Macro Influence scan of the default model: naive vs ours, side by side (issue 3).

Naive, as FuseGPT's `full_importance_eval` does it: one full pass for the reference h_L, then for each
block i all other blocks run again from the embedding output (no LM head). Ours (`block_scores(...,
"mi")`): one traced pass, then for each i only the blocks after i, from the recorded input of i, the
skipped-block variants stacked along the batch. Both use the same calibration batch and the same
block primitive (`run_block`). "ours, unstacked" is the same scan with one variant per block call, to
separate the saving in block passes from the gain of bigger batches. Rounds alternate the three so
machine load hits all alike; ratios are of the fastest round of each, in wall time and in CPU time
of this process (steadier on a shared machine). Also times the iterative
removal plan for k = 7. On a shared CPU pass --threads 1: with 2 threads and other processes running,
small block calls spend most of their time in thread synchronisation, which flatters stacking.

    python bench/influence_scan.py [--samples 4] [--seq-len 64] [--rounds 1] [--k 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.commands.analyze_influence import INFLUENCE_SAMPLES, INFLUENCE_SEQ_LEN
from workbench.engine.analysis.influence import block_scores, removal_plan
from workbench.engine.data import Calibration, calibration_ids
from workbench.engine.block_stream import run_block, trace_blocks
from workbench.engine.loading import load_model
from workbench.engine.variant import original_variant


@torch.no_grad()
def naive_mi(lm, ids):
    """-> (MI per block, block passes). All blocks but i, from the embeddings, for every i."""
    trace = trace_blocks(lm.model, lm.adapter, ids)  # the reference pass: embeddings, calls, h_L
    blocks = lm.adapter.blocks(lm.model)
    n = len(blocks)
    passes = n
    mi = []
    for skip in range(n):
        h = trace.inputs[0]
        for j in range(n):
            if j != skip:
                h = run_block(blocks[j], h, trace.calls[j])
                passes += 1
        mi.append(1.0 - F.cosine_similarity(trace.output.float(), h.float(), dim=-1).mean().item())
    return mi, passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--samples", type=int, default=INFLUENCE_SAMPLES)
    ap.add_argument("--seq-len", type=int, default=INFLUENCE_SEQ_LEN)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--json-out", default="bench/results/influence_scan.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="auto")
    calib = Calibration(samples=args.samples, seq_len=args.seq_len)
    ids = calibration_ids(lm.tokenizer, calib).to(lm.device)
    variant = original_variant(lm.num_blocks)
    print(f"model: {lm.name}, {lm.num_blocks} blocks, device {lm.device}, torch threads {torch.get_num_threads()}")
    print(f"calibration: {args.samples} samples x {args.seq_len} tokens (same batch for both)")

    def sync():
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)

    def timed(fn):
        """-> (result, wall seconds, CPU seconds of this process: steadier than wall time on a shared box)."""
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return out, time.perf_counter() - w0, time.process_time() - c0

    runs = {"naive": [], "unstacked": [], "ours": []}  # (wall, cpu) per round
    for r in range(args.rounds):
        (mi_naive, passes_naive), *t = timed(lambda: naive_mi(lm, ids))
        runs["naive"].append(t)
        flat, *t = timed(lambda: block_scores(lm, variant, ids, "mi", max_rows=ids.shape[0]))  # one variant per call
        runs["unstacked"].append(t)
        res, *t = timed(lambda: block_scores(lm, variant, ids, "mi"))
        runs["ours"].append(t)
        print(f"round {r + 1} (wall / CPU s): " + ", ".join(f"{k} {v[-1][0]:.2f} / {v[-1][1]:.2f}" for k, v in runs.items()))
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in runs.items()}
    mi_ours, passes_ours = res["values"], res["block_passes"]
    diff = max(abs(a - b) for a, b in zip(mi_naive, mi_ours))
    diff_flat = max(abs(a - b) for a, b in zip(mi_naive, flat["values"]))
    ratio = best["ours"][0] / best["naive"][0]
    ratio_cpu = best["ours"][1] / best["naive"][1]
    ratio_flat = best["unstacked"][0] / best["naive"][0]
    n = lm.num_blocks
    print(f"naive:           {best['naive'][0]:7.2f} s wall, {best['naive'][1]:7.2f} s CPU, {passes_naive} block passes (L + L(L-1) = {n + n * (n - 1)})")
    print(f"ours, unstacked: {best['unstacked'][0]:7.2f} s wall, {best['unstacked'][1]:7.2f} s CPU, {flat['block_passes']} block passes, one variant per call")
    print(f"ours:            {best['ours'][0]:7.2f} s wall, {best['ours'][1]:7.2f} s CPU, {passes_ours} block passes (L + L(L-1)/2 = {n + n * (n - 1) // 2}), stacked")
    print(f"ratio ours/naive: {ratio:.3f} wall, {ratio_cpu:.3f} CPU (goal <= 0.55); unstacked {ratio_flat:.3f} wall, "
          f"{best['unstacked'][1] / best['naive'][1]:.3f} CPU; block passes {passes_ours / passes_naive:.3f}")
    print(f"max |MI naive - MI ours|: {diff:.2e}, unstacked {diff_flat:.2e} (goal <= 1e-5) -> "
          f"{'OK' if max(diff, diff_flat) <= 1e-5 else 'OVER'}")
    print("lowest-MI blocks (ours):", sorted(range(n), key=lambda i: mi_ours[i])[: args.k])

    plan, plan_t, plan_cpu = timed(lambda: removal_plan(lm, variant, ids, "mi", args.k))
    print(f"iterative MI plan, k={args.k}: {plan_t:.2f} s wall, {plan_cpu:.2f} s CPU, {plan['block_passes']} block passes, "
          f"order {plan['order']}")

    out = {
        "model": lm.name, "device": str(lm.device), "threads": torch.get_num_threads(),
        "calibration": calib.to_dict(), "rounds": args.rounds,
        "rounds_wall_cpu": runs, "ratio": ratio, "ratio_cpu": ratio_cpu,
        "ratio_unstacked": ratio_flat, "max_abs_diff_unstacked": diff_flat,
        "naive_block_passes": passes_naive, "ours_block_passes": passes_ours,
        "max_abs_diff": diff, "mi": mi_ours, "mi_naive": mi_naive,
        "plan_k": args.k, "plan_seconds": plan_t, "plan_cpu_seconds": plan_cpu, "plan_order": plan["order"], "plan_scores": plan["scores"],
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
