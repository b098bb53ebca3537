"""Model panel: choose the default model, a local folder, a GGUF file or a hub id; load; show facts."""

from __future__ import annotations

import gradio as gr

from workbench.engine.errors import ModelLoadError
from workbench.panels.context import PanelContext, progress_fn

TITLE = "Model"
SOURCES = ["default", "local folder", "GGUF file", "hub id"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]


def spec_for(source: str, path: str) -> str | None:
    """The model spec the engine understands, from the panel's two inputs (None: the app's default)."""
    if source == "default":
        return None
    path = (path or "").strip()
    if not path:
        raise ModelLoadError(f"enter a {source} to load")
    if source == "GGUF file" and not path.endswith(".gguf"):
        raise ModelLoadError(f"{path} does not end in .gguf")
    return path


def describe(store, sid: str | None) -> str:
    """Markdown facts of the session's model (architecture, blocks, parameters, size, device)."""
    if not sid or store.session(sid).spec is None:
        return "No model loaded yet."
    lm = store.lm(sid)
    info = lm.info()
    plan = ("  \n" + "  \n".join(lm.plan.lines())) if lm.plan is not None else ""
    return (
        f"**{info['name']}**  \n"
        f"architecture `{info['architecture']}` (family {info['family']}, `{info['model_type']}`) · "
        f"**{info['num_blocks']} blocks** (0..{info['num_blocks'] - 1}) · hidden size {info['hidden_size']}  \n"
        f"{info['parameters'] / 1e6:.1f} M parameters · {info['bytes'] / 2**20:.1f} MiB · "
        f"device `{info['device']}`  \n"
        f"stored in **{info['storage_dtype']}**, computed in **{info['compute_dtype']}**"
        + (f" ({info['dtype_note']})" if info.get("dtype_note") else "")
        + f"  \nsource: `{info['source']}`" + plan
    )


def load(store, sid: str, source: str, path: str, dtype: str = "auto", max_memory: str = "",
         offload_folder: str = "", progress=gr.Progress()) -> tuple[str, str]:
    """Load (first load of a GGUF dequantizes it once, ~20 s) in `dtype` under the memory plan that
    `max_memory` ('cuda:0=20GiB,cpu=48GiB'; empty: what is free) allows, and attach to the session."""

    store.attach(sid, spec_for(source, path), progress_fn(progress), dtype=dtype,
                 max_memory=(max_memory or "").strip() or None, offload_folder=(offload_folder or "").strip() or None)
    return describe(store, sid), PanelContext.token()


def build(ctx) -> dict:
    store = ctx.store
    with gr.Row():
        source = gr.Radio(SOURCES, value="default", label="Model source", scale=2)
        path = gr.Textbox(label="Path or hub id", placeholder="/path/to/folder, file.gguf or org/name", scale=3)
        dtype = gr.Dropdown(DTYPES, value="auto", label="Precision", scale=1,
                            info="auto: the checkpoint's own dtype")
        button = gr.Button("Load", variant="primary", scale=1)
    with gr.Row():
        max_memory = gr.Textbox(value="", label="Max memory (optional)", placeholder="cuda:0=20GiB,cpu=48GiB", scale=2,
                                info="blocks beyond it stay offloaded and are onloaded at their turn")
        offload = gr.Textbox(value="", label="Offload folder (optional)", placeholder="/path/for/offloaded/weights", scale=2)
    gr.Markdown("The default is SmolLM2-135M-Instruct from a Q4_1 GGUF: its first load dequantizes it once "
                "(about 20 s) and caches it; later loads take seconds. Pickle `.bin` weights need `--allow-pickle`.",
                elem_classes="wb-note")
    info = gr.Markdown(describe(store, None), elem_id="wb-model-info")

    # defaults: API callers of the older (source, path) form keep working
    button.click(ctx.guard(lambda sid, src, p, dt="auto", mm="", of="", progress=gr.Progress():
                           load(store, sid, src, p, dt, mm, of, progress)),
                 inputs=[ctx.session, source, path, dtype, max_memory, offload], outputs=[info, ctx.changed], api_name="load_model", **ctx.heavy)
    ctx.changed.change(ctx.guard(lambda sid: describe(store, sid)), inputs=ctx.session, outputs=info, show_progress="hidden")
    return {"source": source, "path": path, "dtype": dtype, "max_memory": max_memory, "offload_folder": offload,
            "load": button, "info": info}
