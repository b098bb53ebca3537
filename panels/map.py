"""Map panel: 2-D UMAP of blocks (by how they change hidden states) and of heads (by attention-pattern
statistics); PCA below 15 points, said on the figure. Clicking a block point selects it for pruning, as a
bar click in the Blocks tab does (Apply there)."""

from __future__ import annotations

import json

import gradio as gr
import plotly.graph_objects as go

from workbench.engine.analysis.embedding_map import HEAD_FEATURES
from workbench.panels.chart import click_bridge_js, placeholder
from workbench.panels.context import progress_fn

TITLE = "Map"


def _method_note(part: dict) -> str:
    return "UMAP" if part["method"] == "umap" else f"PCA ({part['reason']})"


def blocks_figure(res: dict, colour: list | None = None, colour_name: str | None = None, pending=()) -> dict:
    """Block points as plotly JSON for the click bridge (customdata = original block index)."""
    b = res["blocks"]
    xy = b["xy"]
    values = colour if colour is not None else b["color"]["values"]
    name = colour_name or b["color"]["name"]
    trace = {"type": "scatter", "mode": "markers+text", "x": [p[0] for p in xy], "y": [p[1] for p in xy],
             "text": [str(i) for i in b["index"]], "textposition": "top center", "customdata": b["index"],
             "marker": {"size": 14, "color": values, "colorscale": "Viridis", "showscale": True,
                        "colorbar": {"title": {"text": name, "side": "right"}},
                        "line": {"width": [3 if i in pending else 0 for i in b["index"]], "color": "#E45756"}},
             "hovertemplate": "block %{customdata}<br>" + name + " %{marker.color:.4g}<extra></extra>"}
    layout = {"height": 420, "margin": {"l": 40, "r": 10, "t": 40, "b": 30},
              "title": {"text": f"Blocks ({_method_note(b)}); click a point to select it for pruning", "font": {"size": 12}},
              "xaxis": {"showticklabels": False, "zeroline": False}, "yaxis": {"showticklabels": False, "zeroline": False}}
    return {"data": [trace], "layout": layout}


def heads_figure(res: dict, feature: str = "first") -> go.Figure:
    h = res["heads"]
    xy = h["xy"]
    vals = h["values"][feature]
    fig = go.Figure(go.Scatter(
        x=[p[0] for p in xy], y=[p[1] for p in xy], mode="markers",
        marker={"size": 8, "color": vals, "colorscale": "Magma", "showscale": True, "colorbar": {"title": {"text": feature}}},
        customdata=list(zip(h["block"], h["head"], vals)),
        hovertemplate="block %{customdata[0]}, head %{customdata[1]}<br>" + feature + " %{customdata[2]:.3f}<extra></extra>"))
    fig.update_layout(height=420, margin={"l": 40, "r": 10, "t": 40, "b": 30},
                      title={"text": f"Heads ({_method_note(h)}), coloured by {feature}", "font": {"size": 12}},
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False})
    return fig


def _cached(store, sid, progress=None) -> dict:
    return store.workspace(sid).embedding_map(progress=progress, cancel=store.begin_job(sid))


def _block_colour(store, sid, res: dict, by: str, progress=None):
    """(values per map point, name): the map's own block influence, or Macro Influence from the store."""
    if by != "mi":
        return None, None
    vals = store.scores(sid, "mi", progress=progress)["values"]
    return [vals[i] for i in res["blocks"]["index"]], "Macro Influence"


def compute(store, sid, feature: str, by: str = "map", progress=None):
    res = _cached(store, sid, progress)
    colour, name = _block_colour(store, sid, res, by, progress)
    return json.dumps(blocks_figure(res, colour, name, pending=store.pending(sid))), heads_figure(res, feature)


def click(store, sid, block: int, by: str = "map") -> tuple[str, str]:
    pend = store.toggle(sid, int(block))
    res = _cached(store, sid)
    colour, name = _block_colour(store, sid, res, by)
    note = f"Selected for pruning: **{', '.join(map(str, pend)) or 'none'}** (apply in the Blocks tab)"
    return json.dumps(blocks_figure(res, colour, name, pending=pend)), note


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    js = click_bridge_js()
    with gr.Row():
        by = gr.Dropdown([("block influence (1 - cos)", "map"), ("Macro Influence", "mi")], value="map",
                         label="Colour blocks by")
        feature = gr.Dropdown(list(HEAD_FEATURES), value="first", label="Colour heads by")
        go_b = gr.Button("Compute map (calibration data)", variant="primary", elem_id="wb-map-go")
    note = gr.Markdown(elem_id="wb-map-note")
    with gr.Row():
        bfig = gr.HTML(json.dumps(placeholder("Press Compute map to place the blocks", 420)),
                       html_template='<div class="wb-chart"></div>', js_on_load=js, min_height=420,
                       elem_id="wb-map-blocks")
        hfig = gr.Plot(label="Heads")

    def run(s, f, b, progress=gr.Progress()):
        return compute(store, s, f, b, progress_fn(progress))

    def clicked(s, b, evt: gr.EventData):
        return click(store, s, int(evt.block), b)

    go_b.click(g(run), [sid, feature, by], [bfig, hfig], **ctx.heavy)
    for comp in (feature, by):
        comp.change(g(run), [sid, feature, by], [bfig, hfig], **ctx.heavy)
    bfig.click(g(clicked), [sid, by], [bfig, note], show_progress="hidden")
    return {"blocks_map": bfig, "heads_map": hfig, "compute": go_b, "note": note}
