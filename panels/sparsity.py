"""Sparsity panel: perplexity against one-shot sparsity (magnitude, Wanda; N:M as marked points), the
essential-sparsity knee, a (module type x block) sensitivity heatmap, and applying a chosen sparsity.

A click on a curve point (or the slider) picks the sparsity; "Apply" adds a `sparsify` step to the
current variant through the store. The sweep runs on the current variant, KL is to the original.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr
import plotly.graph_objects as go

from workbench.engine.analysis import sparsity as sp
from workbench.engine.errors import RecipeError
from workbench.panels.chart import click_bridge_js, placeholder, placeholder_figure
from workbench.panels.context import form_values, number, progress_fn, whole

TITLE = "Sparsity"
COLORS = {"magnitude": "#1f77b4", "wanda": "#d62728"}
TOKEN_CHOICES = [("1024 tokens", 1024), ("2048 tokens", 2048), ("4096 tokens", 4096), ("full split", 0)]


# ---- click codes: a point's customdata is one number (the bridge sends one) ------------------------
def point_code(method: str, sparsity: float, pattern: str = "unstructured") -> int:
    return sp.PATTERNS.index(pattern) * 100000 + sp.METHODS.index(method) * 10000 + int(round(sparsity * 1000))


def decode(code: int) -> tuple[str, float, str]:
    pat, rest = divmod(int(code), 100000)
    meth, milli = divmod(rest, 10000)
    return sp.METHODS[meth], milli / 1000.0, sp.PATTERNS[pat]


# ---- pure view functions ---------------------------------------------------------------------------
def figure(res: dict | None, log_y: bool = True) -> dict:
    """Curves (x = measured sparsity, y = perplexity), N:M marked points, dense band, knees (plotly JSON)."""
    if not res:
        return placeholder("Run a sweep to draw perplexity against sparsity", 380)
    data, shapes = [], []
    dense = res["dense"]["ppl"]
    tol = res["tolerance"]
    for m, c in res["curves"].items():
        pts = c["points"]
        data.append({"type": "scatter", "mode": "lines+markers", "name": f"{m} ({c['scope']})",
                     "x": [p["target_sparsity"] for p in pts], "y": [p["ppl"] for p in pts],
                     "customdata": [point_code(m, p["target_sparsity"]) for p in pts],
                     "text": [f"reached {p['sparsity'] * 100:.2f}%<br>KL {p['kl']:.4f}<br>top-1 {p['top1']:.3f}" for p in pts],
                     "hovertemplate": f"{m} %{{x:.0%}}<br>ppl %{{y:.3f}}<br>%{{text}}<extra></extra>",
                     "line": {"color": COLORS.get(m)}, "marker": {"size": 7}})
        k = c.get("knee") or {}
        for x, dash, what in ((k.get("essential_sparsity"), "dash", "essential"),
                              (k.get("max_curvature_sparsity"), "dot", "max curvature")):
            if x is not None:
                shapes.append({"type": "line", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                               "line": {"color": COLORS.get(m), "dash": dash, "width": 1.5}})
                data.append({"type": "scatter", "mode": "markers", "x": [x],
                             "y": [next(p["ppl"] for p in pts if p["target_sparsity"] == x)],
                             "marker": {"symbol": "star" if what == "essential" else "x", "size": 14, "color": COLORS.get(m)},
                             "name": f"{m} {what} {x:.0%}", "customdata": [point_code(m, x)],
                             "hovertemplate": f"{m} {what}: %{{x:.0%}}<extra></extra>"})
    for p in res["nm"]:
        data.append({"type": "scatter", "mode": "markers", "name": f"{p['method']} {p['pattern']}",
                     "x": [p["target_sparsity"]], "y": [p["ppl"]],
                     "customdata": [point_code(p["method"], p["target_sparsity"], p["pattern"])],
                     "marker": {"symbol": "diamond" if p["pattern"] == "2:4" else "square", "size": 12,
                                "color": COLORS.get(p["method"]), "line": {"width": 1, "color": "black"}},
                     "hovertemplate": f"{p['method']} {p['pattern']}<br>ppl %{{y:.3f}}<br>KL {p['kl']:.4f}<extra></extra>"})
    shapes.append({"type": "rect", "xref": "paper", "x0": 0, "x1": 1, "y0": dense, "y1": dense * (1 + tol),
                   "fillcolor": "rgba(0,160,0,0.15)", "line": {"width": 0}})
    ev = res["evaluation"]
    layout = {"height": 420, "margin": {"l": 60, "r": 10, "t": 50, "b": 45}, "shapes": shapes,
              "title": {"text": f"Perplexity on {ev['tokens_scored']} held-out tokens ({ev['sequences']} x {ev['seq_len']}); "
                                f"band: 0 % sparsity +{tol:.0%}; dashed: essential sparsity, dotted: max curvature. Click a point to pick it.",
                        "font": {"size": 12}},
              "xaxis": {"title": {"text": "sparsity of the block linears (asked; hover: reached)"}, "tickformat": ".0%"},
              "yaxis": {"title": {"text": "perplexity"}, "type": "log" if log_y else "linear"},
              "legend": {"orientation": "h", "y": -0.2}}
    return {"data": data, "layout": layout}


def summary(res: dict | None) -> str:
    if not res:
        return ""
    # the sweep runs on the current variant: its 0 % point is that variant's perplexity, not the dense original's
    lines = [f"Perplexity of the current variant before sparsifying (0 %) **{res['dense']['ppl']:.3f}** on {res['evaluation']['tokens_scored']} tokens of the "
             f"held-out split; Wanda statistics from {res['calibration_tokens']} calibration tokens, computed once. "
             f"Sweep took {res['timing']['total_s']:.0f}s ({res['timing']['statistics_s']:.0f}s statistics, "
             f"{res['timing']['eval_s']:.0f}s evaluation).", ""]
    lines += ["| method | essential sparsity (ppl within tolerance) | max curvature |", "|---|---|---|"]
    for m, c in res["curves"].items():
        k = c.get("knee", {})
        mc = k.get("max_curvature_sparsity")
        lines.append(f"| {m} ({c['scope']}) | {k.get('essential_sparsity', 0):.0%} | {'-' if mc is None else f'{mc:.0%}'} |")
    for p in res["nm"]:
        lines.append(f"| {p['method']} {p['pattern']} | reached {p['sparsity']:.2%}, ppl {p['ppl']:.3f}, KL {p['kl']:.4f} | |")
    return "\n".join(lines)


def heatmap(sens: dict | None) -> go.Figure:
    fig = go.Figure()
    if not sens:
        return placeholder_figure("Compute the sensitivity grid to see which linears mind pruning")
    fig.add_trace(go.Heatmap(z=sens["kl"], x=[str(b) for b in sens["blocks"]], y=sens["types"], colorscale="Viridis",
                             colorbar={"title": {"text": "KL"}},
                             hovertemplate="block %{x}, %{y}<br>KL %{z:.5f}<extra></extra>"))
    ev = sens["evaluation"]
    fig.update_layout(height=120 + 28 * len(sens["types"]), margin={"l": 60, "r": 10, "t": 40, "b": 40},
                      title={"text": f"KL to the original when one linear alone is pruned: {sens['method']} "
                                     f"{sens['pattern']} {sens['sparsity']:.0%} ({ev['tokens_scored']} tokens)",
                             "font": {"size": 12}},
                      xaxis={"title": {"text": "block (original index)"}}, yaxis={"title": {"text": "module"}})
    return fig


# ---- handlers (plain functions; tests call them without a browser) ----------------------------------
@dataclass(frozen=True)
class SweepForm:
    """The sweep's settings from the Sparsity tab; `eval_tokens` 0 = the whole evaluation split, `log_y`
    only draws the chart."""

    methods: tuple[str, ...]
    patterns: tuple[str, ...] = ("unstructured",)
    points: int = 10
    max_sparsity: float = 0.9
    eval_tokens: int = 2048
    tolerance_pct: float = 1.0
    magnitude_scope: str = "global"
    log_y: bool = True

    def __post_init__(self):
        if not self.methods:
            raise RecipeError("choose at least one method")

    @classmethod
    def parse(cls, values: dict) -> "SweepForm":
        """{field: raw widget value} -> the form; a number field that is not a number is refused by name."""
        return cls(methods=tuple(values.get("methods") or ()), patterns=tuple(values.get("patterns") or ()),
                   points=whole(values, "points", 10), max_sparsity=number(values, "max_sparsity", 0.9),
                   eval_tokens=whole(values, "eval_tokens", sp.DEFAULT_EVAL_TOKENS),
                   tolerance_pct=number(values, "tolerance_pct", 1.0),
                   magnitude_scope=str(values.get("magnitude_scope") or "global"), log_y=bool(values.get("log_y", True)))


def run_sweep(store, sid, form: SweepForm, progress=None) -> dict:
    """Sweep the current variant; the result is kept in the workspace (variants never change once made)."""
    ws = store.workspace(sid)
    lm, v = ws.lm, ws.current
    cfg = sp.SweepConfig(methods=form.methods, patterns=form.patterns or ("unstructured",), points=form.points,
                         max_sparsity=form.max_sparsity, eval_tokens=form.eval_tokens or None,
                         tolerance=form.tolerance_pct / 100.0, scope={"magnitude": form.magnitude_scope},
                         source=ws.calibration.source)
    ids = ws.calib_ids() if "wanda" in form.methods else None
    cancel = store.begin_job(sid)
    return ws.result(v, "sparsity_sweep", (repr(cfg), ws.calibration), lambda: sp.sweep(
        lm, cfg, variant=v, calib_ids=ids, progress=progress, cancel=cancel))


def run_sensitivity(store, sid, method: str, sparsity: float, pattern: str, progress=None) -> dict:
    s, lm = store.workspace(sid), store.lm(sid)
    ids = s.calib_ids() if method == "wanda" else None
    with store.using(sid):
        return sp.sensitivity(lm, method, float(sparsity), pattern, variant=s.current, calib_ids=ids,
                              source=s.calibration.source, progress=progress, cancel=store.begin_job(sid))


def step_for(method: str, sparsity: float, pattern: str, magnitude_scope: str = "global") -> dict:
    step = {"op": "sparsify", "method": method, "pattern": pattern,
            "scope": magnitude_scope if method == "magnitude" else "row"}
    if pattern == "unstructured":
        step["sparsity"] = round(float(sparsity), 4)
    return step


def apply(store, sid, method: str, sparsity: float, pattern: str, magnitude_scope: str = "global", progress=None) -> str:
    """Add the chosen `sparsify` step to the current variant; -> a message with the measured sparsity."""
    v = store.apply_step(sid, step_for(method, sparsity, pattern, magnitude_scope), **({"progress": progress} if progress else {}))
    r = v.reports[-1]
    return (f"Applied {method} {pattern} {r['target_sparsity']:.0%} -> variant **{v.name}**: measured sparsity "
            f"{r['sparsity']:.2%} of the block linears ({r['zeros']:,} zeros), blocks changed {r['blocks_changed']}.")


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    js = click_bridge_js()
    with gr.Row():
        methods = gr.CheckboxGroup(list(sp.METHODS), value=["magnitude", "wanda"], label="Methods")
        patterns = gr.CheckboxGroup(list(sp.PATTERNS), value=["unstructured", "2:4"], label="Patterns (N:M = marked points)")
        scope = gr.Radio(["global", "layer"], value="global", label="Magnitude scope")
    with gr.Row():
        points = gr.Slider(3, 19, value=10, step=1, label="Points (0 .. max)")
        max_s = gr.Slider(0.5, 0.95, value=0.9, step=0.05, label="Max sparsity")
        tokens = gr.Dropdown(TOKEN_CHOICES, value=sp.DEFAULT_EVAL_TOKENS, label="Evaluation subset")
        tol = gr.Number(1.0, label="Tolerance (% of dense ppl)", minimum=0, maximum=100)
        log_y = gr.Checkbox(True, label="Log scale")
    with gr.Row():
        go_b = gr.Button("Run sweep", variant="primary")
        stop = gr.Button("Cancel")
    chart = gr.HTML(json.dumps(figure(None)), html_template='<div class="wb-chart"></div>', js_on_load=js, min_height=420,
                    elem_id="wb-sparsity-chart")
    info = gr.Markdown()
    with gr.Row():
        a_method = gr.Radio(list(sp.METHODS), value="wanda", label="Apply: method")
        a_pattern = gr.Radio(list(sp.PATTERNS), value="unstructured", label="Pattern")
        a_sparsity = gr.Slider(0.0, 0.95, value=0.5, step=0.01, label="Sparsity to apply")
        a_b = gr.Button("Apply to current variant", variant="primary")
    applied = gr.Markdown()
    with gr.Row():
        sens_b = gr.Button("Sensitivity grid at the chosen method / pattern / sparsity")
    heat = gr.Plot(label="Per-layer sensitivity")

    form = {"methods": methods, "patterns": patterns, "points": points, "max_sparsity": max_s, "eval_tokens": tokens,
            "tolerance_pct": tol, "magnitude_scope": scope, "log_y": log_y}

    def sweep_h(values: dict, progress=gr.Progress()):  # a set of inputs: one dict keyed by component
        f = SweepForm.parse(form_values(values, form))
        res = run_sweep(store, values[sid], f, progress_fn(progress))
        return json.dumps(figure(res, f.log_y)), summary(res)

    def relog(s, lg):
        res = store.workspace(s).latest(None, "sparsity_sweep") if s else None
        return json.dumps(figure(res, lg))

    def picked(evt: gr.EventData):
        m, x, p = decode(int(evt.block))
        return m, p, x

    def apply_h(s, m, x, p, sc, progress=gr.Progress()):
        return apply(store, s, m, x, p, sc, progress_fn(progress)), ctx.token()

    def sens_h(s, m, x, p, progress=gr.Progress()):
        return heatmap(run_sensitivity(store, s, m, x, p, progress_fn(progress)))

    go_b.click(g(sweep_h), {sid, *form.values()}, [chart, info], **ctx.heavy)
    stop.click(lambda s: store.cancel(s) if s else None, sid, None)
    log_y.change(g(relog), [sid, log_y], chart, show_progress="hidden")
    chart.click(picked, None, [a_method, a_pattern, a_sparsity])
    a_b.click(g(apply_h), [sid, a_method, a_sparsity, a_pattern, scope], [applied, ctx.changed], **ctx.heavy)
    sens_b.click(g(sens_h), [sid, a_method, a_sparsity, a_pattern], heat, **ctx.heavy)
    return {"chart": chart, "summary": info, "run": go_b, "apply": a_b, "sparsity": a_sparsity, "method": a_method,
            "pattern": a_pattern, "heatmap": heat, "sensitivity": sens_b}
