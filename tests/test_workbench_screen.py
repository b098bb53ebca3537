"""The Workbench screen's handlers without a browser (tiny random llama): layered block marks, the
clipped scale, the background Macro Influence scan, click -> preview figures, apply in plain words,
variants in order, the size-vs-KL plot with its Pareto front."""

from __future__ import annotations

import json

import pytest

from workbench.engine import evaluate as ev
from workbench.engine.errors import Cancelled
from workbench.engine.pareto import pareto_front
from workbench.panels import blocks as bp
from workbench.panels import workbench as wb

APPLY = dict(rank=4, steps=2, method="rtn", bits=4, group_size=32, observer="minmax", shrink=0.0,
             sp_method="magnitude", sparsity=0.5)


def run(gen):
    """Drain a handler generator -> its last yield."""
    out = None
    for out in gen:
        pass
    return out


def apply(store, sid, mode, **kw):
    return run(wb.apply_job(store, sid, bp.ApplyForm(mode, **{**APPLY, **kw}), poll=0.01))


def test_scale_clips_the_tallest_bar_and_labels_it():
    ys, clipped, top = wb.scaled([1.0, 0.1, 0.2, None], "clipped")
    assert clipped == [0] and top == pytest.approx(0.26) and ys[0] == pytest.approx(0.26)
    assert ys[1:3] == [0.1, 0.2] and ys[3] == pytest.approx(0.04 * 0.26)  # dropped: a stub bar
    assert wb.scaled([0.3, 0.2], "clipped")[1] == []  # no outlier bar: nothing clipped
    ys, clipped, top = wb.scaled([1.0, 0.1, 0.0], "log")
    assert clipped == [] and ys[2] == pytest.approx(0.05)  # log: zero drawn at half the smallest positive


def test_chart_shows_block_influence_until_the_mi_scan_is_done_then_mi(store, sid):
    fig = wb.chart_figure(store, sid, "mi", "linear")
    assert fig["metric"] == "bi" and "being computed" in fig["layout"]["title"]["text"]
    assert fig["data"][0]["y"] == store.scores(sid, "bi")["values"]
    lines = list(wb.scan_job(store, sid, "mi", "linear", poll=0.001))
    assert wb.mi_ready(store, sid)
    final = json.loads(lines[-1][0])
    assert final["metric"] == "mi" and final["data"][0]["y"] == store.scores(sid, "mi")["values"]
    assert lines[-1][2]["visible"] is False  # Cancel hidden once the scan is over
    # a second scan of the same variant is only a redraw
    assert len(list(wb.scan_job(store, sid, "mi", "linear"))) == 1


def test_clipped_chart_labels_the_clipped_bar_with_its_real_value(store, sid):
    ws = store.workspace(sid)
    ws.cache_for(ws.current).put(ws.current, "scores", ("bi", ws.calibration), {"values": [1.0, 0.1, 0.2, 0.15], "unit": "1 - cos"})
    fig = wb.chart_figure(store, sid, "bi", "clipped")
    assert fig["data"][0]["y"][0] == pytest.approx(0.26)
    assert [a["text"] for a in fig["layout"]["annotations"]] == ["✂ 1"] and fig["layout"]["annotations"][0]["x"] == 0


def test_a_fused_block_keeps_its_mark_when_quantized_and_sparsified(store, sid, monkeypatch):
    monkeypatch.setitem(bp.FUSE_DEFAULTS, "guard_samples", 0)  # keep the fusion whatever it measures
    store.toggle(sid, 1)
    apply(store, sid, "fuse")
    fused = store.current(sid)
    nb = fused.reports[-1]["per_block"][0]["neighbours"]
    apply(store, sid, "quantize")  # nothing selected: every kept block
    store.toggle(sid, nb[0])
    apply(store, sid, "sparsify")
    v = store.current(sid)
    marks = wb.block_marks(v)
    assert marks[1] == {"dropped": True, "fused": False, "bits": None, "sparsity": None}
    for j in nb:
        assert marks[j]["fused"] and marks[j]["bits"] == 4
    assert marks[nb[0]]["sparsity"] == 0.5 and all(marks[j]["sparsity"] is None for j in nb[1:])
    assert v.block_state(nb[1]).startswith("quantized")  # the single tag lost "fused": the marks keep it
    bar = wb.chart_figure(store, sid, "bi", "linear")["data"][0]
    assert bar["marker"]["color"][nb[1]] == wb.FILL["fused"] and bar["text"][nb[1]] == "4b"
    assert bar["marker"]["pattern"]["shape"][nb[0]] == "/" and bar["marker"]["color"][1] == wb.FILL["dropped"]
    assert "fused, 4-bit, 50% sparse" in bar["hovertext"][nb[0]]
    # a fusion whose output guard kept plain removal marks no neighbour as fused
    guarded = fused.derive("g")
    guarded.reports = [dict(r) for r in fused.reports]
    guarded.reports[-1]["per_block"] = [{**fused.reports[-1]["per_block"][0], "guard": {"kept": "removal"}}]
    assert not any(m["fused"] for m in wb.block_marks(guarded))


