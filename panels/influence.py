"""Influence panel: every block metric in one table (CSV download) and the angular-distance heatmap.

The heatmap (Gromov et al.) shows d(l, n) for every start block l and run length n; clicking a cell
selects that run of blocks (the selection the Blocks tab prunes, fuses or quantizes). "Compute" runs
one traced pass (heatmap) and one skipped-block scan (MI and perplexity drop together), and fills the
session's score cache, so the Blocks chart then switches between metrics instantly. Results are kept
per (variant, calibration).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile

import gradio as gr

from workbench.engine.analysis import influence
from workbench.panels.chart import click_bridge_js
from workbench.panels.context import progress_fn

TITLE = "Influence"
COLUMNS = ["block", "state", "mi", "bi", "angular", "ppl_drop", "ppl_without"]
_CELL = 10000  # heatmap cell code: n * _CELL + start position (the click bridge carries one number)


def _peek(store, sid, analysis: str, params):
    """A cached result of the current variant, or None (never computes)."""
    ws = store.workspace(sid)
    return ws.peek(ws.current, analysis, params)


def _scores(store, sid, metric: str):
    return _peek(store, sid, "scores", (metric, store.workspace(sid).calibration))


def angular_runs(store, sid: str, progress=None, cancel=None) -> dict:
    """`angular_distances` of the current variant on the session's calibration (cached)."""
    return store.workspace(sid).angular(progress=progress, cancel=cancel)


def every_metric(store, sid: str, progress=None, cancel=None) -> dict:
    """All metrics of the current variant from one scan; also what the Blocks chart reads."""
    return store.workspace(sid).all_scores(progress=progress, cancel=cancel)


def cached_values(store, sid: str, exclude: str | None = None) -> dict[str, list]:
    """{metric: per-block values} already computed for the current variant and calibration (no work)."""
    return {m: r["values"] for m in influence.METRICS if m != exclude and (r := _scores(store, sid, m)) is not None}


def hover_extra(others: dict[str, list], i: int) -> str:
    """The other metrics of block i for the chart's hover text."""
    return "".join(f"<br>{m}: {'n/a' if v[i] is None else format(v[i], '.4g')}" for m, v in others.items())


def heatmap_figure(runs: dict | None) -> dict:
    """Plotly JSON: rows n = 1..P (run length), columns the run's first block (original index)."""
    if not runs:
        from workbench.panels.chart import placeholder

        return placeholder("Press Compute to draw the angular-distance heatmap", 420)
    blocks = runs["blocks"]
    p = len(blocks)
    labels = [str(b) for b in blocks]
    z, code, hover = [], [], []
    for n, row in enumerate(runs["matrix"], start=1):
        z.append(row)
        code.append([n * _CELL + l if d is not None else None for l, d in enumerate(row)])
        hover.append([f"{n} block(s) from {blocks[l]}: {blocks[l:l + n]}<br>d = {d:.4f}" if d is not None else ""
                      for l, d in enumerate(row)])
    best = runs["best"]
    heat = {"type": "heatmap", "x": labels, "y": list(range(1, p + 1)), "z": z, "customdata": code,
            "text": hover, "hovertemplate": "%{text}<extra></extra>", "colorscale": "Viridis",
            "colorbar": {"title": {"text": "d"}}, "xgap": 1, "ygap": 1}
    marks = {"type": "scatter", "mode": "markers", "x": [labels[b["start"]] for b in best],
             "y": [b["n"] for b in best], "customdata": [b["n"] * _CELL + b["start"] for b in best],
             "marker": {"symbol": "star", "size": 9, "color": "#E45756"}, "name": "best run per n",
             "hovertemplate": "best run of %{y}<extra></extra>"}
    layout = {"height": 420, "margin": {"l": 50, "r": 10, "t": 40, "b": 40},
              "title": {"text": "Angular distance d(l, n) = arccos(cos(h_l, h_l+n)) / pi; click a cell to select that run",
                        "font": {"size": 13}},
              "xaxis": {"title": {"text": "first block of the run (original index)"}, "type": "category"},
              "yaxis": {"title": {"text": "run length n"}, "dtick": 1 if p <= 40 else None}, "showlegend": False,
              "plot_bgcolor": "rgba(0,0,0,0)", "paper_bgcolor": "rgba(0,0,0,0)"}
    return {"data": [heat, marks], "layout": layout}


def best_text(runs: dict | None, limit: int = 8) -> str:
    if not runs:
        return ""
    lines = [f"- n={b['n']}: blocks {b['blocks']} (d = {b['distance']:.4f})" for b in runs["best"][:limit]]
    return "Best run per length (smallest angular distance):\n" + "\n".join(lines)


