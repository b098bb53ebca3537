"""Plumbing every CLI command shares: the model and load flags, loading the model and replaying a recipe
(`open_session`), the JSON document around a result, and progress on stderr. `workbench.cli` and the
`analyze` command modules import it at their top; it never imports `workbench.cli` (no import cycle)."""

from __future__ import annotations

import argparse
import sys
import time

from workbench import validate as V

SCHEMA_VERSION = 1


class StderrProgress:
    """The CLI's long jobs on stderr: the step in words with the elapsed time while the first block runs,
    then an estimate of the time left from the measured time per block (panels/jobs.Tracker's lines).
    A new step (the words before ':' change, or the fraction goes back) starts a new estimate; `units`
    is the model's block count, set once it is loaded."""

    def __init__(self, stream=None, clock=time.monotonic):
        self.stream, self.clock = stream, clock
        self.units = 1
        self.tracker = None
        self.step = None

    def __call__(self, frac: float, msg: str) -> None:
        from workbench.panels.jobs import Tracker

        step = msg.split(":", 1)[0]
        if self.tracker is None or step != self.step or frac < self.tracker.frac - 1e-9:
            self.tracker, self.step = Tracker(units=self.units, what=msg, clock=self.clock), step
        self.tracker(frac, msg)
        print(f"[{frac * 100:5.1f}%] {self.tracker.line()}", file=self.stream or sys.stderr, flush=True)


stderr_progress = StderrProgress()


def one_line(e: BaseException) -> str:
    """The first line of an error message: bad input is reported as one clear line."""
    lines = [s for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def add_load_args(p: argparse.ArgumentParser) -> None:
    """How the model is loaded: device, precision, pickle permission (every command that loads one)."""
    p.add_argument("--device", type=V.device, default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype: auto = the checkpoint's own (a GGUF: the smallest that holds it exactly)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle .bin weights (runs code!)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="memory each device may hold, e.g. cuda:0=20GiB,cpu=48GiB (default: what is free); "
                        "blocks past it are offloaded and onloaded at their turn")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="where offloaded weights that cannot be memory-mapped from the checkpoint are written")


def load_options(args) -> dict:
    """load_model's keyword arguments from the parsed load flags."""
    return {"device": args.device, "allow_pickle": args.allow_pickle, "dtype": getattr(args, "dtype", "auto"),
            "max_memory": getattr(args, "max_memory", None), "offload_folder": getattr(args, "offload_folder", None)}


def add_model_args(p: argparse.ArgumentParser, recipe: bool = True, calibration: bool = True) -> None:
    p.add_argument("--model", type=V.model, default=None,
                   help="default | local folder | file.gguf | hub id (default: default)")
    add_load_args(p)
    if recipe:
        p.add_argument("--recipe", default=None, help="recipe JSON: analyse/evaluate the variant it makes")
    if calibration:
        p.add_argument("--text", default=None, help="text file for calibration/evaluation (default corpus)")
        p.add_argument("--samples", type=V.positive_int, default=None, help="calibration samples")
        p.add_argument("--seq-len", type=V.positive_int, default=None, help="tokens per sample")
        p.add_argument("--seed", type=V.non_negative_int, default=None, help="calibration sampling seed")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def open_session(args, quiet_calibration: bool = False):
    """Load the model and, if given, apply the recipe. -> (lm, variant, recipe, calibration)."""
    from workbench.engine.data import Calibration
    from workbench.engine.loading import load_model
    from workbench.engine.recipe import Recipe, apply_steps, OpContext
    from workbench.engine.variant import original_variant

    recipe = Recipe.from_file(args.recipe) if getattr(args, "recipe", None) else Recipe()
    spec = args.model or recipe.model or "default"  # --model wins over the recipe's model
    calib = recipe.calibration
    over = {}
    if getattr(args, "text", None):
        over["source"] = args.text
    for flag, key in (("samples", "samples"), ("seq_len", "seq_len"), ("seed", "seed")):
        if getattr(args, flag, None) is not None:
            over[key] = getattr(args, flag)
    if over:
        calib = Calibration(**{**calib.to_dict(), **over})
    lm = load_model(spec, progress=stderr_progress, **load_options(args))
    stderr_progress.units = lm.num_blocks  # the jobs' estimates count blocks
    variant = original_variant(lm.num_blocks)
    if recipe.steps:
        ctx = OpContext(lm=lm, calibration=calib, progress=stderr_progress)
        variant = apply_steps(ctx, variant, recipe.steps, name="recipe")
    recipe.model = spec
    recipe.calibration = calib
    return lm, variant, recipe, calib


def document(command: str, args, lm, recipe, calibration, result: dict, units: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "inputs": {
            "model": lm.spec if lm is not None else getattr(args, "model", None),
            "recipe": recipe.to_dict() if recipe is not None else None,
            "recipe_file": getattr(args, "recipe", None),
            "calibration": calibration.to_dict() if calibration is not None else None,
            "device": str(lm.device) if lm is not None else getattr(args, "device", None),
        },
        "units": units,
        "result": result,
    }
