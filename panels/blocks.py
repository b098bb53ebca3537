"""Blocks panel: the per-block chart; click bars to select blocks, then prune, fuse or quantize them.

The chart is a plotly figure drawn in a gr.HTML component by `assets/chart.js` with the plotly.js that
ships inside the `plotly` package (no CDN); a bar click becomes the component's `click` event carrying
`evt.block` (gr.Plot has no click event in Gradio 6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import gradio as gr

from workbench.engine.analysis import influence
from workbench.engine.errors import Cancelled, RecipeError
from workbench.panels.chart import click_bridge_js
from workbench.panels.context import PanelContext, form_values, number, progress_fn, whole
from workbench.panels.influence import cached_values, hover_extra, select_cell
from workbench.panels.summary import _units, plain_removal_beside, status_words, step_words

TITLE = "Blocks"
MODES = ["prune", "fuse", "quantize"]
# What the quantize mode proposes (the recipe step's own defaults stay GPTQ as published, so older
# recipes replay unchanged): mse scales and Hessian shrinkage 0.4, both measured better for GPTQ here
# (README, Quantization).
DEFAULT_OBSERVER = "mse"
DEFAULT_SHRINK = 0.4
# What the fuse mode applies beyond rank and steps (bench/fuse_defaults.py measures them on the default model).
FUSE_DEFAULTS = {"rank": 8, "steps": 16, "guard_samples": 4, "guard_scales": [1.0, 0.5, 0.25]}
COLOURS = {"kept": "#4C78A8", "selected": "#E45756", "dropped": "#C9C9C9", "fused": "#F58518",
           "quantized": "#54A24B", "sparse": "#B279A2", "changed": "#9D755D"}


LEGEND = " ".join(f"<span style='color:{c}'>■</span> {w}" for w, c in COLOURS.items() if w != "changed")


# Quantized blocks: one green per bit-width (tags read "quantized 4-bit g64"); darker = fewer bits.
QUANT_COLOURS = {2: "#14401F", 3: "#1F6B2E", 4: "#2F8F3E", 8: COLOURS["quantized"]}


def _state_colour(state: str) -> str:
    if state.startswith("quantized "):
        bits = state.split()[1].split("-")[0]
        if bits.isdigit() and int(bits) in QUANT_COLOURS:
            return QUANT_COLOURS[int(bits)]
    return next((c for word, c in COLOURS.items() if state.startswith(word)), COLOURS["changed"])


def chart_figure(store, sid: str | None, metric: str, progress=None) -> dict:
    """The plotly figure (plain JSON) of per-block scores, bars coloured by each block's state."""
    if not sid or store.session(sid).spec is None:
        from workbench.panels.chart import placeholder

        return placeholder("Load a model (Model tab) to see its blocks")
    scores = store.scores(sid, metric, progress=progress)
    variant, pending = store.current(sid), set(store.pending(sid))
    values = scores["values"]
    top = max([v for v in values if v is not None] or [1.0]) or 1.0
    xs, ys, colours, states, texts = [], [], [], [], []

    others = cached_values(store, sid, exclude=metric)  # hover shows every metric computed so far
    for i, v in enumerate(values):
        state = variant.block_state(i)
        shown = "selected" + ("" if state == "kept" else f" ({state})") if i in pending else state
        xs.append(i)
        ys.append(v if v is not None else 0.04 * top)  # dropped blocks: a stub bar, so they stay visible
        colours.append(COLOURS["selected"] if i in pending else _state_colour(state))
        states.append(shown)
        texts.append(("n/a" if v is None else f"{v:.4g}") + hover_extra(others, i))
    trace = {
        "type": "bar", "x": xs, "y": ys, "customdata": xs, "marker": {"color": colours},
        "text": states, "textposition": "none", "hovertext": texts,
        "hovertemplate": f"block %{{x}}<br>%{{text}}<br>{metric}: %{{hovertext}}<extra></extra>",
    }
    layout = {
        "height": 340, "margin": {"l": 50, "r": 10, "t": 40, "b": 40}, "bargap": 0.15,
        "title": {"text": f"{metric}: higher = more important; click bars to select blocks", "font": {"size": 13}, "x": 0.01},
        "xaxis": {"title": {"text": "block (original index)"}, "dtick": 1 if len(xs) <= 40 else None},
        "yaxis": {"title": {"text": f"{metric} ({scores.get('unit', '')})"}},
        "plot_bgcolor": "rgba(0,0,0,0)", "paper_bgcolor": "rgba(0,0,0,0)",
        "annotations": [{"text": LEGEND, "showarrow": False, "xref": "paper", "yref": "paper", "x": 1, "y": 1.02,
                         "xanchor": "right", "yanchor": "bottom", "font": {"size": 11}}],
    }
    data = [trace]
    flagged = outlier_marks(store, sid, variant)
    if flagged:  # the Outliers tab has run on this variant: mark the blocks that carry outliers
        data.append({"type": "scatter", "mode": "markers", "x": flagged, "y": [1.06 * top] * len(flagged),
                     "marker": {"symbol": "triangle-down", "size": 9, "color": "#B279A2"},
                     "name": "activation outliers", "hovertemplate": "block %{x}: activation outliers<extra></extra>"})
    return {"data": data, "layout": layout}


