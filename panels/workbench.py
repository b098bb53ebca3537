"""Workbench: the whole loop on one screen (the first tab).

Left: the block map (metric chooser; Macro Influence as soon as its background scan is done, block
influence until then; a clipped scale with the clipped bar labelled; each block's state as layered
marks), click bars to select, and the action bar (prune, fuse, quantize, sparsify, each with its
settings). Right: the live comparison (the selection's preview and the current variant against the
original: quick KL, top-1, perplexity, size), both generations, the variants' size-against-KL plot
with the Pareto front marked, and the variants in order, each with one line saying what it is.

Long jobs run in a thread (`panels.jobs`): the job line says the step and the elapsed time, then the
time left; Cancel shows only while a job runs; results replace the old ones whole.
"""

from __future__ import annotations

import json
import threading

import gradio as gr

from workbench.engine.analysis import influence
from workbench.engine.errors import Cancelled, RecipeError, WorkbenchError
from workbench.panels import blocks as bp
from workbench.panels.chart import click_bridge_js, placeholder
from workbench.panels.context import PanelContext, form_values
from workbench.panels.jobs import Job, Tracker
from workbench.panels.summary import (  # noqa: F401  (the screen's words and variants plot, shared)
    SELECTED,
    _blocks_words,
    _units,
    describe_steps,
    mib,
    num,
    plain_removal_beside,
    plot_of,
    status_words,
    step_words,
    variants_figure,
)

TITLE = "Workbench"
MODES = ["prune", "fuse", "quantize", "sparsify"]
SCALES = [("clipped (tallest bar cut, labelled)", "clipped"), ("log", "log"), ("linear", "linear")]
FILL = {"kept": "#4C78A8", "fused": "#F58518", "dropped": "#C9C9C9"}
QUANT = {2: "#14401F", 3: "#1F6B2E", 4: "#2F8F3E", 8: "#54A24B"}
CLIP_RATIO = 2.5  # the tallest bar is clipped when it is this many times the second tallest
LEGEND = (f"<span style='color:{FILL['kept']}'>■</span> kept · <span style='color:{SELECTED}'>□</span> selected "
          f"(red outline) · <span style='color:{FILL['dropped']}'>■</span> dropped · "
          f"<span style='color:{FILL['fused']}'>■</span> fused · <span style='color:{QUANT[4]}'>■</span> quantized "
          "(label: bits) · ▨ sparse · ▼ activation outliers · ✂ clipped bar")


# ---- pure view helpers ------------------------------------------------------------------------------
def block_marks(variant) -> list[dict]:
    """Per original block, every state at once, from the variant's resolved steps (a block can be fused
    and then quantized and sparsified): {"dropped", "fused", "bits", "sparsity"}."""
    marks = [{"dropped": False, "fused": False, "bits": None, "sparsity": None} for _ in range(variant.num_blocks)]
    for step, rep in zip(variant.steps, variant.reports):
        op = step.get("op")
        if op == "fuse_blocks":
            for r in (rep or {}).get("per_block") or []:
                if (r.get("guard") or {}).get("kept") == "removal":
                    continue  # the output guard kept plain removal: the neighbours are unchanged
                for j in r.get("neighbours", []):
                    marks[j]["fused"] = True
        elif op == "quantize":
            for i in step.get("blocks", []):
                marks[i]["bits"] = step.get("bits")
        elif op == "sparsify":
            for i in step.get("blocks", []):
                marks[i]["sparsity"] = step.get("sparsity")
    for i in variant.dropped():
        marks[i] = {"dropped": True, "fused": False, "bits": None, "sparsity": None}
    return marks


def scaled(values: list, scale: str) -> tuple[list[float], list[int], float]:
    """(bar heights, indices of clipped bars, top of the axis). None (dropped) becomes a stub bar."""
    real = [v for v in values if v is not None]
    top = max(real or [1.0]) or 1.0
    clipped: list[int] = []
    if scale == "clipped" and len(real) >= 2:
        second = sorted(real)[-2]
        if second > 0 and top > CLIP_RATIO * second:
            cap = 1.3 * second
            clipped = [i for i, v in enumerate(values) if v is not None and v > cap]
            top = cap
    floor = min([v for v in real if v > 0] or [1e-6]) / 2 if scale == "log" else 0.0
    ys = []
    for i, v in enumerate(values):
        if v is None:
            ys.append(max(0.04 * top, floor))
        elif i in clipped:
            ys.append(top)
        else:
            ys.append(max(v, floor) if scale == "log" else v)
    return ys, clipped, top


