"""Attention panel: a prompt's attention maps (layers x heads grid, one head with its tokens, the head
average) and token importance by weighted PageRank (Zero-TPrune), for the original or the current variant.

Long prompts stay responsive: the grid average-pools every map to at most GRID_CELLS x GRID_CELLS, the
single-head map shows at most HEAD_TOKENS tokens (the last ones), the grid shows at most GRID_HEADS heads;
each figure says when it does so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import gradio as gr
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from workbench.engine.analysis.attention import DEFAULT_PROMPT, AttentionCapture
from workbench.engine.errors import WorkbenchError
from workbench.panels.context import form_values, number, progress_fn, whole

TITLE = "Attention"
GRID_CELLS = 16
GRID_HEADS = 16
HEAD_TOKENS = 128
GAMMA = 0.5  # colours show attention ** 0.5: the first-token sink would otherwise wash out the rest


def pooled(maps: torch.Tensor, cells: int) -> torch.Tensor:
    """(..., T, T) -> (..., s, s) by average pooling, s = min(T, cells) (attention mass is averaged)."""
    T = maps.shape[-1]
    if T <= cells:
        return maps
    lead = maps.shape[:-2]
    out = F.adaptive_avg_pool2d(maps.reshape(-1, 1, T, T), cells)
    return out.reshape(*lead, cells, cells)


def grid_figure(cap: AttentionCapture) -> go.Figure:
    """All layers x heads (plus the head average) tiled into one heatmap: one trace, bounded size."""
    L, H, T, _ = cap.probs.shape
    heads = min(H, GRID_HEADS)
    maps = torch.cat([cap.probs[:, :heads], cap.probs.mean(1, keepdim=True)], dim=1)  # (L, heads+1, T, T)
    small = pooled(maps, GRID_CELLS).pow(GAMMA).numpy()
    s = small.shape[-1]
    img = np.full((L * (s + 1), (heads + 1) * (s + 1)), np.nan)
    for li in range(L):
        for h in range(heads + 1):
            img[li * (s + 1) : li * (s + 1) + s, h * (s + 1) : h * (s + 1) + s] = small[li, h]
    notes = [f"colour = attention^{GAMMA}"]
    if s < T:
        notes.append(f"each {T}x{T} map average-pooled to {s}x{s}")
    if heads < H:
        notes.append(f"heads 0-{heads - 1} of {H} shown")
    fig = go.Figure(go.Heatmap(z=np.round(img, 3), colorscale="Viridis", showscale=False, hoverongaps=False,
                               hovertemplate="%{z:.3f}<extra></extra>"))
    fig.update_layout(
        title={"text": f"{cap.variant}: layers x heads (last column: head average) · " + "; ".join(notes), "font": {"size": 12}},
        height=max(300, min(1200, 22 * L + 80)), margin={"l": 60, "r": 10, "t": 40, "b": 40},
        xaxis={"tickvals": [h * (s + 1) + s / 2 for h in range(heads + 1)],
               "ticktext": [f"h{h}" for h in range(heads)] + ["avg"], "side": "top"},
        yaxis={"tickvals": [li * (s + 1) + s / 2 for li in range(L)], "ticktext": [f"block {b}" for b in cap.blocks],
               "autorange": "reversed"},
    )
    return fig


def head_figure(cap: AttentionCapture, layer_pos: int, head: int | None) -> go.Figure:
    """One head's map (or the layer's head average when head is None) with token labels."""
    p = cap.probs[layer_pos]
    m = p.mean(0) if head is None else p[head]
    T = m.shape[-1]
    start = max(0, T - HEAD_TOKENS)
    sub = m[start:, start:].numpy()
    labels = [f"{i}:{t}" for i, t in enumerate(cap.tokens)][start:]
    which = "head average" if head is None else f"head {head}"
    note = ""
    if start:
        lost = float(m[start:, :start].sum(-1).mean())
        note = f" · last {HEAD_TOKENS} of {T} tokens shown; {lost:.0%} of their attention goes to earlier tokens"
    fig = go.Figure(go.Heatmap(z=np.round(sub ** GAMMA, 4), x=labels, y=labels, customdata=np.round(sub, 4), colorscale="Viridis", showscale=False,
                               hovertemplate="query %{y}<br>key %{x}<br>attention %{customdata:.3f}<extra></extra>"))
    fig.update_layout(title={"text": f"block {cap.blocks[layer_pos]}, {which} (rows = queries; colour = attention^{GAMMA}){note}",
                             "font": {"size": 12}},
                      height=560, margin={"l": 90, "r": 10, "t": 40, "b": 90},
                      yaxis={"autorange": "reversed", "tickfont": {"size": 9}}, xaxis={"tickfont": {"size": 9}})
    return fig


def pagerank_figure(cap: AttentionCapture, rep: dict, layer_pos: int, head: int | None) -> go.Figure:
    pr = rep["pagerank"]
    scores = pr["head_average"][layer_pos] if head is None else pr["per_head"][layer_pos][head]
    which = "head-averaged matrix" if head is None else f"head {head}"
    fig = go.Figure(go.Bar(x=list(range(len(scores))), y=scores, hovertext=cap.tokens,
                           hovertemplate="%{x}: %{hovertext}<br>score %{y:.4f}<extra></extra>"))
    opts = f"damping {pr['damping']}" + (", first token left out" if pr["skip_first"] else "")
    fig.update_layout(title={"text": f"PageRank, block {cap.blocks[layer_pos]}, {which} ({opts}; "
                                     f"{pr['max_iterations_used']} iterations, L1 change < {pr['tol']:g})", "font": {"size": 12}},
                      height=300, margin={"l": 50, "r": 10, "t": 40, "b": 80},
                      xaxis={"tickvals": list(range(len(scores))) if len(scores) <= 64 else None,
                             "ticktext": cap.tokens if len(scores) <= 64 else None, "tickangle": -60},
                      yaxis={"title": {"text": "score (sums to 1)"}})
    return fig


def pick_variant(store, sid, which: str):
    """The session's original (its root variant, whose id is stable, so caches hit) or current variant."""
    cur = store.current(sid)
    return store.session(sid).variants[0] if which == "original" else cur


