"""Sparsity: masks against naive references, Wanda against its formula, sweep, step, export round trip."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.engine import evaluate as ev
from workbench.engine import masks
from workbench.engine.adapters import linear_weight
from workbench.engine.analysis import sparsity as sp
from workbench.engine.errors import RecipeError
from workbench.engine.ops import sparsify
from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
from workbench.engine.variant import original_variant, state_fingerprint, view_model


def self_checks():
    """bench/self_checks.py (the GPU self-checks live with the benches, not in the library)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "self_checks.py"
    spec = importlib.util.spec_from_file_location("self_checks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- naive references ------------------------------------------------------------------------------
def naive_keep(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sort all scores (stable), prune the first k: the definition, one element at a time."""
    order = sorted(range(flat.numel()), key=lambda j: (float(flat[j]), j))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    for j in order[:k]:
        keep[j] = False
    return keep


def tied_scores(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, shape, generator=g).float()  # many ties, as on a 4-bit grid


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.9])
def test_layer_and_row_masks_match_naive(sparsity):
    s = tied_scores((6, 16))
    k = masks.prune_count(sparsity, s.numel())
    assert torch.equal(masks.layer_mask(s, sparsity).reshape(-1), naive_keep(s.reshape(-1), k))
    kr = masks.prune_count(sparsity, 16)
    rows = torch.stack([naive_keep(s[r], kr) for r in range(6)])
    assert torch.equal(masks.row_mask(s, sparsity), rows)
    # thresholds computed once beforehand give the same mask
    th = s.sort(dim=1).values[:, kr - 1] if kr else None
    if th is not None:
        assert torch.equal(masks.row_mask(s, sparsity, th), rows)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.75])
def test_global_masks_match_naive(sparsity):
    parts = [tied_scores((4, 8), 1), tied_scores((3, 12), 2), tied_scores((5, 4), 3)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    ref = naive_keep(flat, masks.prune_count(sparsity, flat.numel()))
    got = torch.cat([m.reshape(-1) for m in masks.global_masks(parts, sparsity)])
    assert torch.equal(got, ref)
    assert int((~got).sum()) == masks.prune_count(sparsity, flat.numel())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_keeps_at_most_n_per_group(n, m):
    w = torch.randn(5, 32)
    keep = masks.nm_mask(w.abs(), n, m)
    pruned = w * keep
    groups = (pruned != 0).reshape(5, 32 // m, m).sum(-1)
    assert int(groups.max()) <= n and int(groups.min()) == n  # random weights: exactly n survive
    # the survivors are the n largest of each group (naive per-group check)
    for r in range(5):
        for g0 in range(0, 32, m):
            grp = w[r, g0 : g0 + m].abs()
            ref = naive_keep(grp, m - n)
            assert torch.equal(keep[r, g0 : g0 + m], ref)


def test_nm_rejects_bad_width():
    with pytest.raises(RecipeError):
        masks.nm_mask(torch.rand(2, 6), 2, 4)


def test_wanda_scores_formula():
    w = torch.randn(3, 5)
    x = torch.randn(7, 5)
    norm = x.pow(2).sum(0).sqrt()
    s = masks.wanda_scores(w, norm)
    for i in range(3):
        for j in range(5):
            ref = abs(float(w[i, j])) * math.sqrt(sum(float(x[t, j]) ** 2 for t in range(7)))
            assert abs(float(s[i, j]) - ref) < 1e-5


def test_wanda_input_norms_match_hand_computed(tiny_lm):
    lm = tiny_lm("llama", layers=2)
    ids = torch.randint(1, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    v = original_variant(lm.num_blocks)
    targets = sp.prunable_linears(lm, v)
    norms = sparsify.input_norms(lm, v, targets, ids, batch=2)
    with torch.no_grad():
        layer0 = lm.model.model.layers[0]
        h = layer0.input_layernorm(lm.model.model.embed_tokens(ids))  # input of q, k and v in block 0
    ref = h.pow(2).sum((0, 1)).sqrt()
    for name in ("q", "k", "v"):
        assert torch.allclose(norms[f"0.{name}"], ref, rtol=1e-4, atol=1e-5)


def test_knee_hand_case():
    xs = [0.0, 0.25, 0.5, 0.75, 1.0 - 1e-9]
    ppl = [math.e**0, math.e**0.001, math.e**0, math.e**1, math.e**2]
    k = sp.knee(xs[:4] + [0.99], ppl, tolerance=0.01)
    assert k["essential_sparsity"] == 0.5
    assert k["max_curvature_sparsity"] == 0.5
    k = sp.knee([0.0, 0.1, 0.2, 0.3], [10.0, 10.05, 10.2, 10.0], tolerance=0.01)
    assert k["essential_sparsity"] == 0.1  # 0.3 is back within 1 % but the curve left the band at 0.2


# ---- the step ---------------------------------------------------------------------------------------
def _apply(lm, step: dict, **ctx_kw):
    ctx = OpContext(lm=lm, **ctx_kw)
    return apply_steps(ctx, original_variant(lm.num_blocks), [step_from_dict(step)])


def test_step_validation():
    with pytest.raises(RecipeError):
        step_from_dict({"op": "sparsify", "method": "random", "sparsity": 0.5})
    with pytest.raises(RecipeError):
        step_from_dict({"op": "sparsify", "method": "magnitude", "sparsity": 0.3, "pattern": "2:4"})
    with pytest.raises(RecipeError):
        step_from_dict({"op": "sparsify", "method": "magnitude", "sparsity": 1.5})
    with pytest.raises(RecipeError):
        step_from_dict({"op": "sparsify", "method": "magnitude"})
    s = step_from_dict({"op": "sparsify", "method": "wanda", "pattern": "4:8"})
    assert s.sparsity == 0.5 and s.scope == "row"


def test_step_changes_only_chosen_blocks_and_never_the_original(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    before = state_fingerprint(lm.model)
    v = _apply(lm, {"op": "sparsify", "method": "magnitude", "sparsity": 0.5, "scope": "layer", "blocks": [1, 2]})
    after = state_fingerprint(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(v.overrides) == [1, 2] and v.tags[1] == "sparse 50%"
    report = v.reports[-1]
    for row in report["per_layer"]:
        mod = lm.adapter.linears(v.overrides[row["block"]])[row["module"]]
        w = linear_weight(mod)
        assert row["zeros"] == int((w == 0).sum()) == masks.prune_count(0.5, w.numel())
    # embeddings, norms, LM head are the original tensors in the runnable view
    vm = view_model(lm.model, lm.adapter, v)
    assert vm.model.embed_tokens.weight is lm.model.model.embed_tokens.weight
    assert vm.lm_head.weight is lm.model.lm_head.weight
    # unchanged block: the original tensors
    assert vm.model.layers[0].self_attn.q_proj.weight is lm.model.model.layers[0].self_attn.q_proj.weight
    # inside a changed block (a copy) the norms keep their values; only linear weights gain zeros
    assert torch.equal(vm.model.layers[1].input_layernorm.weight, lm.model.model.layers[1].input_layernorm.weight)
    assert v.steps[-1]["blocks"] == [1, 2] and v.steps[-1]["scope"] == "layer"


def test_gpt2_conv1d_nm_along_input(tiny_lm):
    lm = tiny_lm("gpt2", layers=2)
    v = _apply(lm, {"op": "sparsify", "method": "magnitude", "pattern": "2:4"})
    for i in (0, 1):
        for name, mod in lm.adapter.linears(v.overrides[i]).items():
            w = linear_weight(mod)  # (out, in) view of the Conv1D's (in, out) weight
            nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert int(nz.max()) <= 2, name
    assert abs(v.reports[-1]["sparsity"] - 0.5) < 1e-9


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sweep_zero_point_is_dense_and_points_match_applied_step(tiny_lm, tmp_path, family):
    lm = tiny_lm(family, layers=3)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * 6 for i in range(30)))
    before = state_fingerprint(lm.model)
    cfg = sp.SweepConfig(methods=("magnitude", "wanda"), patterns=("unstructured", "2:4"), points=3,
                         max_sparsity=0.6, eval_tokens=256, seq_len=64, source=str(text))
    from workbench.engine.data import Calibration, calibration_ids

    calib = Calibration(source=str(text), samples=4, seq_len=32)
    res = sp.sweep(lm, cfg, calib_ids=calibration_ids(lm.tokenizer, calib))
    assert all(torch.equal(before[k], v) for k, v in state_fingerprint(lm.model).items())
    dense = ev.full_eval(lm, original_variant(lm.num_blocks), source=str(text), seq_len=64, max_tokens=256)
    for m in ("magnitude", "wanda"):
        p0 = res["curves"][m]["points"][0]
        assert p0["target_sparsity"] == 0.0 and p0["kl"] == 0.0
        assert abs(p0["ppl"] - dense["ppl"]) / dense["ppl"] < 1e-4
    # a point of the curve is what applying that step gives, measured by the independent full forward
    for m in ("wanda", "magnitude"):
        p = res["curves"][m]["points"][1]
        v = _apply(lm, {"op": "sparsify", "method": m, "sparsity": p["target_sparsity"]}, calibration=calib)
        full = ev.full_eval(lm, v, source=str(text), seq_len=64, max_tokens=256)
        assert abs(full["ppl"] - p["ppl"]) / p["ppl"] < 1e-3
        assert p["kl"] > 1e-4 and abs(full["kl"] - p["kl"]) < 1e-2 * p["kl"]  # the cached reference is fp16
        assert abs(v.reports[-1]["sparsity"] - p["sparsity"]) < 1e-12
    q = next(q for q in res["nm"] if q["method"] == "magnitude")
    v = _apply(lm, {"op": "sparsify", "method": "magnitude", "pattern": "2:4"})
    full = ev.full_eval(lm, v, source=str(text), seq_len=64, max_tokens=256)
    assert abs(full["ppl"] - q["ppl"]) / q["ppl"] < 1e-3
    nm = {(q["method"], q["pattern"]) for q in res["nm"]}
    assert nm == {("magnitude", "2:4"), ("wanda", "2:4")}
    assert "knee" in res["curves"]["magnitude"]


def test_sensitivity_grid_runs_from_block(tiny_lm, tmp_path):
    lm = tiny_lm("llama", layers=3)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Item {i}. " + "a stitch in time saves nine. " * 6 for i in range(30)))
    res = sp.sensitivity(lm, "magnitude", 0.5, source=str(text), tokens=128)
    assert res["types"] == ["q", "k", "v", "o", "gate", "up", "down"] and res["blocks"] == [0, 1, 2]
    # cell (o, block 1) equals a full forward of the model with only that linear pruned
    v = _apply(lm, {"op": "sparsify", "method": "magnitude", "sparsity": 0.5, "scope": "layer", "blocks": [1]})
    only_o = v.derive()
    blk = only_o.overrides[1]
    orig = lm.model.model.layers[1]
    for name, mod in lm.adapter.linears(blk).items():
        if name != "o":
            mod.weight.data = lm.adapter.linears(orig)[name].weight.data.clone()
    full = ev.full_eval(lm, only_o, source=str(text), seq_len=128, max_tokens=128)
    cell = res["kl"][res["types"].index("o")][1]
    assert cell > 1e-5 and abs(full["kl"] - cell) < 1e-2 * cell


def test_export_reload_keeps_zeros(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from workbench.engine.export import export_variant

    lm = tiny_lm("llama", layers=2)
    v = _apply(lm, {"op": "sparsify", "method": "magnitude", "pattern": "2:4"})
    out = export_variant(lm, v, tmp_path / "out", {"steps": v.steps})
    re = AutoModelForCausalLM.from_pretrained(out)
    for i in (0, 1):
        for name, mod in lm.adapter.linears(v.overrides[i]).items():
            got = linear_weight(lm.adapter.linears(re.model.layers[i])[name])
            assert torch.equal(got == 0, linear_weight(mod) == 0), (i, name)
    assert "measured sparsity 50.00%" in (out / "README.md").read_text()


def test_default_model_layer_magnitude_hits_exact_count_despite_grid_ties(default_lm):
    v = _apply(default_lm, {"op": "sparsify", "method": "magnitude", "sparsity": 0.5, "scope": "layer", "blocks": [0]})
    for row in v.reports[-1]["per_layer"]:
        assert row["zeros"] == masks.prune_count(0.5, row["weights"]), row


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_pruner_cached_orderings_equal_direct_masks(tiny_lm, scope):
    lm = tiny_lm("qwen2", layers=2)
    v = original_variant(lm.num_blocks)
    targets = sp.prunable_linears(lm, v)
    # quantise the weights' scores onto a coarse grid so ties are common
    pr = sp.Pruner(lm, v, targets)
    pr.scores = lambda method, t: (linear_weight(t.module).abs() * 4).round()
    pr.prepare("magnitude", scope, [0.3, 0.7])
    for s in (0.3, 0.7, 0.5):
        got = pr.masks("magnitude", s, "unstructured", scope)
        scores = [pr.scores("magnitude", t) for t in targets]
        if scope == "global":
            ref = masks.global_masks(scores, s)
        else:
            fn = masks.layer_mask if scope == "layer" else masks.row_mask
            ref = [fn(sc, s) for sc in scores]
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_sorted_kth_matches_partition():
    parts = [tied_scores((50,), 4).sort().values / 3, torch.rand(70).sort().values, torch.zeros(5)]
    flat = torch.cat(parts).sort().values
    for k in (1, 5, 6, 40, 77, 125):
        assert masks.sorted_kth(parts, [k])[0] == float(flat[k - 1])


# ---- panel handlers, without a browser ----------------------------------------------------------------
def test_panel_sweep_pick_and_apply(tiny_lm):
    from workbench.panels import sparsity as panel
    from workbench.store import Store

    store = Store(default_model="tiny-sparsity", device="cpu")
    store.register_model(tiny_lm("llama", layers=3), "tiny-sparsity")
    sid = store.new_session()
    store.attach(sid)
    store.set_calibration(sid, 2, 32)
    res = panel.run_sweep(store, sid, panel.SweepForm(("magnitude", "wanda"), ("unstructured", "4:8"), points=3,
                                                     eval_tokens=512))
    fig = panel.figure(res, log_y=True)
    assert fig["layout"]["yaxis"]["type"] == "log"
    curve = next(t for t in fig["data"] if t["name"].startswith("wanda ("))
    assert curve["y"] == [p["ppl"] for p in res["curves"]["wanda"]["points"]]
    nm = next(t for t in fig["data"] if t["name"] == "magnitude 4:8")
    assert panel.decode(nm["customdata"][0]) == ("magnitude", 0.5, "4:8")
    m, x, p = panel.decode(curve["customdata"][1])
    assert (m, p) == ("wanda", "unstructured") and x == res["curves"]["wanda"]["points"][1]["target_sparsity"]
    msg = panel.apply(store, sid, m, x, p)
    v = store.current(sid)
    assert v.steps[-1]["op"] == "sparsify" and v.tags[0] == f"sparse {x * 100:.0f}%" and "measured sparsity" in msg
    assert abs(v.reports[-1]["sparsity"] - res["curves"]["wanda"]["points"][1]["sparsity"]) < 1e-12
    assert "essential sparsity" in panel.summary(res)


@pytest.mark.parametrize("method,scope", [("magnitude", "global"), ("wanda", "row"), ("magnitude", "layer")])
def test_recompute_mode_gives_the_same_masks(tiny_lm, method, scope):
    lm = tiny_lm("llama", layers=2)
    v = original_variant(lm.num_blocks)
    targets = sp.prunable_linears(lm, v)
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    reuse, again = sp.Pruner(lm, v, targets, ids), sp.Pruner(lm, v, targets, ids, reuse=False)
    reuse.prepare(method, scope, [0.2, 0.6])
    for s in (0.2, 0.6):
        a, b = reuse.masks(method, s, "unstructured", scope), again.masks(method, s, "unstructured", scope)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert again.stats_seconds > 0


@pytest.mark.gpu
def test_gpu_masks_equal_cpu():
    assert self_checks().sparsity_self_check("cuda")["ok"]


def test_cli_rejects_unknown_method_in_one_line(capsys):
    from workbench.cli import main

    with pytest.raises(SystemExit) as e:  # refused while parsing, before any model loads
        main(["analyze", "sparsity", "--methods", "random", "--json"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "unknown 'random'" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_sparsity_json_on_default_model(default_lm, capsys):
    import json

    from workbench.cli import main

    code = main(["analyze", "sparsity", "--methods", "magnitude", "--patterns", "unstructured,2:4", "--points", "2",
                 "--max-sparsity", "0.5", "--eval-tokens", "256", "--blocks", "29", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    res = json.loads(out)["result"]
    pts = res["curves"]["magnitude"]["points"]
    assert [p["target_sparsity"] for p in pts] == [0.0, 0.5] and res["blocks"] == [29]
    assert pts[1]["sparsity"] == 0.5 and pts[1]["kl"] > 0 and res["nm"][0]["pattern"] == "2:4"
    assert res["evaluation"]["tokens_scored"] == 255


@pytest.mark.browser
def test_browser_sweep_click_point_apply(tiny_lm):
    """Headless Chromium: run the sweep, click a curve point, apply it; the step is what was clicked."""
    from pathlib import Path

    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("/usr/bin/chromium is absent")
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_app import free_port

    from workbench.app import build_app, css
    from workbench.store import Store

    store = Store(default_model="tiny-sparsity-ui", device="cpu")
    store.register_model(tiny_lm("llama", layers=3), "tiny-sparsity-ui")
    demo = build_app(store=store)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, css=css(), quiet=True)
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1300, "height": 1300})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Model").click()  # the app opens on the Workbench tab
            page.get_by_role("button", name="Load", exact=True).click()
            page.wait_for_selector("#wb-model-info:has-text('3 blocks')", timeout=120_000)
            page.get_by_role("tab", name="Sparsity").click()
            page.get_by_role("button", name="Run sweep").click()
            page.wait_for_selector("#wb-sparsity-chart .scatterlayer .trace .point", timeout=120_000)
            page.locator("#wb-sparsity-chart .scatterlayer .trace").first.locator(".point").nth(3).click(force=True)
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Apply to current variant").click()
            page.wait_for_selector("text=measured sparsity", timeout=120_000)
            browser.close()
    finally:
        demo.close()
    assert not errors
    sid = next(iter(store._sessions))
    step = store.current(sid).steps[-1]
    # the 4th point of a curve is 30 %; where the two curves overlap the click lands on the top one
    scope = {"magnitude": "global", "wanda": "row"}[step["method"]]
    assert step == {"op": "sparsify", "method": step["method"], "sparsity": 0.3, "pattern": "unstructured",
                    "scope": scope, "blocks": [0, 1, 2]}
