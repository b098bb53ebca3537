"""Time of each view (issue 4) on the default model on CPU, with the panels' defaults; goal: each < 30 s.

- attention: eager capture + PageRank (every layer and head, and the head average) + the three figures,
  for the built-in prompt and for a 512-token prompt (the panel's limit), with the JSON size the browser
  receives; side by side, one plain (SDPA) forward of the same tokens, for the eager-capture overhead.
- outliers: inf-norm/kurtosis per block and module + no-op scores over the default calibration (8 x 128).
- map: one eager calibration pass + UMAP of 30 blocks and 270 heads; the umap-learn warm-up (import and
  numba kernels: compiled on first use ever, then loaded from numba's disk cache) is timed apart.
- attribution: captum LayerIntegratedGradients at the defaults (32 trapezoid steps, doubled while not
  converged, up to 256; last 32 tokens), original and a variant with one block dropped; side by side, one
  forward+backward of a 32-prompt batch, and captum's delta.

Wall seconds are the goal's measure; process CPU seconds are printed beside them because a shared machine
stretches wall time (CPU s / threads ~ wall time on an idle machine).

    python bench/views.py [--threads N] [--device cpu] [--json-out bench/results/views.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from workbench.engine.analysis import attention as att
from workbench.engine.analysis import attribution as attr
from workbench.engine.analysis import embedding_map as emap
from workbench.engine.analysis import outliers as out
from workbench.engine.data import Calibration, calibration_ids, split_texts
from workbench.engine.loading import load_model
from workbench.engine.variant import original_variant

GOAL_S = 30.0


CPU_S: list[float] = []  # process CPU seconds of the last `timed` call (contention-independent)


def timed(fn, *a, **k):
    """-> (result, wall seconds); the process CPU seconds go to CPU_S[-1]."""
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn(*a, **k)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    CPU_S.append(time.process_time() - c0)
    return r, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-out", default="bench/results/views.json")
    ap.add_argument("--device", default="cpu", help="cpu (the goal's setting) | cuda | auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from workbench.panels import attention as pa
    from workbench.panels import outliers as po

    lm = load_model("default", device=args.device)
    v0 = original_variant(lm.num_blocks)
    v1 = v0.with_dropped([lm.num_blocks // 2], name="drop-middle")
    res = {"model": lm.name, "device": str(lm.device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_avg_start": os.getloadavg()[0]}
    rows = []

    # -- attention ------------------------------------------------------------------------------------
    long_prompt = split_texts()[1][:6000]
    for label, prompt in (("built-in prompt", None), ("512-token prompt", long_prompt)):
        ids, _ = att.prompt_ids(lm, prompt, 512)  # on lm.device
        with torch.no_grad():
            _, t_plain = timed(lambda: lm.model(input_ids=ids, use_cache=False))
        (cap, rep), t_an = timed(att.analyze_attention, lm, v0, prompt, 512)
        figs, t_fig = timed(lambda: (pa.grid_figure(cap), pa.head_figure(cap, 0, None), pa.pagerank_figure(cap, rep, 0, None)))
        size = sum(len(f.to_json()) for f in figs)
        total, cpu = t_an + t_fig, CPU_S[-1] + CPU_S[-2]
        rows.append((f"attention, {label} ({ids.shape[1]} tok)", total, cpu,
                     f"figures {size / 1e6:.2f} MB JSON; eager capture+PageRank / plain SDPA forward = {t_an / t_plain:.1f}x "
                     f"({t_an:.2f} s vs {t_plain:.2f} s); PageRank {rep['pagerank']['max_iterations_used']} iterations"))
        res[f"attention_{ids.shape[1]}"] = {"seconds": total, "cpu_s": cpu, "analysis_s": t_an, "figures_s": t_fig, "plain_forward_s": t_plain,
                                            "figure_json_bytes": size, "pagerank_iterations": rep["pagerank"]["max_iterations_used"]}
        del cap
    (cap, rep), t_var = timed(att.analyze_attention, lm, v1, long_prompt, 512)
    rows.append((f"attention, variant {v1.name}, 512-token prompt", t_var, CPU_S[-1], f"{len(cap.blocks)} blocks captured"))
    res["attention_variant_512"] = {"seconds": t_var, "cpu_s": CPU_S[-1]}
    del cap

    # -- outliers ---------------------------------------------------------------------------------------
    calib = Calibration()
    ids = calibration_ids(lm.tokenizer, calib).to(lm.device)
    stats, t_out = timed(out.outlier_stats, lm, v0, ids)
    _, t_ofig = timed(lambda: (po.noop_figure(stats), po.norms_figure(stats), po.summary_text(stats)))
    flagged = [f["block"] for f in out.outlier_blocks(stats)]
    rows.append((f"outliers ({calib.samples} x {calib.seq_len} tokens)", t_out + t_ofig, CPU_S[-1] + CPU_S[-2],
                 f"outlier blocks {flagged}"))
    res["outliers"] = {"seconds": t_out + t_ofig, "cpu_s": CPU_S[-1] + CPU_S[-2], "outlier_blocks": flagged,
                       "max_kurtosis": {m: max(v for v in stats["kurtosis"][m] if v is not None) for m in out.MODULES},
                       "max_inf_norm": {m: max(v for v in stats["inf_norm"][m] if v is not None) for m in out.MODULES}}

    # -- map ----------------------------------------------------------------------------------------------
    _, t_warm = timed(emap.warm_up)
    m, t_map = timed(emap.analyze_map, lm, v0, ids)
    rows.append(("map warm-up (umap import + numba kernels)", t_warm, CPU_S[-2], "once per process; compiles on first use ever"))
    rows.append((f"map ({len(m['blocks']['index'])} blocks, {len(m['heads']['head'])} heads)", t_map, CPU_S[-1],
                 f"blocks: {m['blocks']['method']}, heads: {m['heads']['method']}"))
    res["map"] = {"seconds": t_map, "cpu_s": CPU_S[-1], "warm_up_s": t_warm}

    # -- attribution ----------------------------------------------------------------------------------
    a, t_attr = timed(attr.analyze_attribution, lm, v1)
    c_attr = CPU_S[-1]
    T = len(a["tokens"])
    batch = torch.tensor([a["input_ids"]] * attr.DEFAULT_STEPS, device=lm.device)
    emb = lm.adapter.embeddings(lm.model)[0]

    def fwd_bwd():
        with torch.enable_grad():
            e = emb(batch).detach().requires_grad_(True)
            y = lm.model(inputs_embeds=e, use_cache=False).logits[:, -1].logsumexp(-1).sum()
            y.backward()

    _, t_fb = timed(fwd_bwd)
    deltas = {c["variant"]: (c["delta"], c["f_input"] - c["f_baseline"]) for c in a["columns"]}
    used = "/".join(str(c["steps"]) for c in a["columns"])
    rows.append((f"attribution ({used} steps used, from {attr.DEFAULT_STEPS}; {T} tok, original + {v1.name})", t_attr,
                 c_attr, f"IG per model / one fwd+bwd of a {attr.DEFAULT_STEPS}-batch = {t_attr / 2 / t_fb:.1f}x; "
                 + "; ".join(f"{k}: delta {d:.3g} vs f(x)-f(b) {f:.3g}" for k, (d, f) in deltas.items())))
    res["attribution"] = {"seconds": t_attr, "cpu_s": c_attr, "fwd_bwd_s": t_fb, "tokens": T, "steps": [c["steps"] for c in a["columns"]],
                          "delta": {k: d for k, (d, _) in deltas.items()}, "f_diff": {k: f for k, (_, f) in deltas.items()}}

    res["load_avg_end"] = os.getloadavg()[0]
    print(f"views on {lm.name}, {res['device']} ({res['threads']} threads, {res['cpus']} cores; load average "
          f"{res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f}); goal < {GOAL_S:.0f} s each")
    print(f"{'analysis':58s} {'wall s':>7s} {'/ goal':>7s} {'CPU s':>7s}  notes")
    for name, s, c, note in rows:
        print(f"{name:58s} {s:7.2f} {s / GOAL_S:7.2f} {c:7.2f}  {note}")
    res["rows"] = [{"analysis": n, "seconds": s, "ratio_to_goal": s / GOAL_S, "cpu_s": c, "notes": note}
                   for n, s, c, note in rows]
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
