"""`workbench analyze influence`: per-block importance values and, with --iterative K, a removal plan.

    workbench analyze influence --model M [--recipe R] --metric mi|bi|angular|ppl [--iterative K]
        [--samples N] [--seq-len T] [--text FILE] [--last-token] --json
"""

from __future__ import annotations

from workbench import validate as V
from workbench.commands.common import add_model_args, document, open_session, stderr_progress
from workbench.engine.analysis.influence import SCAN_SAMPLES as INFLUENCE_SAMPLES  # noqa: F401
from workbench.engine.analysis.influence import SCAN_SEQ_LEN as INFLUENCE_SEQ_LEN  # noqa: F401


def add_parser(sub) -> None:
    from workbench.engine.analysis.influence import METRICS

    p = sub.add_parser("influence", help="per-block importance (Macro Influence, BI, angular, ppl drop)")
    add_model_args(p)
    p.add_argument("--metric", default="mi", choices=sorted(METRICS), help="which metric (default: mi)")
    p.add_argument("--iterative", type=V.positive_int, default=None, metavar="K",
                   help="also plan the removal of K blocks (iterative for mi and ppl, one-shot for bi/angular)")
    p.add_argument("--last-token", action="store_true",
                   help="angular: average over the last token only, as Gromov et al. do (default: every token)")
    p.set_defaults(func=run)


def run(args) -> dict:
    from workbench.engine.analysis.influence import ITERATIVE, angular_distances, block_scores, removal_plan
    from workbench.engine.data import calibration_ids_on

    if args.samples is None and args.recipe is None:
        args.samples = INFLUENCE_SAMPLES
    if args.seq_len is None and args.recipe is None:
        args.seq_len = INFLUENCE_SEQ_LEN
    lm, variant, recipe, calib = open_session(args)
    ids = calibration_ids_on(lm, calib)
    plan = None
    if args.iterative is not None:
        plan = removal_plan(lm, variant, ids, args.metric, args.iterative, progress=stderr_progress)
    if plan is not None and args.metric in ITERATIVE:
        # the plan's first step scored every block of the variant: no second scan
        result = {"metric": args.metric, "values": plan["steps"][0],
                  "unit": plan["unit"], "block_passes": plan["block_passes"], "seconds": plan["seconds"]}
    else:
        result = block_scores(lm, variant, ids, args.metric, progress=stderr_progress, last_token=args.last_token)
    result["higher_is_more_important"] = True  # kept in the JSON for outside scripts; true of every metric
    if args.metric == "angular":
        result["runs"] = angular_distances(lm, variant, ids, last_token=args.last_token)
    if plan is not None:
        result["order"] = plan["order"]
        result["plan"] = plan
    units = {"values": result["unit"], "seconds": "s", "block_passes": "block calls on the calibration batch"}
    return document("analyze influence", args, lm, recipe, calib, result, units)

