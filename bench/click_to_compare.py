"""Click-to-compare latency on the default model (issue 2).

For a variant with one block dropped: time from the click to the quick-set figures (cached trace and
reference, the variant runs from the dropped block on) against an uncached evaluation of the same quick
set (full forwards of original and variant), side by side in one run, for every single dropped block.
Also: time to the first streamed token of a generation, and the cache's memory.

    python bench/click_to_compare.py [--blocks 0,5,29] [--json-out bench/results/click_to_compare.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.engine import evaluate as ev
from workbench.engine.loading import load_model
from workbench.engine.variant import original_variant, view_model


@torch.no_grad()
def uncached_quick(lm, variant, ids):
    """The same quick figures with no cache: both models run in full on the quick tokens."""
    t0 = time.perf_counter()
    ref = F.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
    logits = view_model(lm.model, lm.adapter, variant)(input_ids=ids, use_cache=False).logits[:, :-1]
    s = ev.logit_sums(ref, logits, ids[:, 1:])
    return time.perf_counter() - t0, s["kl"] / s["n"]


def first_token_latency(lm, variant, prompt="Explain in one sentence what a bushfire is."):
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True)
    t0 = time.perf_counter()
    th = threading.Thread(target=ev.generate, args=(lm, variant, prompt, 24, streamer))
    th.start()
    first = None
    for piece in streamer:
        if first is None and piece:
            first = time.perf_counter() - t0
    th.join()
    return first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="all", help="comma list of blocks, or 'all'")
    ap.add_argument("--json-out", default="bench/results/click_to_compare.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("default", device="cpu")
    n = lm.num_blocks
    blocks = list(range(n)) if args.blocks == "all" else [int(b) for b in args.blocks.split(",")]

    t0 = time.perf_counter()
    qc = ev.quick_cache(lm)
    build = time.perf_counter() - t0
    ids = qc.ids
    ev.quick_eval(lm, original_variant(n).with_dropped([n - 1]), reference=qc)  # warm-up (allocator, kernels)

    rows = []
    for b in blocks:
        v = original_variant(n).with_dropped([b])
        t0 = time.perf_counter()
        q = ev.quick_eval(lm, v, reference=qc)
        t_quick = time.perf_counter() - t0
        t_full, kl_full = uncached_quick(lm, v, ids)
        rows.append({"block": b, "quick_s": t_quick, "uncached_s": t_full, "ratio": t_quick / t_full,
                     "kl_quick": q["kl"], "kl_uncached": kl_full, "top1": q["top1"]})
        print(f"block {b:2d}: quick {t_quick:6.3f} s  uncached {t_full:6.3f} s  ratio {t_quick / t_full:5.3f}  "
              f"KL {q['kl']:.4f} (uncached {kl_full:.4f})  top-1 {q['top1']:.3f}", flush=True)

    ttft = first_token_latency(lm, original_variant(n).with_dropped([blocks[len(blocks) // 2]]))
    summary = {
        "tokens": int(ids.numel()),
        "cache_build_s": build,
        "cache_mib": qc.nbytes() / 2**20,
        "quick_max_s": max(r["quick_s"] for r in rows),
        "quick_median_s": statistics.median(r["quick_s"] for r in rows),
        "uncached_median_s": statistics.median(r["uncached_s"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "max_kl_diff": max(abs(r["kl_quick"] - r["kl_uncached"]) for r in rows),
        "first_token_s": ttft,
        "threads": torch.get_num_threads(),
        "load_average_1min": __import__("os").getloadavg()[0],
    }
    print(json.dumps(summary, indent=2))
    print(f"goal: quick comparison <= 2 s for any single dropped block: "
          f"{'MET' if summary['quick_max_s'] <= 2 else 'NOT MET'} (max {summary['quick_max_s']:.2f} s)")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