def outlier_marks(store, sid: str, variant) -> list[int]:
    """Blocks the outlier analysis flagged for this variant, if it has run (never computed here)."""
    from workbench.engine.analysis.outliers import outlier_blocks

    stats = store.workspace(sid).latest(variant, "outliers")
    return sorted(f["block"] for f in outlier_blocks(stats)) if stats else []


def chart_value(store, sid, metric, progress=None) -> str:
    return json.dumps(chart_figure(store, sid, metric, progress))


def selection_text(store, sid: str | None) -> str:
    if not sid or store.session(sid).spec is None:
        return ""
    pend = store.pending(sid)
    v = store.current(sid)
    head = f"Current variant **{v.name}**: {len(v.kept())}/{v.num_blocks} blocks kept"
    return head + (f" · selected: **{', '.join(map(str, pend))}**" if pend else " · no blocks selected")


def preview_text(store, sid: str | None, mode: str) -> str:
    """Quick figures of dropping the selected blocks (prune mode), before anything is applied."""
    if mode != "prune" or not sid or store.session(sid).spec is None:
        return ""
    q = store.preview(sid)
    if q is None:
        return ""
    return (f"Preview with the selection dropped: KL **{q['kl']:.4f}** nats/token · top-1 agreement "
            f"**{q['top1'] * 100:.1f}%** (quick set, {q['tokens']} tokens; {q['seconds']:.2f} s)")


def click(store, sid: str, metric: str, block: int) -> tuple[str, str]:
    """Toggle block `block` (original index) in the pending selection."""
    store.toggle(sid, int(block))
    return chart_value(store, sid, metric), selection_text(store, sid)


def clear(store, sid: str, metric: str) -> tuple[str, str, str]:
    store.clear_pending(sid)
    return chart_value(store, sid, metric), selection_text(store, sid), ""


def suggest(store, sid: str, metric: str, k: int, progress=gr.Progress()) -> tuple[str, str, str]:
    """Select the k blocks `removal_plan` would remove first by `metric` (iterative for mi and ppl)."""
    plan = store.workspace(sid).suggest(metric, int(k), progress=progress_fn(progress), cancel=store.begin_job(sid))
    how = "iteratively, re-scoring after each removal" if plan.get("iterative") else "ranked once"
    note = f"Suggested by {metric} ({how}): remove {plan['order']} in that order."
    return chart_value(store, sid, metric), selection_text(store, sid), note


def step_for(mode: str, blocks: list[int], kept: list[int], **options) -> dict:
    """The recipe step the Apply button makes from the mode, its options (ApplyForm's fields) and the
    selection."""
    return ApplyForm(mode, **options).step(blocks, kept)