def chart_metric(store, sid, chosen: str) -> str:
    """The metric drawn: the chosen one, except Macro Influence before its scan is done (block influence)."""
    if chosen == "mi" and not mi_ready(store, sid):
        return "bi"
    return chosen


def mi_ready(store, sid) -> bool:
    ws = store.workspace(sid)
    return ws.peek(ws.current, "scores", ("mi", ws.calibration)) is not None


def chart_figure(store, sid, chosen: str = "mi", scale: str = "clipped") -> dict:
    if not sid or store.session(sid).spec is None:
        return placeholder("Load a model (Model tab) to see its blocks", 360)
    metric = chart_metric(store, sid, chosen)
    scores = store.scores(sid, metric)
    variant, pending = store.current(sid), set(store.pending(sid))
    marks = block_marks(variant)
    values = scores["values"]
    ys, clipped, top = scaled(values, scale)
    outliers = set(bp.outlier_marks(store, sid, variant))
    n = len(values)
    colours, texts, states, patterns, lines = [], [], [], [], []
    for i in range(n):
        m = marks[i]
        colours.append(FILL["dropped"] if m["dropped"] else FILL["fused"] if m["fused"]
                       else QUANT.get(m["bits"], QUANT[8]) if m["bits"] else FILL["kept"])
        words = (["dropped"] if m["dropped"] else []) + (["fused"] if m["fused"] else []) + \
                ([f"{m['bits']}-bit"] if m["bits"] else []) + ([f"{m['sparsity']:.0%} sparse"] if m["sparsity"] else []) + \
                (["activation outliers"] if i in outliers else []) + (["selected"] if i in pending else [])
        states.append(", ".join(words) or "kept")
        texts.append(f"{m['bits']}b" if m["bits"] else "")
        patterns.append("/" if m["sparsity"] else "")
        lines.append(3 if i in pending else 0)
    hover = [("n/a (dropped)" if v is None else f"{v:.4g}") for v in values]
    name = influence.METRICS[metric].split(":")[0]
    waiting = " (Macro Influence is being computed; shown when ready)" if metric != chosen else ""
    data = [{"type": "bar", "x": list(range(n)), "y": ys, "customdata": list(range(n)), "text": texts,
             "textposition": "outside", "cliponaxis": False, "hovertext": [f"{h}<br>{st}" for h, st in zip(hover, states)],
             "marker": {"color": colours, "pattern": {"shape": patterns, "fgcolor": "#333", "size": 6},
                        "line": {"width": lines, "color": SELECTED}},
             "hovertemplate": "block %{x}: %{hovertext}<extra></extra>", "name": "blocks", "showlegend": False}]
    annotations = [{"x": i, "y": top, "text": f"✂ {values[i]:.3g}", "showarrow": False, "yanchor": "bottom",
                    "font": {"size": 11, "color": "#B22"}} for i in clipped]
    if outliers:
        data.append({"type": "scatter", "mode": "markers", "x": sorted(outliers), "y": [top * 1.12] * len(outliers),
                     "marker": {"symbol": "triangle-down", "size": 9, "color": "#B279A2"}, "showlegend": False,
                     "hovertemplate": "block %{x}: activation outliers<extra></extra>"})
    yaxis = {"title": {"text": f"{metric} ({scores.get('unit', '')})"}, "rangemode": "tozero"}
    if scale == "log":
        yaxis.update(type="log", rangemode="normal")
    else:
        yaxis["range"] = [0, top * 1.2]
    layout = {"height": 360, "margin": {"l": 55, "r": 10, "t": 45, "b": 40}, "bargap": 0.15, "showlegend": False,
              "title": {"text": f"{name}: higher = more important{waiting}; click bars to select",
                        "font": {"size": 13}, "x": 0.01},
              "xaxis": {"title": {"text": "block (original index)"}, "dtick": 1 if n <= 40 else None, "range": [-0.6, n - 0.4]},
              "yaxis": yaxis, "annotations": annotations,
              "plot_bgcolor": "rgba(0,0,0,0)", "paper_bgcolor": "rgba(0,0,0,0)"}
    return {"data": data, "layout": layout, "metric": metric}


