"""Export a variant as a `save_pretrained` folder that plain transformers loads.

Fewer blocks, `num_hidden_layers` and per-layer config lists updated, attention `layer_idx` renumbered
(so generation with a KV cache works), tokenizer included, plus `recipe.json` and a model card with the
measured metrics. Written through `safe_folder.atomic_folder`: a temporary folder beside the target renamed into
place; only an earlier export of ours is ever replaced, and only when asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError
from .loading import LoadedModel
from .safe_folder import atomic_folder, environment_failure
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


def model_sources(lm: LoadedModel) -> tuple[str, ...]:
    """What an export target must neither contain nor lie inside: the model's folder and its spec
    (a GGUF file, a local folder); names that are not paths are ignored by the check."""
    return (lm.source, lm.spec)


def save_model_files(model, tokenizer, folder: Path, after_weights=None) -> None:
    """Weights (safetensors) and tokenizer, with write failures as ExportError."""
    try:
        model.save_pretrained(folder, safe_serialization=True)
        if after_weights is not None:
            after_weights(folder)
        tokenizer.save_pretrained(folder)
    except OSError as e:
        if environment_failure(e, "") is not None:
            raise  # the atomic writer names the target and cleans up
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
    with atomic_folder(out_dir, overwrite, progress, protect=model_sources(lm)) as tmp:
        if progress:
            progress(0.1, "writing weights")
        save_model_files(view_model(lm.model, lm.adapter, variant), lm.tokenizer, tmp)
        card = _card(lm, variant, recipe, metrics, (notes or []) + step_card_notes(variant))
        write_side_files(tmp, recipe, card, metrics)
    return Path(out_dir).expanduser().resolve()