@dataclass(frozen=True)
class ApplyForm:
    """The Apply button's settings, from the Blocks tab or the Workbench screen (the screen adds sparsify,
    `sp_method` and `sparsity`). The op configs check the values' ranges."""

    mode: str
    rank: int = 8
    steps: int = 40
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    observer: str = "minmax"
    shrink: float = 0.0
    sp_method: str = "wanda"
    sparsity: float = 0.5

    @classmethod
    def parse(cls, values: dict) -> "ApplyForm":
        """{field: raw widget value} -> the form; a field left out takes its default, a number box left
        empty (None) or holding text is refused with a message naming it."""
        d = {f.name: f.default for f in fields(cls)}
        return cls(mode=str(values.get("mode") or ""), rank=whole(values, "rank", d["rank"]),
                   steps=whole(values, "steps", d["steps"]), method=str(values.get("method", d["method"])),
                   bits=whole(values, "bits", d["bits"]), group_size=whole(values, "group_size", d["group_size"]),
                   observer=str(values.get("observer", d["observer"])), shrink=number(values, "shrink", d["shrink"]),
                   sp_method=str(values.get("sp_method", d["sp_method"])),
                   sparsity=number(values, "sparsity", d["sparsity"]))

    def step(self, blocks: list[int], kept: list[int]) -> dict:
        """The recipe step for this form and the selection (sparsify is the screen's own). Fusion runs in
        click order; pruning and quantizing take the blocks sorted; quantizing with no selection takes
        every kept block."""
        order = [int(b) for b in blocks]
        chosen = sorted(order)
        if self.mode == "prune":
            if not chosen:
                raise RecipeError("select blocks to prune: click their bars in the chart")
            return {"op": "prune_blocks", "blocks": chosen}
        if self.mode == "fuse":
            if not chosen:
                raise RecipeError("select blocks to fuse: click their bars in the chart")
            return {"op": "fuse_blocks", "blocks": order, "rank": self.rank, "steps": self.steps,
                    "guard_samples": FUSE_DEFAULTS["guard_samples"], "guard_scales": list(FUSE_DEFAULTS["guard_scales"])}
        if self.mode == "quantize":
            return {"op": "quantize", "method": self.method, "bits": self.bits, "group_size": self.group_size,
                    "observer": self.observer, "hessian_shrink": float(self.shrink), "blocks": chosen or list(kept)}
        raise RecipeError(f"unknown mode '{self.mode}'")


def apply(store, sid: str, form: ApplyForm, progress=gr.Progress()) -> tuple[str, str]:
    """Apply the step to the current variant (a heavy, cancellable job). -> (status, changed token)."""
    step = form.step(store.pending_in_order(sid), store.current(sid).kept())
    base = store.current(sid)
    cancel = store.begin_job(sid)
    try:
        v = store.apply_step(sid, step, progress_fn(progress), cancel)
    except Cancelled:
        gr.Warning("Cancelled: nothing was changed.")
        return "Cancelled: the current variant is unchanged.", gr.skip()
    full = v.reports[-1] if v.reports else {}
    sibling = plain_removal_beside(store, sid, base, v) if form.mode == "fuse" else None
    text = status_words(store, sid, v, sibling)  # plain words; the recipe itself is in the Export tab
    return text + fuse_summary(full), PanelContext.token()


def tracked(call, units: int, what: str, poll: float = 0.5):
    """Generator: run `call(progress)` as a job and yield its line in words (the step and the elapsed time
    during the first block, then an estimate of the time left), instead of Gradio's bar, which sits at
    0.0 % while the first block runs. Its return value (`result = yield from tracked(...)`) is call's."""
    from workbench.panels.jobs import Job, Tracker

    tracker = Tracker(units, what=what)
    job = Job(lambda: call(lambda frac, desc=None: tracker(frac, desc or "")), tracker, poll=poll)
    yield from job.lines()
    return job.result()


def apply_job(store, sid: str, form: ApplyForm, poll: float = 0.5):
    """The Apply button: yields (job line, status, changed) while the step runs, then apply's result."""
    step = form.step(store.pending_in_order(sid), store.current(sid).kept())
    call = lambda progress: apply(store, sid, form, progress=progress)
    gen = tracked(call, _units(step), f"{step_words(step)}: starting", poll)
    try:
        while True:
            yield next(gen), gr.skip(), gr.skip()
    except StopIteration as done:
        status, token = done.value
    yield "", status, token


def suggest_job(store, sid: str, metric: str, k: int, poll: float = 0.5):
    """The Suggest button: yields (chart, selection, status) with the job line in status, then suggest's result."""
    n = len(store.current(sid).kept())
    gen = tracked(lambda progress: suggest(store, sid, metric, k, progress), n,
                  f"Choosing the {int(k)} least important blocks by {metric}: starting", poll)
    try:
        while True:
            yield gr.skip(), gr.skip(), next(gen)
    except StopIteration as done:
        yield done.value


