"""Scale bench (issue 13): random Llama-shaped bf16 checkpoints of ~0.4B / 1.1B / 3B parameters, the jobs
people run on them, wall time and peak memory as a ratio to the checkpoint's bytes.

    python bench/scale.py --sizes 0.4b,1.1b [--offload] [--workdir DIR] [--jobs load,quick,scan,rtn,gptq,export]

Each model is built and saved in bf16 by a child process (once; kept in --workdir), then measured in a
fresh child process so the memory figures are that process's own: the peak RSS minus the RSS right
after the imports (torch + transformers alone take 0.4-0.6 GiB; the architecture's modeling module, which
transformers imports lazily, counted with them and printed separately), sampled every 20 ms; with --offload
(weights memory-mapped, --max-memory allowing a quarter of the model beside the working set) the peak
anonymous RSS (RssAnon), since mapped file pages count in RSS once touched. The machine is shared: the
load average is printed beside every figure. The vocabulary is the default model's tokenizer's (49152).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = {  # hidden, layers, intermediate, heads, kv heads (the shapes)
    "0.4b": (1024, 24, 2816, 16, 16),
    "1.1b": (2048, 22, 5632, 32, 4),
    "3b": (3072, 28, 8192, 24, 8),
}
JOBS = ("load", "quick", "scan", "export", "rtn", "gptq")  # export before the quantizers: its peak is its own
GiB = 2**30


def build(size: str, folder: Path) -> None:
    """Save a random bf16 Llama of `size` with the default model's tokenizer into `folder` (child process)."""
    import shutil

    import torch
    import transformers as tf

    from workbench.engine.loading import convert_gguf, default_gguf_path

    d, n, ff, h, kv = SIZES[size]
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=d, intermediate_size=ff, num_hidden_layers=n,
                         num_attention_heads=h, num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    src = convert_gguf(default_gguf_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    os.replace(tmp, folder)


class Peak:
    """Samples VmRSS and RssAnon of this process every 20 ms; `mark()` starts a job's window."""

    def __init__(self):
        self.base = self._read()
        self.peak = dict(self.base)
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    @staticmethod
    def _read() -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                out[k] = int(v.split()[0]) * 1024
        return out

    def _loop(self):
        while not self._stop:
            now = self._read()
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.02)

    def mark(self):
        self.peak = self._read()

    def over_base(self) -> dict:
        now = self._read()
        return {k: max(self.peak[k], now[k]) - self.base[k] for k in self.base}


