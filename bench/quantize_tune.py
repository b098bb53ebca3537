"""Choose GPTQ's Hessian shrinkage (issue 7) on a validation set, never on the evaluation split.

The validation windows come from the *calibration* split (the Lee corpus' 300 background articles) with
another sampling seed than the calibration itself, so the evaluation split that bench/quantize.py reports
on stays untouched by the choice. For each shrinkage: GPTQ of every linear of all 30 blocks on the
default calibration, then perplexity on the validation windows.

    python bench/quantize_tune.py [--bits 4] [--observer mse] [--shrinks 0,0.1,0.2,0.4,0.6,0.8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from workbench.engine.data import Calibration, calibration_ids
from workbench.engine.evaluate import perplexity
from workbench.engine.loading import load_model
from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
from workbench.engine.variant import original_variant, view_model

VALIDATION = Calibration(samples=16, seq_len=256, seed=1000)  # 4,096 tokens of the calibration split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--observer", default="mse", choices=["minmax", "mse"])
    ap.add_argument("--shrinks", default="0,0.1,0.2,0.4,0.6,0.8")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    lm = load_model("default", device="auto")
    val = calibration_ids(lm.tokenizer, VALIDATION).to(lm.device)
    calib = Calibration()
    print(f"validation: {val.numel()} tokens of the calibration split ({VALIDATION.to_dict()}); calibration "
          f"{calib.to_dict()}; GPTQ {args.bits}-bit g{args.group_size} asymmetric, observer {args.observer}")
    dense = perplexity(lm.model, val)[0]
    print(f"dense validation ppl {dense:.3f}", flush=True)
    rows = []
    for a in [float(x) for x in args.shrinks.split(",")]:
        ctx = OpContext(lm=lm, calibration=calib)
        step = {"op": "quantize", "method": "gptq", "bits": args.bits, "group_size": args.group_size, "sym": False,
                "observer": args.observer, "hessian_shrink": a}
        v = apply_steps(ctx, original_variant(lm.num_blocks), [step_from_dict(step)])
        p = perplexity(view_model(lm.model, lm.adapter, v), val)[0]
        rows.append({"hessian_shrink": a, "validation_ppl": p})
        print(f"hessian_shrink {a:4.2f}: validation ppl {p:.3f}", flush=True)
    best = min(rows, key=lambda r: r["validation_ppl"])
    print(f"best on validation: hessian_shrink {best['hessian_shrink']}")
    out = Path(args.json_out or f"bench/results/quantize_tune_{args.bits}bit_{args.observer}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "dense": dense, "rows": rows, "best": best}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
