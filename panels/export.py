"""Export panel: write the current variant as a checkpoint folder; download or import recipe JSON."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr

TITLE = "Export"


def export(store, sid: str, folder: str, overwrite: bool, progress=gr.Progress()) -> str:
    """Export atomically; an existing folder is refused unless `overwrite`."""
    from workbench.app import progress_fn
    from workbench.engine.errors import ExportError

    if not (folder or "").strip():
        raise ExportError("enter a folder to export to")
    out = store.export(sid, folder.strip(), overwrite=bool(overwrite), progress=progress_fn(progress))
    v = store.current(sid)
    return (f"Exported **{v.name}** ({len(v.kept())}/{v.num_blocks} blocks) to `{out}`. Load it with "
            f"`AutoModelForCausalLM.from_pretrained('{out}')`.")


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
    from workbench.app import PanelContext, progress_fn
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

    export_b.click(g(lambda s, f, o, progress=gr.Progress(): export(store, s, f, o, progress)), [sid, folder, overwrite],
                   status, api_name="export", **ctx.heavy)
    download_b.click(g(lambda s: recipe_file(store, s)), sid, file_out)
    import_b.click(g(lambda s, t, u, progress=gr.Progress(): import_recipe(store, s, t, u, progress)),
                   [sid, recipe, upload], [import_status, ctx.changed], api_name="import_recipe", **ctx.heavy)
    ctx.changed.change(g(lambda s: recipe_json(store, s)), sid, recipe, show_progress="hidden")
    return {"folder": folder, "overwrite": overwrite, "export": export_b, "status": status, "recipe": recipe,
            "import": import_b}