def fuse_summary(report: dict) -> str:
    """Per fused block: its group loss before -> after and the loss curve as a sparkline."""
    lines = []
    for r in report.get("per_block") or []:
        losses = [h[1] for h in r.get("history", [])]
        lo, hi = min(losses or [0.0]), max(losses or [0.0])
        spark = "".join("▁▂▃▄▅▆▇█"[int(7 * (x - lo) / (hi - lo)) if hi > lo else 0] for x in losses)
        lines.append(f"- block {r['block']} → {r['neighbours']}: {r['loss']} {r['loss_start']:.4g} → "
                     f"{r['loss_end']:.4g} in {r['steps_run']} steps ({r['seconds']:.0f} s) `{spark}`"
                     + _guard_words(r.get("guard")))
    return "\n\nFusion (loss of the group vs. the block present):\n" + "\n".join(lines) if lines else ""


def _guard_words(g: dict | None) -> str:
    if not g:
        return ""
    return (f"; output KL on held-out calibration text: fused {g['kl_fused']:.4f}, plain removal "
            f"{g['kl_removal']:.4f}, kept **{g['kept']}**")


def undo(store, sid: str) -> tuple[str, str]:
    v = store.undo(sid)
    return f"Undone: current variant is **{v.name}**.", PanelContext.token()


