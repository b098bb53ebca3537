"""Sparsity sweep on the default model (issue 5): the panel defaults against the 3-minute goal, and a
10-point sweep with the calibration statistics reused vs recomputed for every point.

Part `sweep` runs the panel defaults as one call, as the app does (magnitude global + Wanda per row,
unstructured 0..90 % in 10 points, 2:4 marked points, first 2048 tokens of the held-out split), times it
against the goal and prints the curves. Its per-method "10-point sweep with reuse" time is the
method's once-only statistics (Wanda's calibration pass ||X_j||, the stable orderings of the scores)
plus its points (masks from the cached orderings, pruned copies, evaluation), all measured in it.

Part `baseline` (one method per call, to keep each run short on a shared machine) recomputes the
statistics for every point: a fresh calibration pass (Wanda) and fresh orderings, as a loop over
`sparsify` steps would. The pruned weights are checked identical to the reuse run's (measured
sparsity per point), so their evaluation is the same computation: it is measured once, in part
`sweep`, and counted in both totals. Ratio = recompute total / reuse total.

Wall time and this process's CPU time are printed (the machine is shared; the load average is
printed beside them). Results accumulate in bench/results/sparsity_sweep.json.

    python bench/sparsity_sweep.py --part sweep
    python bench/sparsity_sweep.py --part baseline --method magnitude
    python bench/sparsity_sweep.py --part baseline --method wanda
    python bench/sparsity_sweep.py --part report          # the ratios from the saved parts
    python bench/sparsity_sweep.py --part sweep --eval-tokens 1024   # the same with a smaller subset
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
from workbench.engine.variant import original_variant

GOAL_S = 180.0
RESULTS = Path(__file__).parent / "results" / "sparsity_sweep.json"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def saved() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(d: dict) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(d, indent=1, default=str))


def show_curves(res: dict) -> None:
    for m, c in res["curves"].items():
        print(f"  {m} ({c['scope']}):")
        print("    target  reached       ppl        KL    top1   prune_s  eval_s")
        for p in c["points"]:
            print(f"    {p['target_sparsity']:5.2f}   {p['sparsity']:.4f}  {p['ppl']:10.3f}  {p['kl']:8.4f}  {p['top1']:.4f}"
                  f"  {p['prune_s']:7.1f} {p['eval_s']:7.1f}")
        k = c["knee"]
        print(f"    essential sparsity (ppl within {k['tolerance'] * 100:.0f}% of dense {k['dense_ppl']:.3f}): "
              f"{k['essential_sparsity']:.2f}; max curvature at {k['max_curvature_sparsity']}")
    for p in res["nm"]:
        print(f"  {p['method']} {p['pattern']}: reached {p['sparsity']:.4f}, ppl {p['ppl']:.3f}, KL {p['kl']:.4f}")


def part_sweep(args, lm, calib) -> None:
    cfg = sp.SweepConfig(points=args.points, eval_tokens=args.eval_tokens)  # the panel defaults (2048 tokens)
    print(f"panel defaults: methods {cfg.methods}, patterns {cfg.patterns}, {cfg.points} points to {cfg.max_sparsity}, "
          f"{cfg.eval_tokens} evaluation tokens; load {load()}", flush=True)
    w0, c0 = time.perf_counter(), time.process_time()
    res = sp.sweep(lm, cfg, calib_ids=calib)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    verdict = "meets" if wall < GOAL_S else "misses"
    print(f"panel-default sweep: {wall:.1f}s wall, {cpu:.1f}s CPU -> {verdict} the {GOAL_S:.0f}s goal "
          f"(statistics {res['timing']['statistics_s']:.1f}s, evaluation {res['timing']['eval_s']:.1f}s; load {load()})")
    print(f"evaluation subset: {res['evaluation']}")
    show_curves(res)
    reuse = {}
    for m, c in res["curves"].items():
        st = res["timing"]["statistics_by_method_s"][m]
        pts = sum(p["seconds"] for p in c["points"])
        reuse[m] = {"statistics_s": st, "points_s": pts, "total_s": st + pts}
        print(f"{m}: {len(c['points'])}-point sweep with reuse = {st:.1f}s statistics once + {pts:.1f}s points "
              f"= {st + pts:.1f}s")
    d = saved()
    key = "sweep" if args.eval_tokens == sp.DEFAULT_EVAL_TOKENS else f"sweep_{args.eval_tokens}_tokens"
    d.update({"model": lm.name, key: {"wall_s": wall, "cpu_s": cpu, "goal_s": GOAL_S, "load_end": load(),
                                          "reuse": reuse, "result": res}})
    save(d)


def part_baseline(args, lm, calib) -> None:
    d = saved()
    if "sweep" not in d:
        raise SystemExit("run --part sweep first (the baseline reuses its evaluation times)")
    m = args.method
    ref = {round(p["target_sparsity"], 6): p for p in d["sweep"]["result"]["curves"][m]["points"]}
    scope = sp.DEFAULT_SCOPE[m]
    v = original_variant(lm.num_blocks)
    targets = sp.prunable_linears(lm, v)
    pruner = sp.Pruner(lm, v, targets, calib, reuse=False)
    scratch: dict = {}
    print(f"{m} baseline: statistics recomputed for every point; load {load()}", flush=True)
    w0, c0 = time.perf_counter(), time.process_time()
    prune_total = eval_total = 0.0
    for x in sp.sweep_points(args.points):
        t0 = time.perf_counter()
        masks = pruner.masks(m, x, "unstructured", scope)
        pv, weights = sp.build_pruned(lm, v, targets, masks, "x", scratch=scratch)
        reached = sp.measured_sparsity(targets, weights)["overall"]
        dt = time.perf_counter() - t0
        r = ref[round(x, 6)]
        assert reached == r["sparsity"], f"{m} {x}: pruned weights differ from the reuse run"
        prune_total += dt
        eval_total += r["eval_s"]
        print(f"  {x:4.2f}: statistics + masks + copies {dt:6.1f}s (reuse run: {r['prune_s']:.1f}s); "
              f"reached {reached:.4f} = reuse run's; evaluation {r['eval_s']:.1f}s (measured in the reuse run)", flush=True)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    total = prune_total + eval_total
    reuse_total = d["sweep"]["reuse"][m]["total_s"]
    print(f"{m}: 10-point sweep recomputing statistics = {prune_total:.1f}s + {eval_total:.1f}s evaluation = {total:.1f}s; "
          f"with reuse {reuse_total:.1f}s -> ratio {total / reuse_total:.2f}x (this part: {wall:.1f}s wall, {cpu:.1f}s CPU, "
          f"load {load()})")
    d.setdefault("baseline", {})[m] = {"prune_s": prune_total, "eval_s": eval_total, "total_s": total,
                                       "reuse_total_s": reuse_total, "ratio": total / reuse_total, "load_end": load()}
    save(d)


def part_report() -> None:
    d = saved()
    s = d.get("sweep", {})
    if s:
        print(f"panel-default sweep: {s['wall_s']:.1f}s wall ({s['cpu_s']:.1f}s CPU), goal {s['goal_s']:.0f}s")
    for m, b in d.get("baseline", {}).items():
        print(f"{m}: reuse {b['reuse_total_s']:.1f}s vs recompute {b['total_s']:.1f}s -> {b['ratio']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["sweep", "baseline", "report"], default="sweep")
    ap.add_argument("--method", choices=list(sp.METHODS), default="magnitude")
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--eval-tokens", type=int, default=sp.DEFAULT_EVAL_TOKENS,
                    help="part sweep: evaluation subset (other than 2048: saved beside, not used by the baseline)")
    args = ap.parse_args()
    if args.part == "report":
        return part_report()
    print(f"torch threads {torch.get_num_threads()}, load average {load()}", flush=True)
    lm = load_model("default", device="cpu")
    calib = calibration_ids(lm.tokenizer, Calibration()).to(lm.device)
    (part_sweep if args.part == "sweep" else part_baseline)(args, lm, calib)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
