"""Export a variant: dense safetensors (plain transformers), compressed-tensors, or GGUF (llama.cpp).

Fewer blocks, `num_hidden_layers` and per-layer config lists updated, attention `layer_idx` renumbered
(so generation with a KV cache works), tokenizer included, plus `recipe.json`, a model card saying how
to load the folder with the measured metrics, and `workbench_metrics.json` with the bytes on disk of
every file. Written through `safe_folder.atomic_folder`: a temporary folder beside the target renamed
into place, with the modes of the user's umask; only an earlier export of ours is ever replaced, and
only when asked.

The default format follows the variant: one with quantized blocks exports as compressed-tensors (the
packed codes), any other as dense safetensors in the weights' own dtype (`export_files`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError
from .export_files import DEFAULT_SHARD_BYTES, files_bytes, write_dense_weights
from .loading import LoadedModel
from .safe_folder import atomic_folder, environment_failure
from .variant import Variant, view_model

FORMATS = ("dense", "compressed-tensors", "gguf")
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


def _card(lm: LoadedModel, variant: Variant, recipe: dict, metrics: dict | None, extra_notes: list[str],
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


def export_variant(
    lm: LoadedModel,
    variant: Variant,
    out_dir: str | Path,
    recipe: dict,
    metrics: dict | None = None,
    overwrite: bool = False,
    notes: list[str] | None = None,
    progress=None,
    max_shard_bytes: int | None = None,
    extra_files: dict | None = None,
) -> Path:
    """Write the variant to `out_dir` atomically as dense safetensors in the weights' own dtype, streamed
    shard by shard (see `export_files`). Returns the folder."""
    with atomic_folder(out_dir, overwrite, progress, protect=model_sources(lm)) as tmp:
        if progress:
            progress(0.1, "writing weights")
        try:
            names = write_dense_weights(view_model(lm.model, lm.adapter, variant), tmp,
                                        max_shard_bytes or DEFAULT_SHARD_BYTES)
            lm.tokenizer.save_pretrained(tmp)
        except OSError as e:
            if environment_failure(e, "") is not None:
                raise  # the atomic writer names the target and cleans up
            raise ExportError(f"could not write the export: {e}") from e
        weights = {n: (tmp / n).stat().st_size for n in names}
        card = _card(lm, variant, recipe, metrics, (notes or []) + step_card_notes(variant), "dense", weights)
        write_side_files(tmp, recipe, card, metrics, "dense", extra_files)
    return Path(out_dir).expanduser().resolve()


# ---- choosing a format ------------------------------------------------------------------------------
def has_quantized_blocks(lm: LoadedModel, variant: Variant) -> bool:
    model = view_model(lm.model, lm.adapter, variant)
    return any(getattr(m, "workbench_quant", None) is not None for m in model.modules())


def default_format(lm: LoadedModel, variant: Variant) -> str:
    """compressed-tensors for a variant with quantized blocks (gguf when every quantized linear was
    solved for a GGUF scheme: its codes go into the file as they are), dense for any other."""
    model = view_model(lm.model, lm.adapter, variant)
    recs = [m.workbench_quant for m in model.modules() if getattr(m, "workbench_quant", None) is not None]
    if not recs:
        return "dense"
    return "gguf" if all(getattr(r, "gguf", None) for r in recs) else "compressed-tensors"


def export_any(lm: LoadedModel, variant: Variant, out_dir: str | Path, recipe: dict, fmt: str | None = None,
               gguf_type: str | None = None, metrics: dict | None = None, overwrite: bool = False,
               notes: list[str] | None = None, progress=None, extra_files: dict | None = None) -> tuple[Path, str]:
    """Export in `fmt` (None: the variant's default format). -> (folder, format written)."""
    fmt = fmt or default_format(lm, variant)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (choose {', '.join(FORMATS)})")
    kw = dict(metrics=metrics, overwrite=overwrite, notes=notes, progress=progress, extra_files=extra_files)
    if fmt == "dense":
        return export_variant(lm, variant, out_dir, recipe, **kw), fmt
    if fmt == "compressed-tensors":
        from .export_ct import export_compressed

        return export_compressed(lm, variant, out_dir, recipe, **kw), fmt
    from .export_gguf import export_gguf

    return export_gguf(lm, variant, out_dir, recipe, tensor_type=gguf_type, **kw), fmt


def estimate_sizes(lm: LoadedModel, variant: Variant, gguf_type: str | None = None) -> list[dict]:
    """Before writing: per format, the bytes its weight file(s) will hold (tensor data; headers, the
    tokenizer and the side files come on top) and what loads it, or why it cannot be written.
    -> [{"format", "bytes" (None when refused), "loads", "note"}]."""
    from .export_ct import check_exportable as ct_check
    from .export_ct import estimate_ct_bytes
    from .export_files import dense_weight_bytes
    from .export_gguf import default_tensor_type, estimate_gguf_bytes

    out = [{"format": "dense", "bytes": dense_weight_bytes(view_model(lm.model, lm.adapter, variant)),
            "loads": LOADERS["dense"], "note": ""}]
    try:
        ct_check(lm, variant)
        out.append({"format": "compressed-tensors", "bytes": estimate_ct_bytes(lm, variant),
                    "loads": LOADERS["compressed-tensors"], "note": ""})
    except ExportError as e:
        out.append({"format": "compressed-tensors", "bytes": None, "loads": LOADERS["compressed-tensors"],
                    "note": str(e)})
    try:
        typ = gguf_type or default_tensor_type(lm, variant)
        out.append({"format": "gguf", "bytes": estimate_gguf_bytes(lm, variant, gguf_type),
                    "loads": LOADERS["gguf"], "note": f"tensor type {typ}"})
    except ExportError as e:
        out.append({"format": "gguf", "bytes": None, "loads": LOADERS["gguf"], "note": str(e)})
    return out
