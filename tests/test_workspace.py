"""The engine Workspace and its one keyed result cache (engine/workspace.py, engine/results.py), and the
rule that nothing is cached on the loaded model object."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import evaluate as ev
from workbench.engine.analysis import influence
from workbench.engine.analysis.outliers import outlier_stats
from workbench.engine.data import calibration_ids
from workbench.engine.results import ResultCache
from workbench.engine.workspace import Workspace
from workbench.store import Store


def test_result_cache_keys_bytes_limits_and_the_original_key():
    from workbench.engine.variant import original_variant

    root = original_variant(3)
    v = root.with_dropped([1])
    c = ResultCache(limits={"big": 2})
    calls = []
    assert c.get_or_compute(v, "x", (1,), lambda: calls.append(1) or torch.zeros(10)).shape == (10,)
    c.get_or_compute(v, "x", (1,), lambda: calls.append(1))
    assert calls == [1]  # the second ask is a hit
    assert c.nbytes() == 40 and c.key(root, "x") == ("original", "x", ()) and c.key(v, "x")[0] == v.id
    c.put(original_variant(3), "x", (), 1.0)  # another session's original: the same key
    assert c.peek(root, "x") == 1.0
    for k in range(3):
        c.put(v, "big", (k,), torch.zeros(1))
    assert [key[2] for key, _ in c.items() if key[1] == "big"] == [(1,), (2,)]  # the oldest went
    c.put(v, "pinned", (), torch.zeros(100), pinned=True)
    assert c.nbytes() == 48  # pinned entries are not counted


def test_workspace_results_equal_direct_computation_and_are_computed_once(tiny_lm, monkeypatch):
    lm = tiny_lm("llama", layers=4)
    ws = Workspace(lm)
    ws.set_calibration(2, 16)
    ids = calibration_ids(lm.tokenizer, ws.calibration)
    assert torch.equal(ws.calib_ids(), ids)
    v = ws.push(ws.build([{"op": "prune_blocks", "blocks": [2]}]))
    assert ws.current is v and ws.variants == [ws.original, v] and ws.lineage[v.id][1] == v.steps

    want = influence.block_scores(lm, v, ids, "bi")
    got = ws.scores("bi")
    assert got["values"] == want["values"]
    assert ws.quick()["kl"] == ev.quick_eval(lm, v)["kl"]
    assert ws.outliers()["kurtosis"] == outlier_stats(lm, v, ids)["kurtosis"]

    monkeypatch.setattr(influence, "block_scores", lambda *a, **k: 1 / 0)  # a second ask must not compute
    assert ws.scores("bi") is got
    assert ws.figures(v)["quick"] is ws.quick()
    assert ws.undo() is ws.original and ws.peek(v, "scores", ("bi", ws.calibration)) is got


def test_the_original_s_results_are_shared_between_sessions(tiny_lm):
    st = Store(default_model="tiny", memory_budget=None)
    st.register_model(tiny_lm("llama", layers=3), "tiny")
    a, b = st.new_session(), st.new_session()
    st.attach(a)
    st.attach(b)
    qa = st.quick(a)
    assert st.quick(b) is qa  # the second session reads the first one's figures of the original
    st.apply_step(a, {"op": "prune_blocks", "blocks": [0]})
    assert st.quick(a) is not qa and st.current(b).is_identity()


def _attributes(lm) -> dict:
    """Every attribute name on the loaded model object and on each module of its model."""
    return {"lm": set(vars(lm)), **{f"module {n}": set(vars(m)) for n, m in lm.model.named_modules()}}


def test_nothing_is_set_on_the_loaded_model_or_its_modules(tiny_lm):
    """The app's handlers and the store's jobs keep their state in the workspace: after every analysis and
    operation the panels run, the loaded model object and its modules carry exactly the attributes they
    had when loaded."""
    from workbench.panels import attention, blocks, compare, influence as pinf, map as pmap, outliers, sparsity

    st = Store(default_model="tiny", memory_budget=None)
    lm = tiny_lm("llama", layers=4)
    st.register_model(lm, "tiny")
    sid = st.new_session()
    st.attach(sid)
    st.set_calibration(sid, 2, 16)
    before = _attributes(lm)

    st.quick(sid)
    for m in influence.METRICS:
        st.scores(sid, m)
    pinf.angular_runs(st, sid)
    outliers.compute(st, sid, "noop_first")
    attention.render(st, sid, attention.AttentionForm("a b c d", "current variant", 0.85, False, 0, "avg"))
    pmap.compute(st, sid, "first")
    sparsity.run_sweep(st, sid, sparsity.SweepForm(("magnitude",), ("unstructured",), points=2, eval_tokens=64))
    st.set_pending(sid, [1])
    st.preview(sid)
    st.apply_step(sid, {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "blocks": [1]})
    st.apply_step(sid, {"op": "fuse_blocks", "blocks": [2], "steps": 1, "samples": 2, "seq_len": 16, "batch": 2})
    st.quick(sid)
    st.full_eval(sid, max_tokens=64)
    list(compare.generate_pair(st, sid, "hello", 4))
    blocks.outlier_marks(st, sid, st.current(sid))
    assert _attributes(lm) == before


def test_a_preview_runs_from_where_it_differs_from_the_last_and_gives_the_same_figures(tiny_lm):
    """Clicks add and remove blocks of the selection: each preview starts at the first block where it
    differs from the previous one (or its own first change, if later) and its figures equal a fresh
    evaluation from its first change, to the bit."""
    from workbench.engine.variant import copy_block, original_variant

    lm = tiny_lm("llama", layers=6)
    qc = ev.quick_cache(lm)
    base = original_variant(6).derive("v1")
    changed = copy_block(lm.adapter.blocks(lm.model)[1])
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(0.9)
    base.overrides[1] = changed  # the current variant has a replaced block 1
    memo = ev.RunMemo()
    # selection after each click -> where the run must start: first ever: the first change (1); adding 4:
    # 4; adding 2: 2; removing 4: 4; the same again: nothing to run (6); removing 2: 2
    for sel, start in (([3], 1), ([3, 4], 4), ([2, 3, 4], 2), ([2, 3], 4), ([2, 3], 6), ([3], 2)):
        v = base.with_dropped(sel, name="preview")
        got = ev.quick_eval(lm, v, reference=qc, memo=memo)
        fresh = ev.quick_eval(lm, v, reference=qc)
        assert memo.runs[-1] == start, (sel, memo.runs)
        assert {k: got[k] for k in ("kl", "top1", "nll")} == {k: fresh[k] for k in ("kl", "top1", "nll")}
    assert all(s is None for s in memo.states[:1])  # below the first change: the trace's own tensors
    # another current variant, the original below block 5: from its first change, on the trace's state
    other = original_variant(6).with_dropped([5])
    got = ev.quick_eval(lm, other, reference=qc, memo=memo)
    assert memo.runs[-1] == 5 and got["kl"] == ev.quick_eval(lm, other, reference=qc)["kl"]
    assert memo.states[:5] == [None] * 5


def test_a_preview_asked_again_for_the_same_selection_is_not_rerun(store, sid, monkeypatch):
    """The page asks for the preview ahead (while the chart travels) and again for the figures: the second
    ask returns the first's figures without a run; a changed selection or current variant runs again and
    gives what a fresh evaluation gives."""
    calls = []
    real = ev.quick_eval
    monkeypatch.setattr(ev, "quick_eval", lambda *a, **k: [calls.append(a[1].dropped()), real(*a, **k)][1])
    store.toggle(sid, 1)
    first = store.preview(sid)
    assert store.preview(sid) is first and len(calls) == 1
    store.toggle(sid, 2)
    second = store.preview(sid)
    assert len(calls) == 2 and calls[-1] == [1, 2]
    fresh = real(store.lm(sid), store.current(sid).with_dropped([1, 2]))
    assert {k: second[k] for k in ("kl", "top1")} == pytest.approx({k: fresh[k] for k in ("kl", "top1")}, rel=1e-6)
    store.apply_step(sid, {"op": "prune_blocks", "blocks": [3]})  # a new current variant: asked again, run again
    store.set_pending(sid, [1, 2])
    store.preview(sid)
    assert len(calls) == 3