@dataclass(frozen=True)
class AttentionForm:
    """What the Attention tab shows: the prompt, on which model, PageRank's settings, the block and head
    (None: the first block; "avg": the heads' average)."""

    prompt: str = DEFAULT_PROMPT
    which: str = "current variant"
    damping: float = 0.85
    skip_first: bool = False
    block: int | None = None
    head: str = "avg"

    @classmethod
    def parse(cls, values: dict) -> "AttentionForm":
        """{field: raw widget value} -> the form; a block or damping that is not a number is refused by name."""
        block = values.get("block")
        return cls(prompt=values.get("prompt", DEFAULT_PROMPT), which=values.get("which", "current variant"),
                   damping=number(values, "damping", 0.85, WorkbenchError), skip_first=bool(values.get("skip_first")),
                   block=None if block in (None, "") else whole(values, "block", 0, WorkbenchError),
                   head=str(values.get("head") or "avg"))


def render(store, sid, form: AttentionForm, progress=None):
    """-> (grid, head map, PageRank bars, info, block choices update) for the chosen variant."""

    variant = pick_variant(store, sid, form.which)
    cap, rep = store.workspace(sid).attention(variant, form.prompt, 512, form.damping, form.skip_first,
                                              progress=progress)
    pos = cap.blocks.index(form.block) if form.block is not None and form.block in cap.blocks else 0
    h = None if form.head in ("", "avg") else int(form.head)
    info = (f"**{variant.name}** · {len(cap.tokens)} tokens · {len(cap.blocks)} blocks x {cap.num_heads} heads"
            + ("" if not rep["notes"] else " · " + "; ".join(rep["notes"])))
    choices = gr.update(choices=cap.blocks, value=cap.blocks[pos])
    heads = gr.update(choices=["avg"] + [str(i) for i in range(cap.num_heads)], value="avg" if h is None else str(h))
    return grid_figure(cap), head_figure(cap, pos, h), pagerank_figure(cap, rep, pos, h), info, choices, heads


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    with gr.Row():
        prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt (up to 512 tokens; longer ones keep their end)", lines=2, scale=4)
        which = gr.Radio(["current variant", "original"], value="current variant", label="Model", scale=1)
    with gr.Row():
        damping = gr.Slider(0.5, 1.0, value=0.85, step=0.01, label="PageRank damping (1 = no teleport)")
        skip = gr.Checkbox(False, label="Leave out the first (sink) token")
        block = gr.Dropdown([], label="Block", allow_custom_value=True)
        head = gr.Dropdown(["avg"], value="avg", label="Head")
        go_b = gr.Button("Show attention", variant="primary", elem_id="wb-attention-go")
    info = gr.Markdown(elem_id="wb-attention-info")
    grid = gr.Plot(label="Layers x heads", elem_id="wb-attention-grid")
    with gr.Row():
        hmap = gr.Plot(label="One head")
        bars = gr.Plot(label="PageRank")
    outs = [grid, hmap, bars, info, block, head]

    form = {"prompt": prompt, "which": which, "damping": damping, "skip_first": skip, "block": block, "head": head}

    def run(values: dict, progress=gr.Progress()):  # a set of inputs: one dict keyed by component
        return render(store, values[sid], AttentionForm.parse(form_values(values, form)), progress_fn(progress))

    go_b.click(g(run), {sid, *form.values()}, outs, **ctx.heavy)
    for comp in (block, head):
        comp.input(g(run), {sid, *form.values()}, outs, show_progress="hidden")
    return {"prompt": prompt, "grid": grid, "head_map": hmap, "pagerank": bars, "block": block, "head": head,
            "show": go_b, "info": info, "damping": damping, "skip": skip}
