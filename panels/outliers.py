"""Outliers panel: per-head no-op scores (layers x heads heatmap; click a head to open its attention map
on the prompt of the Attention tab's default) and activation inf-norm / kurtosis per block and module
(Quantizable Transformers), with the blocks `outlier_blocks` flags for quantization."""

from __future__ import annotations

import json

import gradio as gr
import plotly.graph_objects as go

from workbench.engine.analysis.outliers import MODULE_LABELS, MODULES, outlier_blocks
from workbench.engine.errors import WorkbenchError
from workbench.panels.chart import click_bridge_js
from workbench.panels.context import progress_fn

TITLE = "Outliers"
HEAD_CODE = 1000  # a heatmap cell's customdata = block * HEAD_CODE + head (the click bridge sends one number)


def noop_figure(stats: dict | None, score: str = "noop_first") -> dict:
    """Layers x heads heatmap of a no-op score as plotly JSON (drawn by the click bridge). Every block has
    a row, a categorical one, so a dropped block is an empty labelled row, never filled in by its
    neighbours' colours; its cells carry code -1 (a click there opens nothing)."""
    from workbench.panels.chart import placeholder

    if not stats or not stats.get(score):
        return placeholder("Press Compute on calibration data to see the no-op heatmap", 300)
    values = stats[score]
    if all(v is None for v in values):
        what = "delimiter (. , ; : newline ...)" if score == "noop_delim" else "first token"
        return placeholder(f"No {what} was visible to any query in the calibration text: nothing to score", 300)
    H = len(next(v for v in values if v is not None))
    z = [v if v is not None else [None] * H for v in values]
    labels = [f"{i}" if v is not None else f"{i} (dropped)" for i, v in enumerate(values)]
    code = [[i * HEAD_CODE + h if v is not None else -1 for h in range(H)] for i, v in enumerate(values)]
    what = "first token" if score == "noop_first" else "delimiters (. , ; : newline ...)"
    trace = {"type": "heatmap", "z": z, "x": list(range(H)), "y": labels, "customdata": code, "colorscale": "Magma",
             "zmin": 0, "zmax": 1, "hoverongaps": False, "xgap": 1, "ygap": 1,
             "hovertemplate": "block %{y}, head %{x}<br>mass %{z:.3f}<extra></extra>"}
    layout = {"height": max(300, 18 * len(values) + 90), "margin": {"l": 90, "r": 10, "t": 40, "b": 40},
              "title": {"text": f"No-op score: mean attention mass on the {what} (queries t >= 1); click a head to open its map",
                        "font": {"size": 12}},
              "xaxis": {"title": {"text": "head"}, "dtick": 1},
              "yaxis": {"title": {"text": "block (original index)"}, "type": "category", "autorange": "reversed"}}
    return {"data": [trace], "layout": layout}


def norms_figure(stats: dict) -> go.Figure:
    """Inf-norm and kurtosis per block, one line per module, log scale."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("inf-norm ||x||∞ (mean over samples)", "kurtosis μ4/σ⁴ (Gaussian = 3)"))
    for m in MODULES:
        xs = [i for i, v in enumerate(stats["inf_norm"][m]) if v is not None]
        fig.add_trace(go.Scatter(x=xs, y=[stats["inf_norm"][m][i] for i in xs], name=MODULE_LABELS[m], legendgroup=m,
                                 mode="lines+markers"), 1, 1)
        fig.add_trace(go.Scatter(x=xs, y=[stats["kurtosis"][m][i] for i in xs], name=MODULE_LABELS[m], legendgroup=m,
                                 mode="lines+markers", showlegend=False), 1, 2)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="block (original index)")
    fig.update_layout(height=360, margin={"l": 50, "r": 10, "t": 40, "b": 40},
                      title={"text": f"{stats['variant']}: {stats['samples']} calibration samples x {stats['seq_len']} tokens",
                             "font": {"size": 12}})
    return fig


def summary_text(stats: dict) -> str:
    flagged = outlier_blocks(stats)
    lines = ["**Blocks with activation outliers** (for quantization): "
             + (", ".join(f"{f['block']} ({'/'.join(f['modules'])})" for f in flagged) or "none")]
    rows = ["| block | residual top dims (max abs, x median) |", "|---|---|"]
    for i, dims in enumerate(stats["top_dims"]["residual"]):
        if dims:
            rows.append(f"| {i} | " + ", ".join(f"{d['dim']} ({d['max_abs']:.3g}, x{d['x_median']:.0f})" for d in dims[:4]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(rows)


def compute(store, sid, score: str, progress=None):
    """-> (no-op heatmap JSON, norms figure, summary markdown) for the current variant."""
    stats = store.workspace(sid).outliers(progress=progress, cancel=store.begin_job(sid))
    return json.dumps(noop_figure(stats, score)), norms_figure(stats), summary_text(stats)


def open_head(store, sid, code: int, prompt: str | None = None):
    """The attention map of the clicked head on `prompt` (the Attention tab's; current variant)."""
    from .attention import head_figure, pagerank_figure

    if int(code) < 0:
        raise WorkbenchError("that block is dropped in the current variant: it has no heads to open")
    block, head = divmod(int(code), HEAD_CODE)
    cap, rep = store.workspace(sid).attention(prompt=prompt or None)
    pos = cap.blocks.index(block)
    return head_figure(cap, pos, head), pagerank_figure(cap, rep, pos, head)


def build(ctx) -> dict:


    store, sid, g = ctx.store, ctx.session, ctx.guard
    js = click_bridge_js()
    with gr.Row():
        score = gr.Radio([("first token", "noop_first"), ("delimiters", "noop_delim")], value="noop_first",
                         label="No-op score")
        go_b = gr.Button("Compute on calibration data", variant="primary", elem_id="wb-outliers-go")
    heat = gr.HTML(json.dumps(noop_figure(None)), html_template='<div class="wb-chart"></div>',
                   js_on_load=js, min_height=300, elem_id="wb-noop")
    with gr.Row():
        hmap = gr.Plot(label="Clicked head", elem_id="wb-noop-head")
        bars = gr.Plot(label="Its PageRank")
    norms = gr.Plot(label="Inf-norm and kurtosis")
    summary = gr.Markdown(elem_id="wb-outliers-summary")

    def run(s, sc, progress=gr.Progress()):
        return compute(store, s, sc, progress_fn(progress))

    # The Attention tab's prompt, read only, so a clicked head shows the prompt the person is studying.
    prompt = ctx.components.get("attention", {}).get("prompt")

    if prompt is not None:
        def clicked(s, p, evt: gr.EventData):
            return open_head(store, s, int(evt.block), p)
    else:
        def clicked(s, evt: gr.EventData):
            return open_head(store, s, int(evt.block))

    go_b.click(g(run), [sid, score], [heat, norms, summary], **ctx.heavy)
    score.change(g(run), [sid, score], [heat, norms, summary], show_progress="hidden")
    heat.click(g(clicked), [sid] + ([prompt] if prompt is not None else []), [hmap, bars], **ctx.heavy)
    return {"heatmap": heat, "norms": norms, "summary": summary, "compute": go_b, "score": score}
