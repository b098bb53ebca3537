"""Export panel: choose a format (the bytes each will take and what loads it shown before writing), write
the current variant as a checkpoint folder; download or import recipe JSON."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr

from workbench.panels.context import PanelContext, progress_fn

TITLE = "Export"


DEFAULT = "default for this variant"
FORMAT_CHOICES = [DEFAULT, "dense", "compressed-tensors", "gguf"]
GGUF_TYPES = ["default", "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
HOW = {
    "dense": "`AutoModelForCausalLM.from_pretrained('{out}')`",
    "compressed-tensors": "`AutoModelForCausalLM.from_pretrained('{out}')` with `compressed-tensors` installed, "
                          "or `vllm serve {out}`",
    "gguf": "`llama-cli -m {out}/model.gguf`, or Ollama with `FROM {out}/model.gguf` in a Modelfile",
}


def _choice(fmt: str | None, gguf_type: str | None) -> tuple[str | None, str | None]:
    fmt = None if fmt in (None, "", DEFAULT) else fmt
    typ = None if gguf_type in (None, "", "default") else gguf_type
    if typ is not None and fmt in (None, "gguf"):
        fmt = "gguf"
    return fmt, typ


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def sizes(store, sid: str | None, gguf_type: str | None = "default") -> str:
    """A table: per format, the bytes it will take and what loads it (before anything is written)."""
    from workbench.engine.export import default_format, estimate_sizes

    if not sid or store.session(sid).spec is None:
        return ""
    v = store.current(sid)
    with store.using(sid) as lm:
        rows = estimate_sizes(lm, v, _choice("gguf", gguf_type)[1])
        default = default_format(lm, v)
    lines = [f"Sizes of **{v.name}** before writing (tensor data; the tokenizer and a few small files come on top). "
             f"Default for this variant: **{default}**.", "", "| format | size | loads with | |", "| --- | --- | --- | --- |"]
    for r in rows:
        size = _mib(r["bytes"]) if r["bytes"] is not None else "cannot be written"
        lines.append(f"| {r['format']} | {size} | {r['loads']} | {r['note']} |")
    return "\n".join(lines)


def export(store, sid: str, folder: str, overwrite: bool, fmt: str | None = DEFAULT, gguf_type: str | None = "default",
           progress=gr.Progress()) -> str:
    """Export atomically in the chosen format; an existing folder is refused unless `overwrite`."""
    from workbench.engine.errors import ExportError

    if not (folder or "").strip():
        raise ExportError("enter a folder to export to")
    f, typ = _choice(fmt, gguf_type)
    if typ is not None and f != "gguf":
        raise ExportError("a GGUF tensor type applies to the gguf format only")
    out = store.export(sid, folder.strip(), overwrite=bool(overwrite), progress=progress_fn(progress), fmt=f,
                       gguf_type=typ)
    v = store.current(sid)
    written = json.loads((out / "workbench_metrics.json").read_text())
    return (f"Exported **{v.name}** ({len(v.kept())}/{v.num_blocks} blocks) to `{out}` as **{written['format']}** "
            f"({_mib(written['bytes_on_disk'])} on disk). Load it with {HOW[written['format']].format(out=out)}.")


def recipe_json(store, sid: str | None) -> str:
    if not sid or store.session(sid).spec is None:
        return ""
    return json.dumps(store.recipe_of(sid), indent=2)


def recipe_file(store, sid: str) -> str:
    """Write the current recipe to a temporary .json file for download; returns its path."""
    v = store.current(sid)
    path = Path(tempfile.mkdtemp(prefix="workbench-recipe-")) / f"recipe-{v.name}.json"
    path.write_text(recipe_json(store, sid) + "\n")
    return str(path)


def import_recipe(store, sid: str, text: str, upload: str | None, progress=gr.Progress()) -> tuple[str, str]:
    """Replay a recipe (an uploaded file wins over the pasted text) from the original model."""
    from workbench.engine.errors import RecipeError
    from workbench.engine.recipe import Recipe

    if upload:
        text = Recipe.from_file(upload).to_json()  # size, binary and nesting checks before reading it all
    if not (text or "").strip():
        raise RecipeError("paste a recipe or upload a recipe .json file")
    store.begin_job(sid)
    v = store.import_recipe(sid, text, progress_fn(progress))
    return f"Imported recipe → variant **{v.name}** ({len(v.kept())}/{v.num_blocks} blocks).", PanelContext.token()


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    with gr.Row():
        fmt = gr.Radio(FORMAT_CHOICES, value=DEFAULT, label="Format", scale=3, elem_id="wb-export-format")
        gtype = gr.Dropdown(GGUF_TYPES, value="default", label="GGUF tensor type", scale=1)
        sizes_b = gr.Button("Show sizes", scale=1)
    size_table = gr.Markdown(elem_id="wb-export-sizes")
    with gr.Row():
        folder = gr.Textbox(label="Export folder", placeholder="/path/to/new-folder", scale=4, elem_id="wb-export-folder")
        overwrite = gr.Checkbox(False, label="Overwrite if it exists", scale=1)
        export_b = gr.Button("Export", variant="primary", scale=1, elem_id="wb-export")
    status = gr.Markdown(elem_id="wb-export-status")
    gr.Markdown("### Recipe")
    recipe = gr.Code(recipe_json(store, None), language="json", label="Recipe of the current variant (editable)",
                     interactive=True)
    with gr.Row():
        with gr.Column():
            download_b = gr.Button("Prepare recipe download")
            file_out = gr.File(label="recipe.json", interactive=False, height=90)
        with gr.Column():
            import_b = gr.Button("Import recipe (uploaded file, else the editor)")
            upload = gr.File(label="Import a recipe .json", file_types=[".json"], type="filepath", height=90)
    import_status = gr.Markdown()

    export_b.click(g(lambda s, f, o, fm=DEFAULT, t="default", progress=gr.Progress(): export(store, s, f, o, fm, t, progress)),
                   [sid, folder, overwrite, fmt, gtype], status, api_name="export", **ctx.heavy)
    sizes_b.click(g(lambda s, t: sizes(store, s, t)), [sid, gtype], size_table, api_name="export_sizes")
    gtype.change(g(lambda s, t: sizes(store, s, t)), [sid, gtype], size_table, show_progress="hidden")
    download_b.click(g(lambda s: recipe_file(store, s)), sid, file_out)
    import_b.click(g(lambda s, t, u, progress=gr.Progress(): import_recipe(store, s, t, u, progress)),
                   [sid, recipe, upload], [import_status, ctx.changed], api_name="import_recipe", **ctx.heavy)
    ctx.changed.change(g(lambda s: recipe_json(store, s)), sid, recipe, show_progress="hidden")
    ctx.changed.change(g(lambda s, t: sizes(store, s, t)), [sid, gtype], size_table, show_progress="hidden")
    return {"folder": folder, "overwrite": overwrite, "export": export_b, "status": status, "recipe": recipe,
            "format": fmt, "gguf_type": gtype, "sizes": size_table,
            "import": import_b}
