"""`workbench analyze influence`: per-block importance values (and, later, removal plans)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from workbench.cli import add_model_args

    p = sub.add_parser("influence", help="per-block importance (block influence and peers)")
    add_model_args(p)
    p.add_argument("--metric", default="bi", help="bi (more as they land)")
    p.set_defaults(func=run)


def run(args) -> dict:
    from workbench.cli import document, open_session
    from workbench.engine.analysis.influence import block_scores
    from workbench.engine.data import calibration_ids

    lm, variant, recipe, calib = open_session(args)
    ids = calibration_ids(lm.tokenizer, calib).to(lm.device)
    result = block_scores(lm, variant, ids, args.metric)
    return document("analyze influence", args, lm, recipe, calib, result, {"values": "dimensionless"})