def chart_value(store, sid, chosen="mi", scale="clipped") -> str:
    return json.dumps(chart_figure(store, sid, chosen, scale))


def selection_text(store, sid) -> str:
    if not sid or store.session(sid).spec is None:
        return ""
    pend = store.pending(sid)
    v = store.current(sid)
    head = f"Current variant **{v.name}**: {len(v.kept())} of {v.num_blocks} blocks"
    return head + (f" · selected: **{', '.join(map(str, pend))}**" if pend else " · nothing selected: click bars")


def _fmt(q: dict | None) -> list[str]:
    if q is None:
        return ["-"] * 5
    return [f"{q['kl']:.4f}", f"{q['top1']:.1%}", f"{q['ppl']:.2f}", f"{q['bytes'] / 2**20:.1f} MiB", ""]


def figures_md(store, sid) -> str:
    """Original, the selection's preview (dropped from the current variant) and the current variant."""
    if not sid or store.session(sid).spec is None:
        return "No model loaded yet."
    s = store.session(sid)
    orig, cur = s.variants[0], store.current(sid)
    qo, qc, qp = store.quick(sid, orig), store.quick(sid, cur), store.preview(sid)
    pend = [b for b in store.pending(sid) if b in cur.kept()]
    cols = [("original", orig, qo), (f"current: {cur.name}", cur, qc)]
    if qp is not None:
        cols.insert(1, (f"preview: {cur.name} without {', '.join(map(str, pend))}", None, qp))
    rows = [("blocks", [f"{len(v.kept())} of {v.num_blocks}" if v else f"{len(cur.kept()) - len(pend)} of {cur.num_blocks}"
                        for _, v, _ in cols]),
            ("KL to the original", [_fmt(q)[0] for *_, q in cols]),
            ("top-1 agreement", [_fmt(q)[1] for *_, q in cols]),
            ("perplexity (noisy)", [_fmt(q)[2] for *_, q in cols]),
            ("size", [_fmt(q)[3] for *_, q in cols])]
    head = "| | " + " | ".join(c[0] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = "\n".join(f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows)
    return head + body + f"\n\nQuick set: {qo['tokens']} tokens (KL in nats per token)."


def variant_line(store, sid, v) -> str:
    q = store.quick(sid, v)
    what = v.description or describe_steps(v)
    return (f"**{v.name}**: {what} · {len(v.kept())} of {v.num_blocks} blocks, KL {num(q['kl'])}, top-1 "
            f"{q['top1']:.0%}, {mib(q['bytes'])}")


def variants_md(store, sid) -> str:
    if not sid or store.session(sid).spec is None:
        return ""
    cur = store.current(sid)
    return "\n".join(f"{k}. {variant_line(store, sid, v)}" + (" ◀ current" if v is cur else "")
                     for k, v in enumerate(store.variants(sid), 1))


# ---- actions ------------------------------------------------------------------------------------------
def make_step(store, sid, form: bp.ApplyForm) -> dict:
    sel, kept = store.pending_in_order(sid), store.current(sid).kept()
    if form.mode == "sparsify":
        return {"op": "sparsify", "method": form.sp_method, "sparsity": round(float(form.sparsity), 4),
                "pattern": "unstructured", "blocks": sorted(sel) or list(kept)}
    if form.mode not in MODES:
        raise RecipeError(f"unknown mode '{form.mode}'")
    return form.step(sel, kept)


def apply_job(store, sid, form: bp.ApplyForm, poll=0.5):
    """Generator: yields (job line, status, cancel button, changed) while the step runs, then the result."""
    step = make_step(store, sid, form)
    base = store.current(sid)
    tracker = Tracker(_units(step), what=f"{step_words(step)}: starting")
    cancel = store.begin_job(sid)
    job = Job(lambda: store.apply_step(sid, step, tracker, cancel), tracker, poll=poll)
    for line in job.lines():
        yield line, gr.skip(), gr.update(visible=True), gr.skip()
    try:
        v = job.result()
    except Cancelled:
        yield "", f"Cancelled: nothing was changed; the current variant is still {base.name}.", gr.update(visible=False), gr.skip()
        return
    sibling = None
    if step["op"] == "fuse_blocks":
        sibling = plain_removal_beside(store, sid, base, v)
    yield "", status_words(store, sid, v, sibling), gr.update(visible=False), PanelContext.token()


def scan_job(store, sid, chosen: str, scale: str, poll=0.5):
    """Generator: the Macro Influence scan of the current variant as a background job (cancellable);
    the chart shows block influence until it is done. Yields (chart, job line, cancel button)."""
    if not sid or store.session(sid).spec is None:
        yield chart_value(store, sid, chosen, scale), "", gr.update(visible=False)
        return
    yield chart_value(store, sid, chosen, scale), gr.skip(), gr.skip()
    if mi_ready(store, sid):
        return
    n = len(store.current(sid).kept())
    tracker = Tracker(n, what="Macro Influence scan: starting")
    cancel = store.begin_job(sid)
    job = Job(lambda: store.scores(sid, "mi", progress=tracker, cancel=cancel), tracker, poll=poll)
    for line in job.lines():
        yield gr.skip(), line, gr.update(visible=True)
    try:
        job.result()
    except Cancelled:
        yield gr.skip(), "Macro Influence scan cancelled: the chart shows block influence.", gr.update(visible=False)
        return
    yield chart_value(store, sid, chosen, scale), "", gr.update(visible=False)


def click(store, sid, chosen, scale, block: int) -> tuple[str, str]:
    store.toggle(sid, int(block))
    return chart_value(store, sid, chosen, scale), selection_text(store, sid)


def clear(store, sid, chosen, scale):
    store.clear_pending(sid)
    return chart_value(store, sid, chosen, scale), selection_text(store, sid), figures_md(store, sid)


def undo(store, sid) -> tuple[str, str]:
    v = store.undo(sid)
    return f"Undone: the current variant is {v.name}.", PanelContext.token()


# ---- layout and wiring --------------------------------------------------------------------------------
def build(ctx) -> dict:
    from workbench.panels import compare

    store, sid, g = ctx.store, ctx.session, ctx.guard
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row():
                metric = gr.Dropdown([(d.split(":")[0], k) for k, d in influence.METRICS.items()], value="mi",
                                     label="Metric (Macro Influence once scanned)", scale=3, elem_id="wb-main-metric")
                scale = gr.Dropdown(SCALES, value="clipped", label="Scale", scale=2, min_width=220)
            chart = gr.HTML(chart_value(store, None), html_template='<div class="wb-chart"></div>', js_on_load=click_bridge_js(),
                            elem_id="wb-main-chart", min_height=360)
            gr.HTML(f"<div class='wb-note'>{LEGEND}</div>", elem_id="wb-main-legend")
            selection = gr.Markdown(elem_id="wb-main-selection")
            with gr.Row():
                mode = gr.Radio(MODES, value="prune", label="Action", scale=3, elem_id="wb-main-mode")
                rank = gr.Number(bp.FUSE_DEFAULTS["rank"], label="rank", precision=0, minimum=1, visible=False, min_width=80)
                fsteps = gr.Number(bp.FUSE_DEFAULTS["steps"], label="steps per block", precision=0, minimum=0, visible=False, min_width=80)
                method = gr.Dropdown(["gptq", "rtn"], value="gptq", label="method", visible=False, min_width=90)
                bits = gr.Dropdown([2, 3, 4, 8], value=4, label="bits", visible=False, min_width=80)
                group = gr.Dropdown([32, 64, 128, -1], value=64, label="group size", visible=False, min_width=90,
                                    elem_id="wb-main-group")
                observer = gr.Dropdown([("min-max", "minmax"), ("mse search", "mse")], value=bp.DEFAULT_OBSERVER,
                                       label="scales", visible=False, min_width=110)
                shrink = gr.Number(bp.DEFAULT_SHRINK, label="Hessian shrink", minimum=0, maximum=1, step=0.1, visible=False, min_width=90)
                sp_method = gr.Dropdown(["magnitude", "wanda"], value="wanda", label="method", visible=False, min_width=110)
                sparsity = gr.Slider(0.05, 0.9, value=0.5, step=0.05, label="sparsity", visible=False, min_width=150)
            with gr.Row():
                apply_b = gr.Button("Apply to the selection", variant="primary", elem_id="wb-main-apply")
                clear_b = gr.Button("Clear selection")
                undo_b = gr.Button("Undo", elem_id="wb-main-undo")
                cancel_b = gr.Button("Cancel", variant="stop", visible=False, elem_id="wb-main-cancel")
            with gr.Row():  # drill into an analysis of the one selected block
                attn_b = gr.Button("Open its attention", size="sm", elem_id="wb-main-open-attention")
                outl_b = gr.Button("Open its outlier heads", size="sm", elem_id="wb-main-open-outliers")
            job = gr.Markdown(elem_id="wb-main-job")
            status = gr.Markdown(elem_id="wb-main-status")
        with gr.Column(scale=2):
            figures = gr.Markdown(figures_md(store, None), elem_id="wb-main-figures")
            plot = gr.Plot(plot_of(variants_figure(store, None)), show_label=False, elem_id="wb-main-plot")
            variants = gr.Markdown(elem_id="wb-main-variants")
            prompts = compare.example_prompts()
            with gr.Row():
                prompt = gr.Dropdown(prompts, value=prompts[0], allow_custom_value=True, label="Prompt", scale=4)
                gen_b = gr.Button("Generate both", scale=1, elem_id="wb-main-generate")
            out_o = gr.Textbox(label="Original (greedy)", lines=4, elem_classes="wb-gen", elem_id="wb-main-gen-original")
            out_v = gr.Textbox(label="Current variant (greedy)", lines=4, elem_classes="wb-gen", elem_id="wb-main-gen-variant")
            speed = gr.Markdown()

    settings = {"fuse": (rank, fsteps), "quantize": (method, bits, group, observer, shrink), "sparsify": (sp_method, sparsity)}
    every = [c for cs in settings.values() for c in cs]
    mode.change(lambda m: [gr.update(visible=c in settings.get(m, ())) for c in every], mode, every, show_progress="hidden")
    method.change(lambda m: gr.update(value="minmax" if m == "rtn" else bp.DEFAULT_OBSERVER), method, observer,
                  show_progress="hidden")
    hidden = {"show_progress": "hidden"}
    redraw = g(lambda s, m, sc: chart_value(store, s, m, sc))
    # one event: the chart and selection at once, then the preview's figures (no second queue trip)
    chart.click(g(_click_handler(store)), [sid, metric, scale], [chart, selection, figures], **hidden)
    for comp in (metric, scale):
        comp.change(redraw, [sid, metric, scale], chart, **ctx.heavy)
    clear_b.click(g(lambda s, m, sc: clear(store, s, m, sc)), [sid, metric, scale], [chart, selection, figures], **hidden)
    form = {"mode": mode, "rank": rank, "steps": fsteps, "method": method, "bits": bits, "group_size": group,
            "observer": observer, "shrink": shrink, "sp_method": sp_method, "sparsity": sparsity}

    def on_apply(values: dict):  # a set of inputs: one dict keyed by component
        yield from apply_job(store, values[sid], bp.ApplyForm.parse(form_values(values, form)))

    apply_b.click(g(on_apply), {sid, *form.values()}, [job, status, cancel_b, ctx.changed],
                  api_name="workbench_apply", **hidden, **ctx.heavy).then(
        lambda: gr.update(visible=False), None, cancel_b, **hidden)  # hidden again even after an error
    undo_b.click(g(lambda s: undo(store, s)), sid, [status, ctx.changed], api_name="workbench_undo", **ctx.heavy)
    cancel_b.click(g(lambda s: store.cancel(s)), sid, None, **hidden)
    ctx.changed.change(g(lambda s: (selection_text(store, s), figures_md(store, s), plot_of(variants_figure(store, s)),
                                    variants_md(store, s))), sid, [selection, figures, plot, variants], **hidden)
    ctx.changed.change(g(lambda s, m, sc: (yield from scan_job(store, s, m, sc))), [sid, metric, scale],
                       [chart, job, cancel_b], **hidden, **ctx.heavy)
    gen_kw = {"concurrency_id": "generate", "concurrency_limit": 1, "show_progress": "minimal"}
    gen_b.click(g(lambda s, p: (yield from compare.generate_pair(store, s, p, 48))), [sid, prompt], [out_o, out_v, speed],
                **gen_kw)
    return {"chart": chart, "metric": metric, "scale": scale, "mode": mode, "selection": selection, "apply": apply_b,
            "cancel": cancel_b, "job": job, "status": status, "figures": figures, "plot": plot, "variants": variants,
            "original": out_o, "variant": out_v, "open_attention": attn_b, "open_outliers": outl_b}


def one_selected(store, sid) -> int:
    """The single selected block that an analysis opens on; a clear line otherwise."""
    sel = store.pending_in_order(sid)
    if len(sel) != 1:
        raise WorkbenchError("select one block in the chart (click its bar) to open an analysis of it"
                             + ("" if not sel else f"; {len(sel)} are selected: {_blocks_words(sorted(sel))}"))
    if int(sel[0]) not in store.current(sid).kept():
        raise WorkbenchError(f"block {sel[0]} is dropped in the current variant: it has no attention or heads to open")
    return int(sel[0])


def open_attention(store, sid, prompt: str, damping: float, skip_first: bool):
    """-> (the Attention tab selected, its outputs) for the selected block, current variant, all heads."""
    from workbench.panels import attention

    block = one_selected(store, sid)
    return (gr.Tabs(selected="attention"),
            *attention.render(store, sid, attention.AttentionForm(prompt, "current variant", float(damping),
                                                                  bool(skip_first), block, "avg")))


def open_outliers(store, sid, score: str, progress=None):
    """-> (the Outliers tab selected, its outputs, with the selected block named first in its summary)."""
    from workbench.panels import outliers

    block = one_selected(store, sid)
    heat, norms, summary = outliers.compute(store, sid, score, progress)
    return gr.Tabs(selected="outliers"), heat, norms, f"Opened from the Workbench screen on **block {block}**.\n\n{summary}"


def wire(ctx) -> None:
    """Buttons that open another tab on the selected block (wired once every panel exists)."""
    main, att, out = ctx.components["workbench"], ctx.components.get("attention"), ctx.components.get("outliers")
    store, sid, g = ctx.store, ctx.session, ctx.guard
    if att is not None and ctx.tabs is not None:
        main["open_attention"].click(
            g(lambda s, p, d, sk: open_attention(store, s, p, d, sk)), [sid, att["prompt"], att["damping"], att["skip"]],
            [ctx.tabs, att["grid"], att["head_map"], att["pagerank"], att["info"], att["block"], att["head"]],
            **ctx.heavy)
    if out is not None and ctx.tabs is not None:
        main["open_outliers"].click(
            g(lambda s, sc: open_outliers(store, s, sc)), [sid, out["score"]],
            [ctx.tabs, out["heatmap"], out["norms"], out["summary"]], **ctx.heavy)


def _ahead(store, sid: str) -> threading.Thread:
    """Start the selection's preview while the chart and selection travel to the page: the figures' own
    call then finds it done (an error there is raised again by that call, in words)."""
    def run():
        try:
            store.preview(sid)
        except Exception:  # noqa: BLE001  (figures_md asks again and reports it)
            pass

    t = threading.Thread(target=run, name="preview-ahead", daemon=True)
    t.start()
    return t


def _click_handler(store):
    def on_click(sid: str, chosen: str, scale: str, evt: gr.EventData):
        chart, words = click(store, sid, chosen, scale, int(evt.block))
        ahead = _ahead(store, sid)
        yield chart, words, gr.update()
        ahead.join()
        yield gr.update(), gr.update(), figures_md(store, sid)

    return on_click
