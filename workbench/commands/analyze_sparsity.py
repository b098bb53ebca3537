"""`workbench analyze sparsity`: perplexity / KL against one-shot sparsity, knee, N:M points, sensitivity.

    workbench analyze sparsity --model M [--recipe R] [--methods magnitude,wanda]
        [--patterns unstructured,2:4] [--points 10] [--max-sparsity 0.9] [--tolerance 0.01]
        [--eval-tokens 2048 | --full] [--sensitivity 0.5] --json
"""

from __future__ import annotations

from workbench import validate as V
from workbench.commands.common import add_model_args, document, open_session, stderr_progress


def add_parser(sub) -> None:
    from workbench.engine.analysis import sparsity as sp

    p = sub.add_parser("sparsity", help="one-shot magnitude / Wanda / N:M sparsity curves and the knee")
    add_model_args(p)
    p.add_argument("--methods", type=V.choices_csv(sp.METHODS), default=("magnitude", "wanda"), help="magnitude,wanda")
    p.add_argument("--patterns", type=V.choices_csv(sp.PATTERNS), default=("unstructured", "2:4"), help="unstructured,2:4,4:8")
    p.add_argument("--points", type=V.positive_int, default=10, help="sparsities from 0 to --max-sparsity (default 10)")
    p.add_argument("--max-sparsity", type=V.fraction, default=0.9)
    p.add_argument("--tolerance", type=V.non_negative_float, default=sp.DEFAULT_TOLERANCE,
                   help="essential sparsity: perplexity within this fraction of dense (default 0.01)")
    p.add_argument("--magnitude-scope", default="global", choices=["global", "layer"])
    p.add_argument("--eval-tokens", type=V.positive_int, default=sp.DEFAULT_EVAL_TOKENS,
                   help="first N tokens of the evaluation split (default 2048)")
    p.add_argument("--full", action="store_true", help="evaluate on the whole evaluation split")
    p.add_argument("--blocks", type=V.block_list, default="", help="comma-separated original block indices (default all)")
    p.add_argument("--sensitivity", type=V.fraction, default=None, metavar="S",
                   help="also the (module type x block) sensitivity grid at sparsity S")
    p.add_argument("--sensitivity-method", default="magnitude", choices=list(sp.METHODS))
    p.set_defaults(func=run)


def run(args) -> dict:
    from workbench.engine.analysis import sparsity as sp
    from workbench.engine.data import calibration_ids_on

    blocks = tuple(args.blocks)
    cfg = sp.SweepConfig(methods=args.methods, patterns=args.patterns, points=args.points,
                         max_sparsity=args.max_sparsity, scope={"magnitude": args.magnitude_scope},
                         eval_tokens=None if args.full else args.eval_tokens, tolerance=args.tolerance,
                         blocks=blocks)
    lm, variant, recipe, calib = open_session(args)
    variant.check_indices(blocks)  # before the sweep, not after it
    cfg = sp.SweepConfig(**{**cfg.__dict__, "source": calib.source})
    ids = calibration_ids_on(lm, calib) if "wanda" in cfg.methods else None
    result = sp.sweep(lm, cfg, variant=variant, calib_ids=ids, progress=stderr_progress)
    if args.sensitivity is not None:
        sids = ids if args.sensitivity_method != "wanda" else calibration_ids_on(lm, calib)
        result["sensitivity"] = sp.sensitivity(lm, args.sensitivity_method, args.sensitivity, variant=variant,
                                               blocks=blocks or None, calib_ids=sids, source=calib.source,
                                               progress=stderr_progress)
    units = {"sparsity": "fraction of block linear weights that are exactly zero (measured)",
             "target_sparsity": "fraction asked for", "ppl": "perplexity (exp mean NLL, nats)",
             "kl": "nats per token, KL(original || pruned)", "top1": "fraction of tokens",
             "seconds": "s", "essential_sparsity": "fraction", "max_curvature_sparsity": "fraction"}
    return document("analyze sparsity", args, lm, recipe, calib, result, units)
