"""Recipes: a JSON object that replays a variant.

    {"model": "default",
     "calibration": {"source": "default", "samples": 8, "seq_len": 128, "seed": 0},
     "steps": [{"op": "prune_blocks", "blocks": [10, 11]}]}

Each step is a frozen dataclass registered under its `op` name (validated on construction, with an
error naming the field). Block indices always refer to the original model's 0-based blocks. A step that
resolves a choice at run time records what it resolved to (`resolved` in `apply`), so an exported
recipe replays exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from .data import Calibration, calibration_ids_on
from .errors import Cancelled, DataError, RecipeError
from .loading import DEFAULT_MODEL, LoadedModel
from .variant import Variant

# 2: calibration windows open with the tokenizer's BOS where it adds one (`calibration.bos`); a recipe of
# version 1 (or without a version) replays with its old windows (bos false).
RECIPE_VERSION = 2
MAX_RECIPE_BYTES = 4 * 2**20  # a recipe is a few kB; anything this large is not one
MAX_RECIPE_DEPTH = 16  # a recipe nests 4 deep; deeper JSON is refused before the parser recurses
OPS: dict[str, type["Step"]] = {}
# Modules that define steps; each registers its ops on import.
OP_MODULES = ["prune", "quantize", "fuse", "sparsify"]


def register(cls):
    """Class decorator: make a Step subclass reachable by its `op` name."""
    OPS[cls.op] = cls
    return cls


def _load_ops() -> None:
    for name in OP_MODULES:
        importlib.import_module(f"{__package__}.ops.{name}")


@dataclass
class OpContext:
    """What a step may use: the loaded model, calibration, progress and cancellation."""

    lm: LoadedModel
    calibration: Calibration = field(default_factory=Calibration)
    progress: Callable[[float, str], None] | None = None
    cancel: threading.Event | None = None
    _calib_ids: torch.Tensor | None = None

    def calib_ids(self) -> torch.Tensor:
        if self._calib_ids is None:
            self._calib_ids = calibration_ids_on(self.lm, self.calibration)
        return self._calib_ids

    def progress_to(self, frac: float, msg: str) -> None:
        """Tell the caller the step is `frac` (0-1) done, with a line saying what it does; raise Cancelled
        if the caller asked to stop."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled")
        if self.progress is not None:
            self.progress(frac, msg)


@dataclass(frozen=True)
class Step:
    """Base of all recipe steps. Subclasses set `op` and implement `apply`."""

    op: ClassVar[str] = ""

    def apply(self, ctx: OpContext, variant: Variant) -> tuple[Variant, dict, dict]:
        """-> (new variant, report of what was measured, this step as resolved, for the recipe)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        d = {"op": self.op}
        d.update(dataclasses.asdict(self))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"op"}
        if unknown:
            raise RecipeError(f"step '{cls.op}': unknown field(s) {sorted(unknown)}")
        try:
            return cls(**{k: v for k, v in d.items() if k != "op"})
        except TypeError as e:
            raise RecipeError(f"step '{cls.op}': {e}") from e


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (brackets inside strings not counted)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def step_from_dict(d: Any) -> Step:
    _load_ops()
    if not isinstance(d, dict) or "op" not in d:
        raise RecipeError(f"a step must be an object with an 'op' field, got {d!r}")
    cls = OPS.get(d["op"])
    if cls is None:
        raise RecipeError(f"unknown op '{d['op']}' (known: {', '.join(sorted(OPS))})")
    return cls.from_dict(d)


@dataclass
class Recipe:
    model: str = DEFAULT_MODEL
    calibration: Calibration = field(default_factory=Calibration)
    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "recipe_version": RECIPE_VERSION,
            "model": self.model,
            "calibration": self.calibration.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError("a recipe must be a JSON object")
        unknown = set(d) - {"recipe_version", "model", "calibration", "steps"}
        if unknown:
            raise RecipeError(f"unknown recipe field(s): {sorted(unknown)}")
        steps = d.get("steps", [])
        if not isinstance(steps, list):
            raise RecipeError("'steps' must be a list")
        version = d.get("recipe_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RecipeError(f"'recipe_version' must be a positive integer, got {version!r}")
        if version > RECIPE_VERSION:
            raise RecipeError(f"recipe version {version} is newer than this workbench reads ({RECIPE_VERSION}): update it")
        calib_d = d.get("calibration") or {}
        if not isinstance(calib_d, dict):
            raise RecipeError("'calibration' must be an object")
        calib_d = dict(calib_d)
        if version < 2:
            calib_d.setdefault("bos", False)  # version-1 windows had no BOS
        try:
            calib = Calibration.from_dict(calib_d)
        except DataError as e:
            raise RecipeError(str(e)) from e
        return cls(model=str(d.get("model", DEFAULT_MODEL)), calibration=calib, steps=[step_from_dict(s) for s in steps])

    @classmethod
    def from_text(cls, text: str | bytes, where: str = "the recipe") -> "Recipe":
        """Parse recipe JSON, refusing what is not a recipe (binary, NUL bytes, over 4 MiB, nested deeper
        than 16) with a RecipeError before the JSON parser sees it."""
        if len(text) > MAX_RECIPE_BYTES:
            raise RecipeError(f"{where} is {len(text) / 2**20:.1f} MiB: a recipe is a small JSON text (at most 4 MiB)")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise RecipeError(f"{where} is not a text file (a recipe is UTF-8 JSON)") from None
        if "\x00" in text:
            raise RecipeError(f"{where} holds NUL bytes: it is a binary file, not a recipe")
        depth = json_depth(text)
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{where} nests {depth} levels deep; a recipe nests at most {MAX_RECIPE_DEPTH}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"no such recipe file: {p}")
        try:
            size = p.stat().st_size
            if size > MAX_RECIPE_BYTES:  # never read a huge file just to refuse it
                raise RecipeError(f"{p} is {size / 2**20:.1f} MiB: a recipe is a small JSON text (at most 4 MiB)")
            data = p.read_bytes()
        except OSError as e:
            raise RecipeError(f"cannot read the recipe file {p}: {e.strerror or e}") from e
        return cls.from_text(data, where=str(p))


def apply_steps(ctx: OpContext, variant: Variant, steps: list[Step], name: str | None = None) -> Variant:
    """Apply steps in order; the original model is never touched. Reports accumulate on the variant."""
    for k, step in enumerate(steps):
        ctx.progress_to(k / max(len(steps), 1), f"step {k + 1}/{len(steps)}: {step.op}")
        new, report, resolved = step.apply(ctx, variant)
        new.steps = list(variant.steps) + [resolved]
        new.reports = list(variant.reports) + [report]
        variant = new
    if name:
        variant.name = name
    return variant


def apply_recipe(lm: LoadedModel, recipe: Recipe, progress=None, cancel=None, name: str = "recipe") -> Variant:
    from .variant import original_variant

    ctx = OpContext(lm=lm, calibration=recipe.calibration, progress=progress, cancel=cancel)
    return apply_steps(ctx, original_variant(lm.num_blocks), recipe.steps, name=name)


def variant_recipe(lm: LoadedModel, variant: Variant, calibration: Calibration) -> dict:
    """The recipe (as resolved) that replays `variant` on `lm`."""
    return {
        "recipe_version": RECIPE_VERSION,
        "model": lm.spec,
        "calibration": calibration.to_dict(),
        "steps": list(variant.steps),
    }
