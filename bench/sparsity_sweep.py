"""Sparsity sweep on the default model (issue 5): calibration reuse vs recomputing statistics per point.

For magnitude (global) and Wanda (per output row), a 10-point sweep 0..90 % is timed twice in this run
on the same evaluation subset (first 2048 tokens of the held-out split, traced once and shared):
- reuse: the calibration pass (Wanda's ||X_j||) and the orderings of the scores are computed once and
  every point only compares ranks (the app and CLI path);
- recompute: both are redone for every point (what a loop over `sparsify` steps would cost).
The panel defaults (both methods, unstructured + 2:4 points, 10 points) are then timed as one call, and
checked against the goal of 3 minutes. Wall time and this process's CPU time are both printed: the
machine is shared, and the load average is printed beside them. Curves' values are printed in full.

    python bench/sparsity_sweep.py [--points 10] [--eval-tokens 2048] [--skip-recompute] [--sensitivity]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from workbench.engine.analysis import sparsity as sp
from workbench.engine.data import Calibration, calibration_ids
from workbench.engine.loading import load_model

GOAL_S = 180.0


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def show_curve(res: dict) -> None:
    for m, c in res["curves"].items():
        print(f"  {m} ({c['scope']}):")
        print("    target  reached     ppl        KL      top1")
        for p in c["points"]:
            print(f"    {p['target_sparsity']:5.2f}   {p['sparsity']:.4f}  {p['ppl']:9.3f}  {p['kl']:8.4f}  {p['top1']:.4f}")
        k = c["knee"]
        print(f"    essential sparsity (ppl within {k['tolerance'] * 100:.0f}% of dense): {k['essential_sparsity']:.2f}; "
              f"max curvature at {k['max_curvature_sparsity']}")
    for p in res["nm"]:
        print(f"  {p['method']} {p['pattern']}: reached {p['sparsity']:.4f}, ppl {p['ppl']:.3f}, KL {p['kl']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--eval-tokens", type=int, default=sp.DEFAULT_EVAL_TOKENS)
    ap.add_argument("--skip-recompute", action="store_true", help="only the reuse path and the panel defaults")
    ap.add_argument("--sensitivity", action="store_true", help="also time the (type x block) sensitivity grid")
    args = ap.parse_args()

    print(f"torch threads {torch.get_num_threads()}, load average at start {load()}")
    lm = load_model("default", device="cpu")
    calib = calibration_ids(lm.tokenizer, Calibration()).to(lm.device)
    es, w, c = timed(lambda: sp.eval_set(lm, tokens=args.eval_tokens))
    print(f"evaluation subset: {es.describe()}; traced once in {w:.1f}s wall ({c:.1f}s CPU)")
    out = {"model": lm.name, "eval": es.describe(), "calibration_tokens": int(calib.numel()), "points": args.points,
           "trace_s": w, "runs": {}, "load_start": load()}

    for method in ("magnitude", "wanda"):
        modes = ("reuse",) if args.skip_recompute else ("reuse", "recompute")
        for mode in modes:
            cfg = sp.SweepConfig(methods=(method,), patterns=("unstructured",), points=args.points,
                                 eval_tokens=args.eval_tokens, reuse=mode == "reuse")
            res, w, c = timed(lambda: sp.sweep(lm, cfg, calib_ids=calib, es=es))
            out["runs"][f"{method}/{mode}"] = {"wall_s": w, "cpu_s": c, "statistics_s": res["timing"]["statistics_s"],
                                               "eval_s": res["timing"]["eval_s"], "load": load(),
                                               "curve": res["curves"][method]}
            print(f"{method:9s} {args.points}-point sweep, {mode:9s}: {w:7.1f}s wall, {c:7.1f}s CPU "
                  f"(statistics {res['timing']['statistics_s']:.1f}s, evaluation {res['timing']['eval_s']:.1f}s) "
                  f"load {load()}")
        if not args.skip_recompute:
            r, q = out["runs"][f"{method}/reuse"], out["runs"][f"{method}/recompute"]
            ratio_w, ratio_c = q["wall_s"] / r["wall_s"], q["cpu_s"] / r["cpu_s"]
            out["runs"][f"{method}/ratio"] = {"wall": ratio_w, "cpu": ratio_c}
            print(f"{method:9s} recompute / reuse: {ratio_w:.2f}x wall, {ratio_c:.2f}x CPU")

    cfg = sp.SweepConfig(points=args.points, eval_tokens=args.eval_tokens)  # the panel defaults
    res, w, c = timed(lambda: sp.sweep(lm, cfg, calib_ids=calib))  # traces its own subset, as the panel does
    total_w, total_c = w, c
    out["panel_defaults"] = {"config": {"methods": list(cfg.methods), "patterns": list(cfg.patterns),
                                        "points": cfg.points, "eval_tokens": cfg.eval_tokens},
                             "wall_s": total_w, "cpu_s": total_c, "goal_s": GOAL_S, "load": load(), "result": res}
    verdict = "meets" if total_w < GOAL_S else "misses"
    print(f"panel defaults (magnitude + wanda, unstructured + 2:4, {args.points} points, {args.eval_tokens} tokens): "
          f"{total_w:.1f}s wall, {total_c:.1f}s CPU -> {verdict} the {GOAL_S:.0f}s goal (load {load()})")
    print(f"dense perplexity on the subset: {res['dense']['ppl']:.3f}")
    show_curve(res)

    if args.sensitivity:
        sens, w, c = timed(lambda: sp.sensitivity(lm, "magnitude", 0.5))
        out["sensitivity"] = {"wall_s": w, "cpu_s": c, "result": sens}
        worst = max((v, t, b) for t, row in zip(sens["types"], sens["kl"]) for b, v in zip(sens["blocks"], row) if v is not None)
        print(f"sensitivity grid (magnitude 50%, {len(sens['types'])} types x {len(sens['blocks'])} blocks, "
              f"{sens['evaluation']['tokens_scored']} tokens): {w:.1f}s wall, {c:.1f}s CPU; most sensitive: "
              f"{worst[1]} of block {worst[2]} (KL {worst[0]:.4f})")

    path = Path(__file__).parent / "results" / "sparsity_sweep.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