def set_calibration(store, sid: str, metric: str, samples: int, seq_len: int, progress=gr.Progress()) -> str:
    store.set_calibration(sid, int(samples), int(seq_len))
    return chart_value(store, sid, metric, progress)


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    js = click_bridge_js()

    with gr.Row():
        metric = gr.Dropdown([(d, k) for k, d in influence.METRICS.items()], value="bi", label="Metric", scale=3)
        samples = gr.Number(8, label="Calibration samples", precision=0, minimum=1, maximum=256, scale=1)
        seq_len = gr.Number(128, label="Tokens per sample", precision=0, minimum=8, maximum=4096, scale=1)
    chart = gr.HTML(chart_value(store, None, "bi"), html_template='<div class="wb-chart"></div>', js_on_load=js,
                    elem_id="wb-chart", min_height=340)
    selection = gr.Markdown(elem_id="wb-selection")
    preview = gr.Markdown(elem_id="wb-preview")
    with gr.Row():
        mode = gr.Radio(MODES, value="prune", label="Mode", scale=2)
        rank = gr.Number(8, label="fuse: rank", precision=0, minimum=1, visible=False)
        fsteps = gr.Number(16, label="fuse: steps", precision=0, minimum=0, visible=False)
        method = gr.Dropdown(["gptq", "rtn"], value="gptq", label="quantize: method", visible=False)
        bits = gr.Dropdown([2, 3, 4, 8], value=4, label="quantize: bits", visible=False)
        group = gr.Dropdown([32, 64, 128, -1], value=64, label="quantize: group size", visible=False)
        observer = gr.Dropdown([("min-max range", "minmax"), ("range search (mse)", "mse")], value=DEFAULT_OBSERVER,
                               label="quantize: scales", visible=False)
        shrink = gr.Number(DEFAULT_SHRINK, label="quantize: Hessian shrink (GPTQ)", minimum=0, maximum=1, step=0.1,
                           visible=False)
    with gr.Row():
        clear_b = gr.Button("Clear selection")
        apply_b = gr.Button("Apply", variant="primary", elem_id="wb-apply")
        cancel_b = gr.Button("Cancel job", variant="stop", visible=False)  # shown only while a job runs
        undo_b = gr.Button("Undo", elem_id="wb-undo")
    with gr.Row():
        k = gr.Number(2, label="Suggest: how many blocks", precision=0, minimum=1, scale=1)
        suggest_b = gr.Button("Select the k least important", scale=1)
    job = gr.Markdown(elem_id="wb-blocks-job")  # the running job in words, with the time left
    status = gr.Markdown(elem_id="wb-status")

    def on_mode(m):
        return [gr.update(visible=m == "fuse")] * 2 + [gr.update(visible=m == "quantize")] * 5

    mode.change(on_mode, mode, [rank, fsteps, method, bits, group, observer, shrink], show_progress="hidden")
    # min-max scales measured better for RTN on the default model, mse for GPTQ (README, Quantization)
    method.change(lambda m: gr.update(value="minmax" if m == "rtn" else DEFAULT_OBSERVER), method, observer,
                  show_progress="hidden")
    mode.change(g(lambda s, m: preview_text(store, s, m)), [sid, mode], preview, show_progress="hidden")
    chart.click(g(_click_handler(store)),
                [sid, metric], [chart, selection], show_progress="hidden").then(
        g(lambda s, m: preview_text(store, s, m)), [sid, mode], preview, show_progress="hidden")
    clear_b.click(g(lambda s, m: clear(store, s, m)), [sid, metric], [chart, selection, preview], show_progress="hidden")
    shown, hidden = (lambda: gr.update(visible=True)), (lambda: gr.update(visible=False))
    form = {"mode": mode, "rank": rank, "steps": fsteps, "method": method, "bits": bits, "group_size": group,
            "observer": observer, "shrink": shrink}

    def on_apply(values: dict):  # a set of inputs: one dict keyed by component
        yield from apply_job(store, values[sid], ApplyForm.parse(form_values(values, form)))

    apply_b.click(shown, None, cancel_b, queue=False, show_progress="hidden").then(
        g(on_apply), {sid, *form.values()}, [job, status, ctx.changed],
        api_name="apply", show_progress="hidden", **ctx.heavy).then(hidden, None, cancel_b, show_progress="hidden")
    cancel_b.click(g(lambda s: store.cancel(s)), sid, None, show_progress="hidden")
    undo_b.click(g(lambda s: undo(store, s)), sid, [status, ctx.changed], api_name="undo", **ctx.heavy)
    refresh = g(lambda s, m, progress=gr.Progress(): (chart_value(store, s, m, _pf(progress)), selection_text(store, s), ""))
    metric.change(refresh, [sid, metric], [chart, selection, preview], **ctx.heavy)
    ctx.changed.change(refresh, [sid, metric], [chart, selection, preview], **ctx.heavy)
    suggest_b.click(shown, None, cancel_b, queue=False, show_progress="hidden").then(
        g(lambda s, m, n: (yield from suggest_job(store, s, m, n))), [sid, metric, k],
        [chart, selection, status], show_progress="hidden", **ctx.heavy).then(hidden, None, cancel_b, show_progress="hidden").then(
        g(lambda s, m: preview_text(store, s, m)), [sid, mode], preview, show_progress="hidden")
    for box, event in ((samples, "submit"), (seq_len, "submit"), (samples, "blur"), (seq_len, "blur")):
        getattr(box, event)(g(lambda s, m, n, t, progress=gr.Progress(): set_calibration(store, s, m, n, t, progress)),
                   [sid, metric, samples, seq_len], chart, **ctx.heavy)
    return {"chart": chart, "metric": metric, "mode": mode, "selection": selection, "preview": preview,
            "apply": apply_b, "undo": undo_b, "status": status, "samples": samples, "seq_len": seq_len}


def wire(ctx) -> None:
    """A click on the Influence heatmap selects a run of blocks: the Blocks chart and selection show it at
    once. (Wired from here, once both tabs are built, so that the Influence tab need not import this one.)"""
    store, sid, g = ctx.store, ctx.session, ctx.guard
    blk, inf = ctx.components.get("blocks", {}), ctx.components.get("influence", {})
    if "chart" not in blk or "heatmap" not in inf:
        return

    def on_cell(s: str, metric: str, evt: gr.EventData):
        _, note = select_cell(store, s, int(evt.block))
        return note, chart_value(store, s, metric), selection_text(store, s)

    inf["heatmap"].click(g(on_cell), [sid, blk["metric"]], [inf["status"], blk["chart"], blk["selection"]],
                         show_progress="hidden")


def _pf(progress):
    return progress_fn(progress)


def _click_handler(store):
    def on_click(sid: str, metric: str, evt: gr.EventData) -> tuple[str, str]:
        return click(store, sid, metric, int(evt.block))

    return on_click
