"""Do fusion's defaults keep their promise? (issue 16) Fuse single blocks of the default model, one at a
time on the original, with the settings the app's fuse mode uses, and compare each with plain removal of
the same block on the quick set (KL against the original, top-1 agreement).

Goal: fused beats plain removal (lower quick KL) for at least 8 of 10 blocks (every third block), at no
more wall time per block than the 181 s measured before (issue 16).

    python bench/fuse_defaults.py [--blocks 0,3,...,27] [--set rank=8 --set loss=kl ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from workbench.engine import evaluate as ev
from workbench.engine.data import Calibration
from workbench.engine.loading import load_model
from workbench.engine.ops.fuse import FuseBlocks
from workbench.engine.recipe import OpContext
from workbench.engine.variant import original_variant


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--blocks", default="", help="comma-separated original indices (default: every third)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a fuse_blocks field (default: the app's fuse mode settings)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared CPU)")
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from workbench.panels.blocks import FUSE_DEFAULTS  # what the app's fuse mode applies

    lm = load_model(args.model, device="cpu")
    v0 = original_variant(lm.num_blocks)
    blocks = [int(b) for b in args.blocks.split(",") if b.strip()] or list(range(0, lm.num_blocks, 3))
    settings = dict(FUSE_DEFAULTS)
    settings.update({k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
    print(f"model {lm.name}, {lm.num_blocks} blocks; fuse settings {settings}; threads {args.threads}; "
          f"load average at start {os.getloadavg()}", flush=True)
    ctx = OpContext(lm=lm, calibration=Calibration())
    qc = ev.quick_cache(lm)  # the original's side of every comparison, built once
    rows = []
    print("| block | removal KL | fused KL | removal top-1 | fused top-1 | fused better | s/block | load avg (1 min) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for b in blocks:
        qp = ev.quick_eval(lm, v0.with_dropped([b]), reference=qc)
        t0 = time.perf_counter()
        fused, report, _ = FuseBlocks(blocks=(b,), **settings).apply(ctx, v0)
        sec = time.perf_counter() - t0
        qf = ev.quick_eval(lm, fused, reference=qc)
        win = qf["kl"] < qp["kl"]
        load = os.getloadavg()[0]
        rows.append({"block": b, "removal": qp, "fused": qf, "better": win, "seconds": sec, "load1": load,
                     "report": {k: v for k, v in report["per_block"][0].items() if k != "history"}})
        print(f"| {b} | {qp['kl']:.4f} | {qf['kl']:.4f} | {qp['top1']:.1%} | {qf['top1']:.1%} | "
              f"{'yes' if win else 'no'} | {sec:.0f} | {load:.2f} |", flush=True)
    wins = sum(r["better"] for r in rows)
    secs = [r["seconds"] for r in rows]
    print(f"\nfused better than removal for {wins} of {len(rows)} blocks (goal >= 8 of 10); "
          f"s/block mean {sum(secs) / len(secs):.0f}, max {max(secs):.0f} (goal <= 181); "
          f"load average at end {os.getloadavg()}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"settings": settings, "rows": rows, "wins": wins}, indent=2, default=str))


if __name__ == "__main__":
    main()