def test_click_selects_and_the_preview_column_matches_the_engine(store, sid):
    chart, text = wb.click(store, sid, "bi", "clipped", 2)
    bar = json.loads(chart)["data"][0]
    assert bar["marker"]["line"]["width"] == [0, 0, 3, 0] and "selected: **2**" in text
    assert "selected" in bar["hovertext"][2]
    md = wb.figures_md(store, sid)
    lm = store.lm(sid)
    q = ev.quick_eval(lm, store.current(sid).with_dropped([2]))  # independent of the store's caches
    header = md.splitlines()[0]
    assert "preview: original without 2" in header
    kl_row = next(r for r in md.splitlines() if r.startswith("| KL"))
    assert kl_row.split("|")[3].strip() == f"{q['kl']:.4f}"
    assert next(r for r in md.splitlines() if r.startswith("| blocks")).split("|")[3].strip() == "3 of 4"
    wb.click(store, sid, "bi", "clipped", 2)  # deselect: no preview column
    assert "preview" not in wb.figures_md(store, sid)


def test_apply_speaks_plain_words_and_names_variants_in_order(store, sid):
    for b in (2, 1):
        store.toggle(sid, b)
    job, status, cancel, token = apply(store, sid, "prune")
    v = store.current(sid)
    q = ev.quick_eval(store.lm(sid), v)
    assert status == (f"Pruned blocks 1, 2 → v1: 2 of 4 blocks, KL {wb.num(q['kl'])}, top-1 {q['top1'] * 100:.0f} %, "
                      f"{q['bytes'] / 2**20:.2g} MiB")
    assert wb.num(0.5129) == "0.51" and wb.num(0.01234) == "0.012" and wb.mib(230 * 2**20) == "230 MiB"
    assert "{" not in status and job == "" and cancel["visible"] is False and token
    store.toggle(sid, 0)
    _, status, _, _ = apply(store, sid, "fuse")
    assert status.startswith("Fused block 0 into their neighbours → v2") and "Plain removal of the same blocks → v3" in status
    apply(store, sid, "quantize")
    assert [v.name for v in store.variants(sid)] == ["original", "v1", "v2", "v3", "v4"]
    lines = wb.variants_md(store, sid).splitlines()
    assert lines[0].startswith("1. **original**: the loaded model")
    assert lines[3].startswith("4. **v3**: plain removal of block 0 (from v1), beside fused v2")
    assert lines[4].startswith("5. **v4**: quantized 1 block to 4-bit RTN (groups of 32) (from v2)") and lines[4].endswith("◀ current")


def test_apply_job_reports_progress_and_a_cancel_leaves_the_variant(store, sid, monkeypatch):
    store.toggle(sid, 1)
    seen = list(wb.apply_job(store, sid, bp.ApplyForm("quantize", **APPLY), poll=0.0005))
    assert seen[-1][1].startswith("Quantized 1 block to 4-bit RTN")
    assert all(y[2]["visible"] for y in seen[:-1]) and seen[-1][2]["visible"] is False
    before = store.current(sid)

    def cancelled(*a, **k):
        raise Cancelled("cancelled")

    monkeypatch.setattr(store, "apply_step", cancelled)
    store.toggle(sid, 2)
    _, status, cancel, token = apply(store, sid, "prune")
    assert status == f"Cancelled: nothing was changed; the current variant is still {before.name}."
    assert store.current(sid) is before and cancel["visible"] is False


def test_variants_plot_keeps_every_variant_in_view_and_marks_the_pareto_front(store, sid):
    store.toggle(sid, 1)
    apply(store, sid, "prune")
    apply(store, sid, "quantize")
    store.toggle(sid, 2)
    apply(store, sid, "prune")
    fig = wb.variants_figure(store, sid)
    pts = fig["data"][1]
    xs, ys = pts["x"], pts["y"]
    assert len(xs) == 4 and fig["front"] == pareto_front(list(zip(xs, ys)))
    assert pts["marker"]["symbol"] == ["star" if i in fig["front"] else "circle" for i in range(4)]
    lo, hi = fig["layout"]["xaxis"]["range"]
    assert lo < min(xs) and hi > max(xs)
    lo, hi = fig["layout"]["yaxis"]["range"]
    assert lo < min(ys) and hi > max(ys)
    assert 0 in fig["front"]  # the original: the only one with KL 0


