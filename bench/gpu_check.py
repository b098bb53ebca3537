"""GPU self-check: the engine's paths on CUDA agree with the CPU, and GPU timings side by side.

Run where a CUDA GPU is present (the lead runs it on a lent H100/H200):

    python bench/gpu_check.py [--json-out bench/results/gpu_check.json]

Models are random (built from configs; nothing is downloaded): a tiny Llama and GPT-2 for agreement
checks, and a Llama with SmolLM2-135M's shape for timings. Each section prints PASS/FAIL and goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import tiny_model  # noqa: E402
from workbench.engine import evaluate as ev  # noqa: E402
from workbench.engine.export import export_variant  # noqa: E402
from workbench.engine.loading import resolve_device, wrap_model  # noqa: E402
from workbench.engine.recipe import OpContext, apply_steps, step_from_dict  # noqa: E402
from workbench.engine.variant import original_variant, view_model  # noqa: E402

RESULTS: dict = {}


class Tok:
    pad_token_id = 0
    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [b % 256 for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return ""

    def save_pretrained(self, path):
        Path(path, "tok.txt").write_text("bytes")


def section(name):
    def deco(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                out = fn(*a, **k)
                RESULTS[name] = {"ok": True, "seconds": time.perf_counter() - t0, **(out or {})}
                print(f"PASS {name} ({time.perf_counter() - t0:.1f} s) {json.dumps(out or {}, default=str)}", flush=True)
            except Exception as e:  # report and go on to the next section
                RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()

        return run

    return deco


def pair(family, layers=4, seed=0):
    cpu = wrap_model(tiny_model(family, layers, seed), Tok(), spec=f"tiny-{family}", device="cpu")
    gpu = wrap_model(tiny_model(family, layers, seed), Tok(), spec=f"tiny-{family}", device="cuda")
    return cpu, gpu


def smol_shaped(device):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    return wrap_model(tf.AutoModelForCausalLM.from_config(cfg), Tok(), spec="smol-shaped", device=device)


@section("core: variant logits, quick eval and KV-cache generation agree with CPU")
def core():
    out = {}
    for fam in ("llama", "gpt2", "opt"):
        cpu, gpu = pair(fam)
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        v = original_variant(4).with_dropped([1])
        a = view_model(cpu.model, cpu.adapter, v)(input_ids=ids).logits
        b = view_model(gpu.model, gpu.adapter, v)(input_ids=ids.cuda()).logits.cpu()
        out[f"{fam}_max_logit_diff"] = (a - b).abs().max().item()
        assert out[f"{fam}_max_logit_diff"] < 1e-3
        g = view_model(gpu.model, gpu.adapter, v).generate(
            input_ids=ids[:1, :8].cuda(), attention_mask=torch.ones(1, 8, dtype=torch.long, device="cuda"),
            max_new_tokens=6, do_sample=False)
        assert g.device.type == "cuda" and g.shape[1] == 14
    return out


@section("export from a CUDA variant reloads with the same logits")
def export_roundtrip():
    from transformers import AutoModelForCausalLM

    _, gpu = pair("llama")
    v = original_variant(4).with_dropped([2])
    ids = torch.randint(0, 256, (1, 16)).cuda()
    want = view_model(gpu.model, gpu.adapter, v)(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as d:
        out = export_variant(gpu, v, Path(d) / "x", {"steps": []})
        m = AutoModelForCausalLM.from_pretrained(out).cuda().eval()
        got = m(input_ids=ids).logits
    diff = (want - got).abs().max().item()
    assert diff < 1e-4
    return {"max_logit_diff": diff}


@section("quick eval on a SmolLM2-shaped model: cached vs uncached, GPU")
def quick_timing():
    lm = smol_shaped("cuda")
    ids = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(0)).cuda()
    ev.data.quick_ids = lambda tok, source="default": ids.cpu()
    qc = ev.quick_cache(lm)
    n = lm.num_blocks
    rows = []
    for b in (0, 15, 29):
        v = original_variant(n).with_dropped([b])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ev.quick_eval(lm, v, reference=qc)
        torch.cuda.synchronize()
        rows.append(time.perf_counter() - t0)
    return {"quick_s_blocks_0_15_29": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-out", default="bench/results/gpu_check.json")
    args = ap.parse_args()
    dev = resolve_device("auto")
    print(f"device: {dev} {torch.cuda.get_device_name(0) if dev.type == 'cuda' else ''} torch {torch.__version__}")
    if dev.type != "cuda":
        print("no CUDA GPU here: nothing to check")
        return 0
    core()
    export_roundtrip()
    quick_timing()
    for extra in EXTRA:
        extra()
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(RESULTS, indent=2, default=str))
    failed = [k for k, v in RESULTS.items() if not v["ok"]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


@section("quantize (GPTQ 4-bit g32, also with mse scales + Hessian shrink + true sequential, and RTN) on CUDA agrees with CPU")
def quantize_check():
    from workbench.engine.data import Calibration

    cpu, gpu = pair("llama")
    out = {}
    variants = {"rtn": {"method": "rtn"}, "gptq": {"method": "gptq"},
                "gptq_mse_shrink_trueseq": {"method": "gptq", "observer": "mse", "hessian_shrink": 0.4,
                                            "true_sequential": True}}
    for method, opts in variants.items():
        step = step_from_dict({"op": "quantize", **opts, "bits": 4, "group_size": 32, "sym": False,
                               "blocks": [0, 1, 2, 3]})
        ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
        logits = []
        for lm in (cpu, gpu):
            ctx = OpContext(lm=lm, calibration=Calibration(samples=4, seq_len=32))
            ctx._calib_ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)).to(lm.device)
            v = apply_steps(ctx, original_variant(4), [step])
            logits.append(view_model(lm.model, lm.adapter, v)(input_ids=ids.to(lm.device)).logits.float().cpu())
        dense = cpu.model(input_ids=ids).logits.float()
        out[f"{method}_cpu_gpu_max_diff"] = (logits[0] - logits[1]).abs().max().item()
        out[f"{method}_vs_dense_max_diff"] = (logits[0] - dense).abs().max().item()
        # the CPU/GPU gap must be far below the quantization error itself
        assert out[f"{method}_cpu_gpu_max_diff"] < 0.05 * out[f"{method}_vs_dense_max_diff"] + 1e-3
    return out


@section("quantize timing: GPTQ 4-bit g64 of every block of a SmolLM2-shaped model on the GPU")
def quantize_timing():
    from workbench.engine.data import Calibration

    lm = smol_shaped("cuda")
    ctx = OpContext(lm=lm, calibration=Calibration(samples=32, seq_len=512))
    ctx._calib_ids = torch.randint(0, 49152, (32, 512), generator=torch.Generator().manual_seed(1)).cuda()
    step = step_from_dict({"op": "quantize", "method": "gptq", "bits": 4, "group_size": 64, "sym": False,
                           "blocks": list(range(lm.num_blocks))})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    apply_steps(ctx, original_variant(lm.num_blocks), [step])
    torch.cuda.synchronize()
    return {"gptq_30_blocks_16k_tokens_s": time.perf_counter() - t0}


@section("fuse self-check (fp32 and bf16 autocast) on CUDA")
def fuse_check():
    from self_checks import gpu_self_check

    r = gpu_self_check("cuda")
    assert r["ok"], r
    return r


@section("sparsity masks on CUDA equal CPU")
def sparsity_check():
    from self_checks import sparsity_self_check

    r = sparsity_self_check("cuda")
    assert r["ok"], r
    return r


EXTRA: list = [quantize_check, quantize_timing, fuse_check, sparsity_check]

if __name__ == "__main__":
    raise SystemExit(main())