def measure(folder: Path, jobs: list[str], offload: bool) -> dict:
    """Run the jobs on the checkpoint in this process; -> figures (child process)."""
    import torch

    from workbench.engine import evaluate as ev
    from workbench.engine import plan as P
    from workbench.engine.analysis import influence
    from workbench.engine.data import Calibration, calibration_ids
    from workbench.engine.export import export_variant
    from workbench.engine.loading import load_model
    from workbench.engine.recipe import OpContext, apply_steps, step_from_dict, variant_recipe
    from workbench.engine.variant import original_variant

    torch.set_num_threads(2)
    ckpt = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    peak = Peak()
    # "The imports" include the architecture's own transformers module, which transformers imports lazily
    # at the first load (about 130 MiB of code and its dependencies for Llama): counted as imports, not as
    # the load's memory. Both figures are printed: "incl. modeling import" adds it back.
    import importlib

    import transformers as tf

    mt = tf.AutoConfig.from_pretrained(folder).model_type
    before = peak.base
    importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    peak.base = peak._read()
    lazy = {k: peak.base[k] - before[k] for k in before}
    key = "RssAnon" if offload else "VmRSS"
    out = {"checkpoint_bytes": ckpt, "memory": key, "jobs": {}, "modeling_import_bytes": lazy[key]}
    print(f"  the {mt} modeling module's import: {lazy[key] / 2**20:.0f} MiB ({key}), counted with the imports",
          flush=True)

    def job(name, fn, figures=None):
        """Run fn() as job `name`; figures(value) -> what it computed, for the --offload run to compare."""
        peak.mark()
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        mem = peak.over_base()
        if figures is not None:
            out.setdefault("figures", {})[name] = figures(value)
        out["jobs"][name] = {"seconds": dt, "peak_bytes": mem[key], "ratio": mem[key] / ckpt,
                             "rss_ratio": mem["VmRSS"] / ckpt, "ratio_incl_modeling_import": (mem[key] + lazy[key]) / ckpt,
                             "load": os.getloadavg()[0]}
        print(f"  {name:7s} {dt:8.1f} s  peak {mem[key] / GiB:6.2f} GiB = {mem[key] / ckpt:5.2f}x checkpoint "
              f"({'RssAnon' if offload else 'RSS'}; RSS {mem['VmRSS'] / ckpt:4.2f}x; incl. modeling import "
              f"{(mem[key] + lazy[key]) / ckpt:4.2f}x)  load {os.getloadavg()[0]:.1f}", flush=True)
        return value

    opts = {}
    if offload:
        whole = P.module_bytes  # sizes from the meta model: a quarter of the blocks in RAM
        from workbench.engine.adapters import adapter_for

        cfg = tf.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            meta = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        parts, blocks = whole(meta, adapter_for(meta), torch.bfloat16)
        work = max(P.working_sets(cfg, torch.bfloat16).values())
        cap = int(work + (sum(parts.values()) + sum(blocks) / 4) * P.LOAD_OVERHEAD)
        opts = {"max_memory": f"cpu={cap}B"}
        out["max_memory"] = cap
    lm = job("load", lambda: load_model(str(folder), device="cpu", **opts))
    out["plan"] = lm.plan.kind
    out["dtype"] = str(lm.storage_dtype)
    out["parameters"] = lm.num_params()
    print(f"  plan {lm.plan.kind}: " + "; ".join(lm.plan.lines()[1:3]), flush=True)
    n = lm.num_blocks
    out["blocks"] = n
    v0 = original_variant(n)
    calib = Calibration(samples=16, seq_len=256)
    if "quick" in jobs:
        job("quick", lambda: ev.quick_eval(lm, v0.with_dropped([n // 2])), lambda r: [r["kl"], r["top1"]])
    if "scan" in jobs:
        ids = calibration_ids(lm.tokenizer, Calibration(samples=4, seq_len=64))
        job("scan", lambda: influence.block_scores(lm, v0, ids, metric="mi"), lambda r: r["values"])
    ctx = OpContext(lm=lm, calibration=calib)
    if "export" in jobs:
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            def prune_export():
                v = apply_steps(ctx, v0, [step_from_dict({"op": "prune_blocks", "blocks": [n // 2, n // 2 + 1]})])
                return export_variant(lm, v, Path(tmp) / "out", variant_recipe(lm, v, calib))

            exported = job("export", prune_export)
            files = list(Path(exported).glob("*.safetensors"))
            out["export_bytes"] = sum(f.stat().st_size for f in files)
            block = (ckpt - _non_block_bytes(lm)) / n
            expect = ckpt - 2 * block
            out["export_vs_expected"] = out["export_bytes"] / expect
            cfg = json.loads((Path(exported) / "config.json").read_text())
            out["export_dtype"] = cfg.get("dtype") or cfg.get("torch_dtype")
            print(f"  export {out['export_bytes'] / GiB:.2f} GiB in {out['export_dtype']}, "
                  f"{out['export_vs_expected']:.4f}x the checkpoint minus 2 blocks", flush=True)
    if "rtn" in jobs:
        step = step_from_dict({"op": "quantize", "method": "rtn", "bits": 4, "group_size": 128})
        v = job("rtn", lambda: apply_steps(ctx, v0, [step]), _weight_sums)
        del v
    if "gptq" in jobs:
        step = step_from_dict({"op": "quantize", "method": "gptq", "bits": 4, "group_size": 128, "blocks": [0, 1]})
        v = job("gptq", lambda: apply_steps(ctx, v0, [step]), _weight_sums)
        del v
    return out


def _weight_sums(variant) -> list[float]:
    """Per replaced block, the float64 sum of |w| over its floating-point tensors (a fingerprint of the
    quantized weights: equal under every plan when the quantizer computed the same codes)."""
    import torch

    out = []
    for i in sorted(variant.overrides):
        m = variant.overrides[i]
        if isinstance(m, torch.nn.Module):
            out.append(float(sum(t.detach().double().abs().sum() for t in m.state_dict().values() if t.is_floating_point())))
    return out


def compare_figures(ram: dict, offl: dict, rel: float = 1e-4) -> list[str]:
    """Lines saying, per job, the largest relative difference of the offloaded run's figures to the RAM run's."""
    lines = []
    for name, want in ram.get("figures", {}).items():
        got = offl.get("figures", {}).get(name)
        if got is None:
            continue
        pairs = [(a, b) for a, b in zip(want, got) if a is not None and b is not None]
        worst = max((abs(a - b) / max(abs(a), 1e-12) for a, b in pairs), default=0.0)
        lines.append(f"{name}: {len(pairs)} figures, largest relative difference {worst:.1e} "
                     f"({'within' if worst <= rel else 'NOT within'} {rel:g})")
    return lines


def _read_through(folder: Path) -> float:
    """Read the checkpoint's files once (into the OS page cache, where later mapped reads find them). -> s"""
    t0 = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t0


def _non_block_bytes(lm) -> int:
    blocks = {id(p) for b in lm.adapter.blocks(lm.model) for p in b.parameters()}
    return sum(p.numel() * 2 for p in lm.model.parameters() if id(p) not in blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.4b,1.1b")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--offload", action="store_true", help="weights memory-mapped, a quarter of the model in RAM")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "workbench-scale"))
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--compare-to", default=None, help="an earlier run's --json-out: compare this run's figures to it")
    ap.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    jobs = [j for j in args.jobs.split(",") if j]
    if args._build:
        build(args._build, Path(args.workdir) / args._build)
        return
    if args._measure:
        res = measure(Path(args.workdir) / args._measure, jobs, args.offload)
        print("RESULT " + json.dumps(res), flush=True)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in args.sizes.split(","):
        folder = work / size
        if not (folder / "config.json").is_file():
            print(f"building {size} (random bf16, saved once in {folder})", flush=True)
            subprocess.run([sys.executable, __file__, "--_build", size, "--workdir", str(work)], check=True)
        warm = _read_through(folder)  # the checkpoint in the page cache: the jobs' times are compute, not disk
        print(f"{size}: {'offloaded (weights memory-mapped)' if args.offload else 'in RAM'}; checkpoint read once "
              f"into the page cache ({warm:.0f} s); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        cmd = [sys.executable, __file__, "--_measure", size, "--workdir", str(work), "--jobs", ",".join(jobs)]
        p = subprocess.Popen(cmd + (["--offload"] if args.offload else []), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        for line in p.stdout:  # each job's figures as they come
            if line.startswith("RESULT "):
                results[size] = json.loads(line[7:])
            else:
                print(line, end="", flush=True)
        if p.wait() != 0:
            raise SystemExit(f"{size}: the measuring process failed (exit {p.returncode}); run it alone to see why")
    base = None
    for size, r in results.items():  # time per parameter, relative to the smallest model's
        # the scan runs P(P-1)/2 block passes: its time is per parameter x block
        per = {j: v["seconds"] / r["parameters"] / (r.get("blocks", 1) if j == "scan" else 1) for j, v in r["jobs"].items()}
        base = base or per
        print(f"{size}: time per parameter (scan: per parameter x block) vs {next(iter(results))}: "
              + ", ".join(f"{j} {per[j] / base[j]:.2f}x" for j in per if j in base))
    if args.compare_to:  # an in-RAM run's JSON: are the figures the same under this plan?
        ram = json.loads(Path(args.compare_to).read_text())
        for size, r in results.items():
            if size in ram:
                print(f"{size} vs {args.compare_to}: " + "; ".join(compare_figures(ram[size], r)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