def test_the_app_opens_on_the_workbench_tab(store):
    from workbench.app import PANELS, build_app

    assert PANELS[0] == "workbench"
    demo = build_app(store=store)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"wb-main-chart", "wb-main-apply", "wb-main-figures", "wb-main-plot", "wb-main-cancel"} <= ids
    cancel = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "wb-main-cancel")
    assert cancel.visible is False


def test_outliers_heatmap_leaves_a_dropped_block_empty_and_unclickable():
    from workbench.panels.outliers import HEAD_CODE, noop_figure

    stats = {"noop_first": [[0.1, 0.2], None, [0.5, 0.6]]}  # block 1 dropped
    trace = noop_figure(stats)["data"][0]
    assert trace["y"] == ["0", "1 (dropped)", "2"]  # categorical rows: no interpolation across the gap
    assert trace["z"][1] == [None, None] and trace["customdata"][1] == [-1, -1]
    assert trace["customdata"][2] == [2 * HEAD_CODE, 2 * HEAD_CODE + 1]
    assert "No delimiter" in noop_figure({"noop_delim": [None, None]}, "noop_delim")["layout"]["annotations"][0]["text"]


def test_placeholders_say_what_to_do_without_empty_axes(store):
    from workbench.panels import blocks, influence, outliers, sparsity

    for fig in (blocks.chart_figure(store, None, "bi"), wb.chart_figure(store, None), wb.variants_figure(store, None),
                outliers.noop_figure(None), sparsity.figure(None), influence.heatmap_figure(None)):
        lay = fig["layout"]
        assert fig["data"] == [] and lay["xaxis"]["visible"] is False and lay["yaxis"]["visible"] is False
        assert lay["annotations"][0]["text"][0].isupper()
    heat = sparsity.heatmap(None)
    assert heat.layout.xaxis.visible is False and heat.layout.annotations[0].text.startswith("Compute")


def test_sparsity_summary_names_the_current_variants_perplexity_not_dense():
    from workbench.panels.sparsity import summary

    res = {"dense": {"ppl": 12.3456}, "evaluation": {"tokens_scored": 100}, "calibration_tokens": 8,
           "timing": {"total_s": 1.0, "statistics_s": 0.1, "eval_s": 0.5}, "curves": {}, "nm": []}
    text = summary(res)
    assert "current variant before sparsifying (0 %) **12.346**" in text and "Dense perplexity" not in text


def test_an_analysis_opens_from_the_selected_block(store, sid):
    """"Open its attention" / "Open its outlier heads": the tab switches and shows the selected block,
    the same figures the tab itself computes for it; no selection or several give one clear line."""
    from workbench.engine.errors import WorkbenchError
    from workbench.panels import attention, outliers

    with pytest.raises(WorkbenchError, match="select one block"):
        wb.open_attention(store, sid, attention.DEFAULT_PROMPT, 0.85, False)
    store.toggle(sid, 1)
    store.toggle(sid, 3)
    with pytest.raises(WorkbenchError, match="2 are selected: blocks 1, 3"):
        wb.open_outliers(store, sid, "noop_first")
    store.toggle(sid, 1)  # block 3 alone

    tab, grid, hmap, bars, info, block, head = wb.open_attention(store, sid, attention.DEFAULT_PROMPT, 0.85, False)
    assert tab.selected == "attention" and block["value"] == 3 and head["value"] == "avg"
    want = attention.render(store, sid, attention.AttentionForm(attention.DEFAULT_PROMPT, "current variant", 0.85, False, 3, "avg"))
    assert info == want[3] and bars.to_plotly_json()["data"][0]["y"] == want[2].to_plotly_json()["data"][0]["y"]
    assert "block 3" in bars.layout.title.text  # the PageRank of the selected block, not block 0's

    tab, heat, norms, summary = wb.open_outliers(store, sid, "noop_first")
    heat_want, _, summary_want = outliers.compute(store, sid, "noop_first")
    assert tab.selected == "outliers" and heat == heat_want
    assert summary.startswith("Opened from the Workbench screen on **block 3**") and summary.endswith(summary_want)


def test_the_open_buttons_are_wired_to_the_tabs(store):
    from workbench.app import build_app

    demo = build_app(store=store)
    by_id = {getattr(b, "elem_id", None): i for i, b in demo.blocks.items()}
    tabs = next(i for i, b in demo.blocks.items() if type(b).__name__ == "Tabs")
    for button, tab_out in (("wb-main-open-attention", "wb-attention-grid"), ("wb-main-open-outliers", "wb-noop")):
        dep = next(d for d in demo.fns.values() if any(t[0] == by_id[button] for t in d.targets))
        outs = [o._id for o in dep.outputs]
        assert tabs in outs and by_id[tab_out] in outs
