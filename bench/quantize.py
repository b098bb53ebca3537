"""Quantization quality on the default model (issue 7): dense vs RTN vs GPTQ, side by side in one run.

Held-out perplexity (engine.evaluate.full_eval: the evaluation split, never seen by calibration) of the
dense model and of every linear in every block quantized by RTN and by GPTQ with the same scheme
(4-bit and 3-bit, group 64, asymmetric by default), calibrated on the default calibration (or --samples).
Printed: perplexity, its increase over dense, KL and top-1 agreement vs dense, bits per weight, bytes,
quantization seconds, and how much of RTN's perplexity increase GPTQ removes.

    python bench/quantize.py [--bits 4,3] [--group-size 64] [--sym] [--act-order weight] [--observer mse] [--seeds 0,1,2]
                             [--hessian-shrink 0.4] [--true-sequential]
                             [--samples N] [--ablations] [--with-llmcompressor]

--ablations adds GPTQ runs that each undo one ingredient (non-sequential calibration, no act order,
fewer calibration tokens, ...), to show what makes GPTQ beat RTN here.
--with-llmcompressor builds (once, cached under ~/.cache/compression-workbench/llmcompressor-venv) a
venv with llmcompressor 0.14 (which pins older transformers / compressed-tensors than ours), saves the
same calibration and evaluation token ids to a file, and runs its GPTQModifier with the same scheme in a
subprocess; its wall time and perplexity are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from workbench.engine import data
from workbench.engine import evaluate as ev
from workbench.engine.data import Calibration
from workbench.engine.loading import cache_dir, load_model
from workbench.engine.ops.quantize import quantize_blocks
from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
from workbench.engine.variant import original_variant, view_model

LLMC_VERSION = "0.14.0.1"
EVAL_SEQ_LEN = 256


def run_ours(ctx, base, step: dict, sequential: bool = True) -> tuple:
    t0 = time.perf_counter()
    if sequential:
        v = apply_steps(ctx, base, [step_from_dict(step)])
        report = v.reports[-1]
    else:
        s = step_from_dict(step)
        v, report = quantize_blocks(ctx, base, base.kept(), s.scheme(), s.method, sequential=False)
    return v, report, time.perf_counter() - t0


def evaluate(lm, variant, max_tokens):
    r = ev.full_eval(lm, variant, seq_len=EVAL_SEQ_LEN, max_tokens=max_tokens)
    return r


def ppl_only(lm, variant, max_tokens):
    """The variant's held-out perplexity alone (the `ppl` of full_eval, on the same tokens, without the
    side-by-side reference pass): for ablation rows."""
    ids = data.evaluation_ids(lm.tokenizer, data.DEFAULT_SOURCE, EVAL_SEQ_LEN, max_tokens)
    ppl, n = ev.perplexity(view_model(lm.model, lm.adapter, variant), ids, device=lm.device)
    return {"ppl": ppl, "kl": float("nan"), "top1": float("nan"), "bytes": ev.size_of(lm, variant)["bytes"], "tokens": n}


def row(name, r, dense_ppl, report=None, seconds=None):
    out = {"name": name, "ppl": r["ppl"], "ppl_increase": r["ppl"] - dense_ppl, "kl": r.get("kl", 0.0),
           "top1": r.get("top1", 1.0), "bytes": r["bytes"], "tokens": r["tokens"]}
    if report is not None:
        t = report["total"]
        out.update({"bits_per_weight": t["bits_per_weight"], "bytes_saved": t["bytes_saved"],
                    "objective_error": t["error"], "rtn_objective_error": t["rtn_error"]})
    if seconds is not None:
        out["quantize_seconds"] = seconds
    return out


def fmt(r):
    bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "   - "
    sec = f"{r['quantize_seconds']:7.1f}" if "quantize_seconds" in r else "      -"
    return (f"{r['name']:<34} {r['ppl']:8.3f} {r['ppl_increase']:+8.3f} {r['kl']:8.4f} {r['top1']:7.4f} "
            f"{bpw:>6} {r['bytes'] / 2**20:9.2f} {sec}")


HEADER = (f"{'variant':<34} {'ppl':>8} {'d_ppl':>8} {'KL':>8} {'top1':>7} {'bpw':>6} {'MiB':>9} {'quant_s':>7}")


# ---- llm-compressor side by side -------------------------------------------------------------------------
RUNNER = r'''
import json, math, sys, time
import torch
args = json.load(open(sys.argv[1]))
torch.set_num_threads(args["threads"])
from transformers import AutoModelForCausalLM
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
ids = torch.load(args["ids"])
calib, evals = ids["calib"], ids["eval"]
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
weights = {"num_bits": args["bits"], "type": "int", "symmetric": args["sym"], "strategy": "group",
           "group_size": args["group_size"]}
if args["act_order"]:
    weights["actorder"] = args["act_order"]
if args["observer"] != "minmax":
    weights["observer"] = args["observer"]  # llm-compressor runs weight "mse" as its memoryless mse search
mod = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                   dampening_frac=args["damp"])
t0 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=[mod], num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1], pad_to_max_length=False)
seconds = time.perf_counter() - t0
nll, n = 0.0, 0
with torch.no_grad():
    for b0 in range(0, evals.shape[0], 4):
        batch = evals[b0:b0 + 4]
        logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), -1)
        nll += -logp.gather(-1, batch[:, 1:, None]).sum().item()
        n += batch[:, 1:].numel()
print("LLMC_RESULT " + json.dumps({"seconds": seconds, "ppl": math.exp(nll / n), "tokens": n}))
'''


def llmc_venv(progress=print) -> Path:
    """A cached venv with llmcompressor (system site packages visible; torch pinned to ours)."""
    venv = cache_dir() / "llmcompressor-venv"
    py = venv / "bin" / "python"
    marker = venv / f".ok-{LLMC_VERSION}"
    if marker.is_file():
        return py
    progress(f"building {venv} (llmcompressor {LLMC_VERSION}); once")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    cons = venv / "constraints.txt"
    cons.write_text(f"torch=={torch.__version__.split('+')[0]}\n")  # never another torch
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(cons), f"llmcompressor=={LLMC_VERSION}"], check=True)
    marker.write_text("ok\n")
    return py


def run_llmc(lm, calib_ids, eval_ids, bits, group_size, sym, act_order, damp, threads, observer="minmax") -> dict:
    try:
        py = llmc_venv()
    except (subprocess.CalledProcessError, OSError) as e:
        return {"error": f"could not build the llm-compressor venv: {e}"}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "ids.pt"
        torch.save({"calib": calib_ids.cpu(), "eval": eval_ids.cpu()}, ids_path)
        cfg = Path(tmp) / "args.json"
        cfg.write_text(json.dumps({"ids": str(ids_path), "model": str(lm.source), "bits": bits, "group_size": group_size,
                                   "sym": sym, "act_order": act_order, "damp": damp, "threads": threads,
                                   "observer": observer}))
        runner = Path(tmp) / "runner.py"
        runner.write_text(RUNNER)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        t0 = time.perf_counter()
        p = subprocess.run([str(py), str(runner), str(cfg)], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    for line in p.stdout.splitlines():
        if line.startswith("LLMC_RESULT "):
            out = json.loads(line[len("LLMC_RESULT "):])
            out["subprocess_seconds"] = wall
            return out
    return {"error": f"llm-compressor run failed (exit {p.returncode}): {p.stderr.strip()[-800:]}"}


# ---- main ------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true", help="symmetric grids (default: asymmetric)")
    ap.add_argument("--act-order", default="weight", help="weight | group | none (default: weight)")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--hessian-shrink", type=float, default=0.0,
                    help="ours: GPTQ Hessian shrinkage toward its diagonal (0 = GPTQ as published; the app proposes 0.4)")
    ap.add_argument("--true-sequential", action="store_true",
                    help="ours: re-collect each later stage's Hessian after quantizing the earlier ones (q/k/v, o, gate/up, down)")
    ap.add_argument("--observer", default="minmax", choices=["minmax", "mse"],
                    help="how group scales are chosen, for RTN, GPTQ and llm-compressor alike (default: minmax)")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: the default calibration)")
    ap.add_argument("--seeds", default="0", help="calibration sampling seeds: each seed is a separate run of every "
                    "method on a different calibration sample (default: 0, the default calibration)")
    ap.add_argument("--seq-len", type=int, default=None, help="calibration tokens per sample")
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many held-out tokens")
    ap.add_argument("--ablations", default="", help="comma list of GPTQ ablations at the first bit-width: "
                    "nonseq, noact, group, damp, calib64 (perplexity only: KL/top1 shown as -)")
    ap.add_argument("--with-llmcompressor", action="store_true")
    ap.add_argument("--llmc-bits", default="4,3", help="bit-widths to run llm-compressor at")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default="bench/results/quantize.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    act = None if args.act_order in ("none", "null", "") else args.act_order

    lm = load_model("default", device="auto")
    seeds = [int(x) for x in args.seeds.split(",")]
    calib = Calibration()
    over = {k: v for k, v in (("samples", args.samples), ("seq_len", args.seq_len)) if v is not None}
    if over:
        calib = Calibration(**{**calib.to_dict(), **over})
    base = original_variant(lm.num_blocks)
    print(f"model: {lm.name}; device {lm.device}; torch threads {torch.get_num_threads()}")
    print(f"calibration: {calib.to_dict()} = {calib.samples * calib.seq_len} tokens (split: calibration), "
          f"sampled with seed(s) {seeds}")
    dense = evaluate(lm, base, args.max_tokens)
    print(f"evaluation: {dense['tokens']} held-out tokens (split: evaluation), seq_len {EVAL_SEQ_LEN}")
    print(f"scheme: group {args.group_size}, {'symmetric' if args.sym else 'asymmetric'}, GPTQ act_order {act}, "
          f"damp {args.damp}, observer {args.observer}, Hessian shrink (ours) {args.hessian_shrink}, true sequential "
          f"(ours) {args.true_sequential}; every linear "
          f"of all {lm.num_blocks} blocks\n")
    rows = [row("dense", dense, dense["ppl"])]
    print(HEADER)
    print(fmt(rows[0]), flush=True)
    bit_list = [int(b) for b in args.bits.split(",")]
    runs: dict = {b: [] for b in bit_list}  # per bit-width: one dict per seed
    for seed in seeds:
        cal = Calibration(**{**calib.to_dict(), "seed": seed})
        ctx = OpContext(lm=lm, calibration=cal)
        tag = f" s{seed}" if len(seeds) > 1 else ""
        for bits in bit_list:
            run = {"seed": seed}
            common = {"op": "quantize", "bits": bits, "group_size": args.group_size, "sym": args.sym, "damp": args.damp,
                      "observer": args.observer, "true_sequential": args.true_sequential,
                      "hessian_shrink": args.hessian_shrink}
            v, rep, sec = run_ours(ctx, base, {**common, "method": "rtn"})
            r_rtn = row(f"RTN  {bits}-bit g{args.group_size}{tag}", evaluate(lm, v, args.max_tokens), dense["ppl"], rep, sec)
            print(fmt(r_rtn), flush=True)
            v, rep, sec = run_ours(ctx, base, {**common, "method": "gptq", "act_order": act})
            r_gptq = row(f"GPTQ {bits}-bit g{args.group_size}{tag}", evaluate(lm, v, args.max_tokens), dense["ppl"], rep, sec)
            print(fmt(r_gptq), flush=True)
            rows += [r_rtn, r_gptq]
            run.update(rtn=r_rtn["ppl"], gptq=r_gptq["ppl"], gptq_s=r_gptq["quantize_seconds"],
                       objective_ratio=r_gptq["objective_error"] / r_gptq["rtn_objective_error"])
            if args.ablations and bits == bit_list[0] and seed == seeds[0]:
                gp = {**common, "method": "gptq", "act_order": act}
                menu = {
                    "nonseq": ("  GPTQ non-sequential", gp, None),
                    "noact": ("  GPTQ act_order none", {**gp, "act_order": None}, None),
                    "group": ("  GPTQ act_order group", {**gp, "act_order": "group"}, None),
                    "damp": ("  GPTQ damp 0.1", {**gp, "damp": 0.1}, None),
                    "calib64": ("  GPTQ 64x128 calibration", gp, 64),
                }
                for key in args.ablations.split(","):
                    name, step, samples = menu[key]
                    c = ctx if samples is None else OpContext(lm=lm, calibration=Calibration(**{**cal.to_dict(), "samples": samples}))
                    v, rep, sec = run_ours(c, base, step, sequential=key != "nonseq")
                    r = row(f"{name} {bits}-bit", ppl_only(lm, v, args.max_tokens), dense["ppl"], rep, sec)
                    r["ablation"] = key
                    rows.append(r)
                    print(fmt(r), flush=True)
            if args.with_llmcompressor and str(bits) in args.llmc_bits.split(","):
                eval_ids = data.evaluation_ids(lm.tokenizer, cal.source, EVAL_SEQ_LEN, args.max_tokens)
                res = run_llmc(lm, ctx.calib_ids(), eval_ids, bits, args.group_size, args.sym, act, args.damp,
                               torch.get_num_threads(), args.observer)
                if "error" in res:
                    print(f"llm-compressor {bits}-bit: {res['error']}", flush=True)
                else:
                    r = {"name": f"llm-compressor GPTQ {bits}-bit{tag}", "ppl": res["ppl"],
                         "ppl_increase": res["ppl"] - dense["ppl"], "kl": float("nan"), "top1": float("nan"),
                         "bytes": float("nan"), "tokens": res["tokens"], "quantize_seconds": res["seconds"]}
                    print(fmt(r).replace("nan", "  -"), flush=True)
                    run.update(llmc=res["ppl"], llmc_s=res["seconds"])
                rows.append({"name": f"llm-compressor GPTQ {bits}-bit{tag}", **res})
            runs[bits].append(run)
    print()
    summary = {}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for bits, rs in runs.items():
        rtn, gq = mean([r["rtn"] for r in rs]), mean([r["gptq"] for r in rs])
        cut = 1 - (gq - dense["ppl"]) / (rtn - dense["ppl"]) if rtn > dense["ppl"] else float("nan")
        s = {"seeds": [r["seed"] for r in rs], "rtn_ppl_mean": rtn, "gptq_ppl_mean": gq,
             "gptq_beats_rtn": all(r["gptq"] < r["rtn"] for r in rs), "rtn_increase_removed": cut,
             "objective_ratio": mean([r["objective_ratio"] for r in rs]), "runs": rs}
        line = (f"{bits}bit ({len(rs)} calibration seed(s)): mean ppl RTN {rtn:.3f}, GPTQ {gq:.3f}; GPTQ below RTN "
                f"at every seed: {s['gptq_beats_rtn']}; GPTQ removes {100 * cut:.0f} % of RTN's perplexity increase; "
                f"GPTQ/RTN layer objective {s['objective_ratio']:.3f}")
        theirs = [r for r in rs if "llmc" in r]
        if theirs:
            lc = mean([r["llmc"] for r in theirs])
            ours = mean([r["gptq"] for r in theirs])
            ratio = sum(r["gptq_s"] for r in theirs) / sum(r["llmc_s"] for r in theirs)
            wins = sum(r["gptq"] <= r["llmc"] for r in theirs)
            s["llmc"] = {"ppl_mean": lc, "ours_ppl_mean": ours, "wall_ratio_ours_over_theirs": ratio,
                         "ours_ppl_le_theirs": ours <= lc, "seeds_ours_le_theirs": wins}
            line += (f"; llm-compressor mean ppl {lc:.3f} vs ours {ours:.3f} (ours <= theirs: {ours <= lc}; at "
                     f"{wins} of {len(theirs)} seeds); wall time ours/llm-compressor {ratio:.2f}")
        summary[f"{bits}bit"] = s
        print(line)
    print("note: the default model's weights come from a Q4_1 GGUF (4-bit asymmetric grid, groups of 32 along the "
          "input): the 'dense' model is already 4-bit; re-quantizing to g64 cannot land on its grid.")
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"calibration": calib.to_dict(), "rows": rows, "summary": summary,
                               "args": vars(args)}, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
