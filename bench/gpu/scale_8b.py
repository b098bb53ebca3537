"""GPU scale check (issue 13), prepared for a session lent a GPU: a Llama-3-8B-shaped random bf16 model
built in-process (not saved), the GPU capped at 20 GiB (a 24 GB card) by
torch.cuda.set_per_process_memory_fraction, then uncapped.

    python bench/gpu/scale_8b.py [--json-out F] [--shape 8b|tiny] [--device cuda:0]

Capped: the memory plan (engine/plan.py) for a 20 GiB GPU keeps the blocks that do not fit in CPU RAM
and accelerate onloads each at its turn; jobs: quick compare of one dropped block, MI scan on 8 x 2048
tokens, GPTQ 4-bit of 4 blocks on 128 x 2048 tokens (timed; extrapolated to 32 blocks), fusion of one
block. Uncapped: the whole model on the GPU, the same quick compare and 4 GPTQ blocks. Goals: the capped
figures equal the uncapped (1e-3 relative in bf16); peak GPU memory of each job under the cap.
Reference, not goal: llm-compressor documents 745 s for GPTQ of Llama-3-8B on one GPU (their hardware).
`--shape tiny` runs the same script on a small model (a smoke test for machines without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

SHAPES = {"8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
          "tiny": dict(hidden_size=256, num_hidden_layers=8, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=4096)}
CAP_BYTES = 20 * 2**30


class Tok:
    """Byte-level stand-in tokenizer: random weights need no real text, only ids."""

    pad_token_id = eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def build(shape: str):
    import transformers as tf

    cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is fast on the GPU
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.to("cpu").eval()


def place(model, device: str, cap: int | None):
    """Wrap the in-memory model under the plan for `device` with `cap` bytes of GPU (None: what is free)."""
    from workbench.engine import plan as P
    from workbench.engine.adapters import adapter_for
    from workbench.engine.loading import wrap_model

    adapter = adapter_for(model)
    parts, blocks = P.module_bytes(model, adapter, torch.bfloat16)
    gpus = P.gpus_for(device)
    budget = {f"cuda:{i}": cap for i in gpus} if cap else {}
    pl = P.make_plan(parts, blocks, adapter.blocks_path, P.working_sets(model.config, torch.bfloat16), gpus,
                     P.free_memory(gpus), budget)
    if pl.device_map is None:
        lm = wrap_model(model, Tok(), spec="8b-shaped", device=torch.device(pl.compute))
    else:
        from accelerate import dispatch_model

        dmap = {k: ("cpu" if v == "disk" else v) for k, v in pl.device_map.items()}  # in memory already
        dispatch_model(model, device_map=dmap, main_device=pl.compute)
        lm = wrap_model(model, Tok(), spec="8b-shaped", device=torch.device(pl.compute), placed=True)
    lm.plan = pl
    return lm


def run_jobs(lm, jobs, ids_scan, ids_gptq, out):
    from workbench.engine import evaluate as ev
    from workbench.engine.analysis import influence
    from workbench.engine.ops import quantize as Q
    from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
    from workbench.engine.variant import original_variant

    n = lm.num_blocks
    v0 = original_variant(n)

    def job(name, fn):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        value = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        out[name] = {"seconds": dt, "peak_gpu_bytes": peak}
        print(f"  {name:8s} {dt:8.1f} s  peak GPU {peak / 2**30:6.2f} GiB", flush=True)
        return value

    if "quick" in jobs:
        out["quick_result"] = job("quick", lambda: ev.quick_eval(lm, v0.with_dropped([n // 2])))
    if "scan" in jobs:
        out["scan_result"] = job("scan", lambda: influence.block_scores(lm, v0, ids_scan, metric="mi"))
    if "gptq" in jobs:
        ctx = OpContext(lm=lm, _calib_ids=ids_gptq.to(lm.device))  # the prepared 128 x 2048 tokens
        step = step_from_dict({"op": "quantize", "method": "gptq", "bits": 4, "group_size": 128, "blocks": [0, 1, 2, 3]})
        v = job("gptq", lambda: apply_steps(ctx, v0, [step]))
        out["gptq_extrapolated_32_blocks_s"] = out["gptq"]["seconds"] / 4 * 32
        out["gptq_result"] = v.reports[-1]["total"]
        del v
    if "fuse" in jobs:
        ctx = OpContext(lm=lm)  # the fusion step draws its 16 x 512 windows from the default corpus
        step = step_from_dict({"op": "fuse_blocks", "blocks": [n // 2], "steps": 8, "samples": 16, "seq_len": 512})
        v = job("fuse", lambda: apply_steps(ctx, v0, [step]))
        out["fuse_result"] = {k: v.reports[-1].get(k) for k in ("loss_start", "loss_end") if k in v.reports[-1]}
        del v
    del Q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--jobs", default="quick,scan,gptq,fuse", help="capped jobs (the uncapped run: quick, gptq)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    big = args.shape == "8b"
    ids_scan = torch.randint(0, vocab, (8, 2048 if big else 128), generator=g)
    ids_gptq = torch.randint(0, vocab, (128 if big else 16, 2048 if big else 128), generator=g)
    res = {"shape": args.shape, "device": args.device, "load": os.getloadavg()[0]}
    t0 = time.perf_counter()
    model = build(args.shape)
    res["build_s"] = time.perf_counter() - t0
    print(f"built {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters) in "
          f"{res['build_s']:.0f} s", flush=True)
    on_gpu = args.device.startswith("cuda") and torch.cuda.is_available()
    if on_gpu:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    t0 = time.perf_counter()
    lm = place(model, args.device, CAP_BYTES if on_gpu else None)
    res["capped"] = {"plan": lm.plan.lines(), "place_s": time.perf_counter() - t0}
    print("capped: " + " | ".join(lm.plan.lines()[:3]), flush=True)
    run_jobs(lm, tuple(args.jobs.split(",")), ids_scan, ids_gptq, res["capped"])
    if on_gpu:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(lm.model, recurse=True)
        del lm
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        lm = place(model.to("cpu"), args.device, None)
        res["uncapped"] = {"plan": lm.plan.lines()}
        print("uncapped: " + " | ".join(lm.plan.lines()[:2]), flush=True)
        run_jobs(lm, ("quick", "gptq"), ids_scan, ids_gptq, res["uncapped"])
        c, u = res["capped"], res["uncapped"]
        for k in ("kl", "top1"):
            rel = abs(c["quick_result"][k] - u["quick_result"][k]) / max(abs(u["quick_result"][k]), 1e-12)
            print(f"quick {k}: capped {c['quick_result'][k]:.6g} uncapped {u['quick_result'][k]:.6g} (rel {rel:.2e})")
        print(f"GPTQ error: capped {c['gptq_result']['error']:.6g} uncapped {u['gptq_result']['error']:.6g}; "
              f"32 blocks extrapolated: capped {c['gptq_extrapolated_32_blocks_s']:.0f} s, "
              f"uncapped {u['gptq_extrapolated_32_blocks_s']:.0f} s (llm-compressor documents 745 s, other hardware)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
