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

from pathlib import Path

from .errors import ExportError
from .export_common import LOADERS, model_card, model_sources, step_card_notes, write_side_files
from .export_files import DEFAULT_SHARD_BYTES, write_dense_weights
from .loading import LoadedModel
from .safe_folder import atomic_folder, environment_failure
from .variant import Variant, view_model

FORMATS = ("dense", "compressed-tensors", "gguf")


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
        card = model_card(lm, variant, recipe, metrics, (notes or []) + step_card_notes(variant), "dense", weights)
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
