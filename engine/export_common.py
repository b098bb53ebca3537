"""What every export format writes beside its weights, shared by `export` (dense), `export_ct` and
`export_gguf`: the model card (how to load the folder, the steps, the measured figures), recipe.json and
workbench_metrics.json, plus the weights-and-tokenizer save and the paths an export must not touch.
(`export` dispatches to the other two formats, so these live here rather than in it: no import cycle.)"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError
from .export_files import files_bytes
from .loading import LoadedModel
from .safe_folder import environment_failure
from .variant import Variant

# What loads each format (the Export panel shows it beside the size).
LOADERS = {
    "dense": "transformers (AutoModelForCausalLM.from_pretrained), vLLM",
    "compressed-tensors": "transformers + compressed-tensors, vLLM",
    "gguf": "llama.cpp, Ollama, LM Studio (and transformers with gguf_file=)",
}
HOW_TO_LOAD = {
    "dense": [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('<this folder>')",
        "tokenizer = AutoTokenizer.from_pretrained('<this folder>')",
        "```",
        "vLLM: `vllm serve <this folder>`.",
    ],
    "compressed-tensors": [
        "```python",
        "# pip install compressed-tensors",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('<this folder>')",
        "```",
        "vLLM: `vllm serve <this folder>` (pack-quantized weights; not tested here).",
    ],
    "gguf": [
        "- llama.cpp: `llama-cli -m <this folder>/model.gguf` (or `llama-server -m ...`)",
        "- Ollama: a `Modelfile` with `FROM ./model.gguf`, then `ollama create mymodel -f Modelfile`",
        "- LM Studio: import `model.gguf`",
        "- transformers (dequantizes on load): "
        "`AutoModelForCausalLM.from_pretrained('<this folder>', gguf_file='model.gguf')`",
    ],
}


def model_card(lm: LoadedModel, variant: Variant, recipe: dict, metrics: dict | None, extra_notes: list[str],
          fmt: str = "dense", weight_files: dict | None = None) -> str:
    lines = [
        f"# {lm.name}: compressed variant '{variant.name}'",
        "",
        f"Made with the Compression Workbench. Format: **{fmt}**, loaded by {LOADERS[fmt]}:",
        "",
        *HOW_TO_LOAD[fmt],
        "",
        "Other formats of the same variant: `workbench compress --format dense|compressed-tensors|gguf` "
        "(dense: transformers; compressed-tensors: transformers + compressed-tensors, vLLM; "
        "gguf: llama.cpp, Ollama, LM Studio).",
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
    if weight_files:
        lines += ["", "## Files", "", "| file | bytes |", "| --- | --- |"]
        lines += [f"| {k} | {v:,} |" for k, v in weight_files.items()]
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


def write_side_files(folder: Path, recipe: dict, card: str, metrics: dict | None, fmt: str = "dense",
                     extra_files: dict | None = None) -> None:
    """recipe.json, the model card, `extra_files` ({name: text}: recipes for other tools) and the measured
    metrics, with the bytes on disk of every file written before them (`files_bytes`; the metrics file
    itself is not in it), beside the weights."""
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    (folder / "README.md").write_text(card)
    doc = dict(metrics or {})
    doc["format"] = fmt
    doc["files_bytes"] = files_bytes(folder)
    doc["bytes_on_disk"] = sum(doc["files_bytes"].values())
    (folder / "workbench_metrics.json").write_text(json.dumps(doc, indent=2) + "\n")


def step_card_notes(variant: Variant) -> list[str]:
    """Lines steps left for the card (e.g. the sparsity actually reached)."""
    return [r["card"] for r in variant.reports if isinstance(r, dict) and r.get("card")]
