"""Influence panel handlers without a browser: heatmap, table + CSV, cell selection, cache sharing."""

from __future__ import annotations

import csv
import io
import json

import pytest

from workbench.engine.analysis import influence as inf
from workbench.engine.data import calibration_ids
from workbench.panels import influence as panel



@pytest.fixture
def store_sid(tiny_store):
    return tiny_store(layers=5, calibration=(2, 16))


def _compute(store, sid):
    return list(panel.compute(store, sid, progress=None))


def test_compute_fills_heatmap_table_csv_and_the_chart_cache(store, sid):
    store.apply_step(sid, {"op": "prune_blocks", "blocks": [2]})
    first, last = _compute(store, sid)
    lm, v = store.lm(sid), store.current(sid)
    ids = calibration_ids(lm.tokenizer, store.session(sid).calibration)
    ref = inf.angular_distances(lm, v, ids)
    fig = json.loads(first[0])
    assert fig["data"][0]["z"] == ref["matrix"] and fig["data"][0]["x"] == ["0", "1", "3", "4"]
    rows, path = last[2], last[3]
    every = inf.all_scores(lm, v, ids)
    for row in rows:
        i = row[0]
        for col, m in (("mi", "mi"), ("bi", "bi"), ("angular", "angular"), ("ppl_drop", "ppl")):
            want = every[m]["values"][i]
            got = row[panel.COLUMNS.index(col)]
            assert (got is None) == (want is None) and (want is None or abs(got - want) < 1e-5)
    assert rows[2][1] == "dropped" and rows[2][2] is None
    with open(path, encoding="utf-8") as f:
        back = list(csv.reader(f))
    assert back[0] == panel.COLUMNS and len(back) == 1 + v.num_blocks
    assert float(back[4][2]) == pytest.approx(rows[3][2])
    # the Blocks chart's cache now holds every metric: no recomputation when switching
    ws = store.workspace(sid)
    for m in inf.METRICS:
        assert store.scores(sid, m) is ws.peek(v, "scores", (m, ws.calibration)) is not None


def test_cell_click_selects_the_run_in_original_indices(store, sid):
    store.apply_step(sid, {"op": "prune_blocks", "blocks": [1]})
    _compute(store, sid)
    run, note = panel.select_cell(store, sid, 2 * panel._CELL + 1)  # n = 2 from position 1
    assert run == [2, 3] and store.pending(sid) == [2, 3] and "[2, 3]" in note
    run, note = panel.select_cell(store, sid, 4 * panel._CELL + 2)  # past the end: nothing changes
    assert store.pending(sid) == [2, 3] and "past the last block" in note


def test_shown_reads_only_the_cache(store, sid):
    heat, best, rows, path, hint = panel.shown(store, sid)
    assert rows == [] and "press Compute" in hint and json.loads(heat)["data"] == []
    _compute(store, sid)
    heat, best, rows, path, hint = panel.shown(store, sid)
    assert len(rows) == 5 and "n=1" in best and hint == ""
    assert panel.csv_text(rows).splitlines()[0] == ",".join(panel.COLUMNS)
    # each best run is the smallest distance of its row
    runs = store.workspace(sid).angular()  # the cached result (no second scan)
    for b in runs["best"]:
        assert b["distance"] == min(d for d in runs["matrix"][b["n"] - 1] if d is not None)
    assert io.StringIO(panel.csv_text(rows)).read().count("\n") == 6


def test_blocks_chart_hover_shows_every_computed_metric(store, sid):
    from workbench.panels import blocks

    bar = blocks.chart_figure(store, sid, "bi")["data"][0]
    assert "<br>mi:" not in bar["hovertext"][0]  # nothing else computed yet
    _compute(store, sid)
    bar = blocks.chart_figure(store, sid, "bi")["data"][0]
    every = panel.cached_values(store, sid)
    for i, text in enumerate(bar["hovertext"]):
        assert text.startswith(format(every["bi"][i], ".4g"))
        for m in ("mi", "angular", "ppl"):
            assert f"<br>{m}: {format(every[m][i], '.4g')}" in text
