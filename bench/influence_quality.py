"""Which 25 % of the blocks to drop? Plans by each metric and the held-out perplexity they reach (issue 3).

On the default model (30 blocks), k = 7 blocks are chosen on the calibration split by
- MI iterative (FuseGPT): drop the lowest-MI block, re-score, repeat;
- MI one-shot: the 7 lowest of the first MI scan;
- BI (ShortGPT): the 7 lowest block influences, one pass;
- angular: the 7 lowest single-block angular distances, one pass;
- angular run (Gromov et al.): the contiguous run of 7 with the smallest angular distance;
- ppl greedy (SLEB-like): drop the block whose removal raises calibration NLL least, re-score, repeat;
then each pruned variant is evaluated with `engine.evaluate.full_eval` on the held-out evaluation split
(perplexity, and KL / top-1 agreement against the original on the same tokens).

    python bench/influence_quality.py [--k 7] [--samples 4] [--seq-len 64] [--eval-tokens 4096] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.commands.analyze_influence import INFLUENCE_SAMPLES, INFLUENCE_SEQ_LEN
from workbench.engine.analysis import influence_math as im
from workbench.engine.analysis.influence import angular_distances, block_scores, removal_plan
from workbench.engine.data import Calibration, calibration_ids
from workbench.engine.evaluate import full_eval
from workbench.engine.loading import load_model
from workbench.engine.variant import original_variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--samples", type=int, default=INFLUENCE_SAMPLES)
    ap.add_argument("--seq-len", type=int, default=INFLUENCE_SEQ_LEN)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per evaluation")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json-out", default="bench/results/influence_quality.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, device="auto")
    calib = Calibration(samples=args.samples, seq_len=args.seq_len)
    ids = calibration_ids(lm.tokenizer, calib).to(lm.device)
    v0 = original_variant(lm.num_blocks)
    k = args.k
    print(f"model: {lm.name}, {lm.num_blocks} blocks; removing k={k} ({k / lm.num_blocks:.0%})")
    print(f"calibration split: {args.samples} x {args.seq_len} tokens; held-out evaluation split: "
          f"{args.eval_tokens} tokens in windows of {args.eval_seq_len}")

    plans: dict[str, dict] = {}
    t0 = time.perf_counter()
    p = removal_plan(lm, v0, ids, "mi", k)
    plans["MI iterative"] = {"blocks": p["order"], "seconds": time.perf_counter() - t0}
    plans["MI one-shot"] = {"blocks": im.lowest(p["steps"][0], k), "seconds": None}
    for name, metric in (("BI", "bi"), ("angular", "angular")):
        t0 = time.perf_counter()
        vals = block_scores(lm, v0, ids, metric)["values"]
        plans[name] = {"blocks": im.lowest(vals, k), "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    run = angular_distances(lm, v0, ids)["best"][k - 1]
    plans["angular run"] = {"blocks": run["blocks"], "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    p = removal_plan(lm, v0, ids, "ppl", k)
    plans["ppl greedy"] = {"blocks": p["order"], "seconds": time.perf_counter() - t0}

    base = full_eval(lm, v0, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
    print(f"\noriginal: held-out ppl {base['ppl']:.3f} ({base['tokens']} tokens)\n")
    header = f"{'method':<14} {'blocks removed (original indices, removal order)':<52} {'ppl':>9} {'KL':>7} {'top1':>6} {'plan s':>7}"
    print(header)
    print("-" * len(header))
    for name, plan in plans.items():
        ev = full_eval(lm, v0.with_dropped(plan["blocks"]), seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
        plan.update({"ppl": ev["ppl"], "kl": ev["kl"], "top1": ev["top1"], "tokens": ev["tokens"]})
        secs = f"{plan['seconds']:.1f}" if plan["seconds"] is not None else "(=MI)"
        print(f"{name:<14} {str(plan['blocks']):<52} {ev['ppl']:9.2f} {ev['kl']:7.3f} {ev['top1']:6.3f} {secs:>7}", flush=True)
    low = min(p["ppl"] for p in plans.values())
    best = [n for n, p in plans.items() if p["ppl"] <= low * (1 + 1e-9)]
    print(f"\nlowest held-out perplexity: {', '.join(best)} ({low:.2f})")

    out = {"model": lm.name, "k": k, "calibration": calib.to_dict(), "eval_tokens": base["tokens"],
           "ppl_original": base["ppl"], "plans": plans, "best": best}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
