"""Export a variant as a `save_pretrained` folder that plain transformers loads.

Fewer blocks, `num_hidden_layers` and per-layer config lists updated, attention `layer_idx` renumbered
(so generation with a KV cache works), tokenizer included, plus `recipe.json` and a model card with the
measured metrics. Written to a temporary folder beside the target and renamed into place; an existing
target is never overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ExportError
from .loading import LoadedModel
from .workspace import Variant, view_model


def _card(lm: LoadedModel, variant: Variant, recipe: dict, metrics: dict | None, extra_notes: list[str]) -> str:
    lines = [
        f"# {lm.name}: compressed variant '{variant.name}'",
        "",
        "Made with the Compression Workbench. Loads with plain `transformers`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('<this folder>')",
        "```",
        "",
        f"- Source model: `{lm.spec}` ({lm.source})",
        f"- Weights stored in {lm.info()['storage_dtype']}, computed in {lm.info()['compute_dtype']}"
        + (f" ({lm.dtype_note})" if lm.dtype_note else ""),
        f"- Blocks kept: {len(variant.kept())} of {variant.num_blocks}",
        f"- Dropped blocks (original indices): {variant.dropped() or 'none'}",
        f"- Replaced blocks (original indices): {variant.replaced() or 'none'}",
        "",
        "## Steps",
        "",
    ]
    lines += [f"- `{json.dumps(s)}`" for s in recipe.get("steps", [])] or ["- none"]
    if metrics:
        lines += ["", "## Measured", "", "| metric | value |", "| --- | --- |"]
        for k, v in metrics.items():
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if lm.spec == "default":
        lines += [
            "",
            "Note: the default model's weights come from a Q4_1 GGUF; they already lie on a 4-bit grid in "
            "groups of 32, which colours any quantization result measured on it.",
        ]
    lines += [""] + [f"Note: {n}" for n in extra_notes]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False, progress=None):
    """Yield a temporary folder beside `out_dir`; on success it is renamed into place (an existing target
    only with `overwrite`, kept until the new one is there); on any failure it is removed."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another folder or ask to overwrite")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise ExportError(f"cannot write into {parent}: {e}") from e
    try:
        yield tmp
        if progress:
            progress(0.9, "moving into place")
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model_files(model, tokenizer, folder: Path, after_weights=None) -> None:
    """Weights (safetensors) and tokenizer, with write failures as ExportError."""
    try:
        model.save_pretrained(folder, safe_serialization=True)
        if after_weights is not None:
            after_weights(folder)
        tokenizer.save_pretrained(folder)
    except OSError as e:
        raise ExportError(f"could not write the export: {e}") from e


def write_side_files(folder: Path, recipe: dict, card: str, metrics: dict | None) -> None:
    """recipe.json, the model card and the measured metrics beside the weights."""
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    (folder / "README.md").write_text(card)
    if metrics:
        (folder / "workbench_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def step_card_notes(variant: Variant) -> list[str]:
    """Lines steps left for the card (e.g. the sparsity actually reached)."""
    return [r["card"] for r in variant.reports if isinstance(r, dict) and r.get("card")]


def export_variant(
    lm: LoadedModel,
    variant: Variant,
    out_dir: str | Path,
    recipe: dict,
    metrics: dict | None = None,
    overwrite: bool = False,
    notes: list[str] | None = None,
    progress=None,
) -> Path:
    """Write the variant to `out_dir` atomically. Returns the folder."""
    with atomic_folder(out_dir, overwrite, progress) as tmp:
        if progress:
            progress(0.1, "writing weights")
        save_model_files(view_model(lm.model, lm.adapter, variant), lm.tokenizer, tmp)
        card = _card(lm, variant, recipe, metrics, (notes or []) + step_card_notes(variant))
        write_side_files(tmp, recipe, card, metrics)
    return Path(out_dir).expanduser().resolve()