def table_rows(store, sid: str, every: dict) -> list[list]:
    """One row per original block: its state and every metric (None where dropped or not computed)."""
    v = store.current(sid)
    ppl = every.get("ppl", {})
    rows = []
    for i in range(v.num_blocks):
        def val(m, field="values"):
            x = every.get(m, {}).get(field)
            return None if x is None or x[i] is None else round(float(x[i]), 6)

        rows.append([i, v.block_state(i), val("mi"), val("bi"), val("angular"), val("ppl"),
                     None if not ppl else val("ppl", "ppl_without")])
    return rows


def csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(["" if x is None else x for x in r] for r in rows)
    return buf.getvalue()


def write_csv(rows: list[list]) -> str:
    """The table as a CSV file in the temp folder (gradio serves files from there)."""
    f = tempfile.NamedTemporaryFile("w", suffix=".csv", prefix="block-influence-", delete=False, encoding="utf-8")
    with f:
        f.write(csv_text(rows))
    return f.name


def compute(store, sid: str, progress=gr.Progress()):
    """Heatmap first (one pass), then the table (one scan). Yields (heatmap, best, table, csv, status)."""
    pf = progress_fn(progress)
    cancel = store.begin_job(sid)
    runs = angular_runs(store, sid, pf, cancel)
    yield json.dumps(heatmap_figure(runs)), best_text(runs), gr.update(), gr.update(), "Scanning every block…"
    every = every_metric(store, sid, pf, cancel)
    rows = table_rows(store, sid, every)
    secs = max(r.get("seconds", 0.0) for r in every.values())
    note = (f"All metrics of **{store.current(sid).name}** on {every['mi']['tokens']} calibration tokens "
            f"({secs:.1f} s); higher = more important for every metric.")
    yield gr.update(), gr.update(), rows, write_csv(rows), note


def shown(store, sid: str | None):
    """What the panel shows for the current variant from the cache (nothing is computed here)."""
    if not sid or store.session(sid).spec is None:
        return json.dumps(heatmap_figure(None)), "", [], None, ""
    s = store.session(sid)
    runs = _peek(store, sid, "angular_runs", (s.calibration,))
    every = {m: r for m in influence.METRICS if (r := _scores(store, sid, m)) is not None}
    rows = table_rows(store, sid, every) if every else []
    hint = "" if runs else f"Variant **{s.current.name}**: press Compute for the heatmap and the table."
    return json.dumps(heatmap_figure(runs)), best_text(runs), rows, (write_csv(rows) if rows else None), hint


def select_cell(store, sid: str, code: int) -> tuple[list[int], str]:
    """Select the run of blocks a heatmap cell stands for. -> (blocks, status)."""
    runs = _peek(store, sid, "angular_runs", (store.workspace(sid).calibration,))
    if not runs:
        return store.pending(sid), "Press Compute first."
    n, start = divmod(int(code), _CELL)
    if not 1 <= n <= len(runs["blocks"]) or start + n > len(runs["blocks"]):
        return store.pending(sid), "That cell is past the last block: no run there."
    run = runs["blocks"][start : start + n]
    store.set_pending(sid, run)
    d = runs["matrix"][n - 1][start]
    return run, f"Selected the run of {n} block(s) {run} (d = {d:.4f}); prune, fuse or quantize it in the Blocks tab."


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    js = click_bridge_js()

    with gr.Row():
        compute_b = gr.Button("Compute (heatmap + all metrics)", variant="primary", scale=2)
        cancel_b = gr.Button("Cancel job", variant="stop", scale=1)
    status = gr.Markdown(elem_id="wb-influence-status")
    with gr.Row():
        with gr.Column(scale=3):
            heat = gr.HTML(json.dumps(heatmap_figure(None)), html_template='<div class="wb-chart"></div>',
                           js_on_load=js, elem_id="wb-heatmap", min_height=420)
        with gr.Column(scale=1):
            best = gr.Markdown(elem_id="wb-best-runs")
    table = gr.Dataframe(headers=COLUMNS, datatype=["number", "str"] + ["number"] * 5, interactive=False,
                         label="All metrics per block (original indices)", elem_id="wb-influence-table")
    download = gr.DownloadButton("Download CSV", value=None)

    outs = [heat, best, table, download, status]

    def on_compute(s: str, progress=gr.Progress()):
        yield from compute(store, s, progress)

    compute_b.click(g(on_compute), sid, outs, api_name="influence_compute", **ctx.heavy)
    cancel_b.click(g(lambda s: store.cancel(s)), sid, None, show_progress="hidden")
    ctx.changed.change(g(lambda s: shown(store, s)), sid, outs, show_progress="hidden")

    if "chart" not in ctx.components.get("blocks", {}):  # with the Blocks tab, `blocks.wire` handles the click

        def on_cell_alone(s: str, evt: gr.EventData):
            return select_cell(store, s, int(evt.block))[1]

        heat.click(g(on_cell_alone), sid, status, show_progress="hidden")
    return {"heatmap": heat, "table": table, "download": download, "compute": compute_b, "status": status,
            "best": best}
