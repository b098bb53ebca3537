"""`workbench analyze attention|outliers|map|attribution`: the views that say why a block or head matters.

All four run on the original or, with --recipe, on the variant the recipe makes. attention and
attribution read a prompt: --prompt TEXT, --prompt @FILE, or else the text of --text FILE (cropped to
its last --max-tokens tokens). outliers and map read calibration windows of --text FILE (default corpus).
"""

from __future__ import annotations

from pathlib import Path

from workbench import validate as V
from workbench.commands.common import add_model_args, document, open_session, stderr_progress


def _prompt(args) -> str | None:
    """--prompt TEXT (or @FILE) wins; else the text of --text FILE is the prompt; else the built-in one."""
    from workbench.engine.errors import DataError

    p = getattr(args, "prompt", None)
    path = Path(p[1:]) if p and p.startswith("@") else None
    if p is None and getattr(args, "text", None):
        path = Path(args.text)
    if path is None:
        return p
    path = path.expanduser()
    if not path.is_file():
        raise DataError(f"no such prompt file: {path}")
    return path.read_text(encoding="utf-8", errors="replace")


def add_parser(sub) -> None:
    p = sub.add_parser("attention", help="attention maps of a prompt and token PageRank (Zero-TPrune)")
    add_model_args(p)
    p.add_argument("--prompt", default=None, help="prompt text, or @FILE (default: a built-in sentence)")
    p.add_argument("--max-tokens", type=V.positive_int, default=512, help="crop the prompt to its last N tokens (512)")
    p.add_argument("--damping", type=V.fraction, default=0.85, help="PageRank damping d; 1 = no teleport (0.85)")
    p.add_argument("--skip-first", action="store_true", help="leave the first (sink) token out of PageRank")
    p.add_argument("--tol", type=V.positive_float, default=1e-6, help="PageRank L1 tolerance (1e-6)")
    p.add_argument("--maps", action="store_true", help="include the head-averaged maps per layer in the JSON")
    p.set_defaults(func=run_attention)

    p = sub.add_parser("outliers", help="activation inf-norm/kurtosis per block and module; no-op heads")
    add_model_args(p)
    p.add_argument("--top-k", type=V.positive_int, default=8, help="outlier hidden dimensions listed per module (8)")
    p.set_defaults(func=run_outliers)

    p = sub.add_parser("map", help="2-D UMAP (PCA below 15 points) of blocks and heads")
    add_model_args(p)
    p.set_defaults(func=run_map)

    p = sub.add_parser("attribution", help="integrated-gradients token attributions, original vs variant")
    add_model_args(p)
    p.add_argument("--prompt", default=None, help="prompt text, or @FILE (default: a built-in sentence)")
    p.add_argument("--target", default=None, help="next token (text or id); default: original's greedy token")
    p.add_argument("--steps", type=V.positive_int, default=32,
                   help="integration steps of the first try (32); doubled while not converged, up to --max-steps")
    p.add_argument("--max-steps", type=V.positive_int, default=256,
                   help="most integration steps when doubling (256); equal to --steps for one try only")
    p.add_argument("--max-tokens", type=V.positive_int, default=32, help="crop the prompt to its last N tokens (32)")
    p.add_argument("--output", default="logprob", choices=["logprob", "logit"], help="what is attributed")
    p.set_defaults(func=run_attribution)


def run_attention(args) -> dict:
    from workbench.engine.analysis.attention import analyze_attention

    lm, variant, recipe, calib = open_session(args)
    cap, rep = analyze_attention(
        lm, variant, _prompt(args), args.max_tokens, args.damping, args.skip_first, args.tol, progress=stderr_progress
    )
    if args.maps:
        rep["head_average_maps"] = cap.probs.mean(1).tolist()  # [layer][query][key]
    units = {"pagerank": "share of total score (sums to 1 per head)", "first_token_mass": "fraction of attention",
             "entropy": "fraction of the maximum (log visible keys)"}
    return document("analyze attention", args, lm, recipe, None, rep, units)


def run_outliers(args) -> dict:
    from workbench.engine.analysis.outliers import outlier_blocks, outlier_stats
    from workbench.engine.data import calibration_ids_on

    lm, variant, recipe, calib = open_session(args)
    ids = calibration_ids_on(lm, calib)
    result = outlier_stats(lm, variant, ids, top_k=args.top_k, progress=stderr_progress)
    result["outlier_blocks"] = outlier_blocks(result)
    units = {"inf_norm": "activation units (max |x| per sample, mean over samples)",
             "kurtosis": "mu4/sigma^4 (Gaussian = 3)", "noop_first": "fraction of attention",
             "noop_delim": "fraction of attention"}
    return document("analyze outliers", args, lm, recipe, calib, result, units)


def run_map(args) -> dict:
    from workbench.engine.analysis.embedding_map import analyze_map
    from workbench.engine.data import calibration_ids_on

    lm, variant, recipe, calib = open_session(args)
    ids = calibration_ids_on(lm, calib)
    result = analyze_map(lm, variant, ids, seed=calib.seed, progress=stderr_progress)
    return document("analyze map", args, lm, recipe, calib, result, {"xy": "arbitrary embedding units"})


def run_attribution(args) -> dict:
    from workbench.engine.analysis.attribution import analyze_attribution

    lm, variant, recipe, calib = open_session(args)
    result = analyze_attribution(
        lm, variant, _prompt(args), args.target, args.steps, args.max_tokens, args.output, progress=stderr_progress,
        max_steps=args.max_steps,
    )
    units = {"attributions": f"{args.output} of the target token (nats)" if args.output == "logprob" else "logit",
             "delta": "same unit as attributions", "seconds": "s"}
    return document("analyze attribution", args, lm, recipe, None, result, units)
