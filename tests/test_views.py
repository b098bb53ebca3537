"""Attention capture and PageRank, outlier statistics and no-op heads, the map, and IG attributions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from tiny import tiny_model
from workbench.engine.analysis import attention as att
from workbench.engine.analysis import attribution as attr
from workbench.engine.analysis import embedding_map as emap
from workbench.engine.analysis import outliers as out
from workbench.engine.block_stream import run_block, trace_blocks
from workbench.engine.variant import original_variant, state_fingerprint


def _hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules())


def _ids(seed=0, B=1, T=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (B, T), generator=g)


# ---- PageRank ---------------------------------------------------------------------------------------
def test_pagerank_hand_computed_two_nodes():
    # s0 = d(s0 + s1/2) + (1-d)/2, s1 = d s1/2 + (1-d)/2 with d = 0.85 -> s1 = 0.075/0.575 = 3/23.
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    r = att.pagerank(a, damping=0.85, tol=1e-12)
    assert r.converged
    assert torch.allclose(r.scores, torch.tensor([20 / 23, 3 / 23], dtype=torch.float64), atol=1e-10)


def test_pagerank_skip_first_hand_computed():
    # Dropping token 0 leaves [[0.5, 0], [0.4, 0.4]] -> rows renormalised [[1, 0], [0.5, 0.5]]: as above.
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.4, 0.4]])
    r = att.pagerank(a, damping=0.85, skip_first=True, tol=1e-12)
    assert torch.allclose(r.scores, torch.tensor([0.0, 20 / 23, 3 / 23], dtype=torch.float64), atol=1e-10)


def test_pagerank_matches_linear_solve_batched():
    torch.manual_seed(0)
    N, d = 7, 0.85
    logits = torch.randn(3, 2, N, N).masked_fill(torch.triu(torch.ones(N, N), 1).bool(), float("-inf"))
    a = logits.softmax(-1)  # causal attention, rows = queries
    r = att.pagerank(a, damping=d, tol=1e-13)
    # Fixed point of s = d A^T s + (1-d)/N:  (I - d A^T) s = (1-d)/N.
    eye = torch.eye(N, dtype=torch.float64)
    ref = torch.linalg.solve(eye - d * a.double().transpose(-1, -2), torch.full((3, 2, N), (1 - d) / N, dtype=torch.float64))
    assert torch.allclose(r.scores, ref, atol=1e-10)
    assert torch.allclose(r.scores.sum(-1), torch.ones(3, 2, dtype=torch.float64))


def test_pagerank_without_teleport_drains_into_first_token():
    a = torch.tensor([[1.0, 0, 0], [0.3, 0.7, 0], [0.2, 0.3, 0.5]])
    r = att.pagerank(a, damping=1.0, tol=1e-10, max_iter=5000)
    assert r.scores[0] > 0.999999


# ---- attention capture --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_attention_capture_equals_output_attentions(tiny_lm, family):
    lm = tiny_lm(family, layers=3)
    impl = lm.model.config._attn_implementation
    before = state_fingerprint(lm.model)
    ids = _ids()
    cap = att.capture_attention(lm, original_variant(lm.num_blocks), ids)
    ref = tiny_model(family, 3)  # same seed -> same weights; eager on this private copy
    ref.config._attn_implementation = "eager"
    with torch.no_grad():
        want = torch.stack([a[0] for a in ref(ids, output_attentions=True, use_cache=False).attentions])
    assert cap.probs.shape == want.shape == (3, 4, 12, 12)
    assert torch.allclose(cap.probs, want, atol=1e-6)
    # The original was not touched: same attention kernel, no hooks left, same tensors.
    assert lm.model.config._attn_implementation == impl
    assert _hooks_left(lm.model) == 0
    after = state_fingerprint(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_attention_capture_on_variant_uses_original_indices(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    ids = _ids(1)
    variant = original_variant(4).with_dropped([1])
    cap = att.capture_attention(lm, variant, ids)
    assert cap.blocks == [0, 2, 3]
    # Reference: a model that really lacks block 1, in eager mode.
    ref = tiny_model("llama", 4)
    del ref.model.layers[1]
    ref.config.num_hidden_layers = 3
    ref.config._attn_implementation = "eager"
    with torch.no_grad():
        want = torch.stack([a[0] for a in ref(ids, output_attentions=True, use_cache=False).attentions])
    assert torch.allclose(cap.probs, want, atol=1e-6)


def test_attention_report_shapes_and_rows(tiny_lm):
    lm = tiny_lm("qwen2", layers=2)
    cap, rep = att.analyze_attention(lm, original_variant(2), "Hello, world. Hi", max_tokens=10)
    assert len(cap.tokens) == 10 and any("cropped" in n for n in rep["notes"])
    assert torch.allclose(cap.probs.sum(-1), torch.ones(2, 4, 10), atol=1e-5)  # rows are distributions
    pr = np.array(rep["pagerank"]["per_head"])
    assert pr.shape == (2, 4, 10) and np.allclose(pr.sum(-1), 1, atol=1e-5)
    assert rep["pagerank"]["converged"]
    fm = np.array(rep["first_token_mass"])
    assert np.allclose(fm, cap.probs[:, :, 1:, 0].mean(-1).numpy(), atol=1e-6)


# ---- outliers -----------------------------------------------------------------------------------------
def test_kurtosis_and_inf_norm_match_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g) ** 3  # heavy tails
    inf, k = out.sample_stats(x)
    for b in range(3):
        flat = x[b].flatten().numpy().astype(np.float64)
        assert k[b].item() == pytest.approx(scipy.stats.kurtosis(flat, fisher=False), rel=1e-9)
        assert inf[b].item() == pytest.approx(np.abs(flat).max(), rel=1e-6)


def test_noop_scores_on_constructed_attention():
    T = 4
    causal_uniform = torch.tril(torch.ones(T, T))
    causal_uniform = causal_uniform / causal_uniform.sum(-1, keepdim=True)
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0
    probs = torch.stack([sink, causal_uniform])[None]  # (1, 2, T, T)
    delim = torch.tensor([[False, False, True, False]])  # a "." at position 2
    s = out.noop_scores(probs, delim)
    first = s["first_sum"] / s["first_count"]
    assert s["first_count"] == 3
    assert first.tolist() == pytest.approx([1.0, (1 / 2 + 1 / 3 + 1 / 4) / 3])
    # Only queries 2 and 3 can see position 2; the uniform head gives it 1/3 and 1/4.
    assert s["delim_count"] == 2
    assert (s["delim_sum"] / s["delim_count"]).tolist() == pytest.approx([0.0, (1 / 3 + 1 / 4) / 2])


def test_delimiter_mask_bytes(tiny_lm):
    lm = tiny_lm("llama", layers=1)
    ids = torch.tensor([list(b"a. b,c")])
    assert out.delimiter_mask(lm.tokenizer, ids).tolist() == [[False, True, False, False, True, False]]


def test_outlier_stats_match_a_direct_reference(tiny_lm):
    lm = tiny_lm("llama", layers=3)
    ids = _ids(2, B=3, T=10)
    v = original_variant(3)
    st = out.outlier_stats(lm, v, ids, top_k=3)
    # Residual stream of block i = the hidden state entering block i+1 (or the last block's output).
    trace = trace_blocks(lm.model, lm.adapter, ids)
    outs = trace.inputs[1:] + [trace.output]
    for i, h in enumerate(outs):
        flat = h.reshape(3, -1).double().numpy()
        assert st["kurtosis"]["residual"][i] == pytest.approx(np.mean(scipy.stats.kurtosis(flat, axis=1, fisher=False)), rel=1e-6)
        assert st["inf_norm"]["residual"][i] == pytest.approx(np.abs(flat).max(1).mean(), rel=1e-5)
        top = h.abs().reshape(-1, h.shape[-1]).amax(0).topk(3)
        assert [d["dim"] for d in st["top_dims"]["residual"][i]] == top.indices.tolist()
    # MLP input of block 0 = post-attention norm of (input + attention output): checked by re-running it.
    blk = lm.adapter.blocks(lm.model)[0]
    seen = {}
    h = blk.mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        run_block(blk, trace.inputs[0], trace.calls[0])
    finally:
        h.remove()
    ref = seen["x"].reshape(3, -1).double().numpy()
    assert st["kurtosis"]["mlp_in"][0] == pytest.approx(np.mean(scipy.stats.kurtosis(ref, axis=1, fisher=False)), rel=1e-6)
    # No-op score: the same as averaging the captured attention of each sample.
    caps = [att.capture_attention(lm, v, ids[b : b + 1]).probs for b in range(3)]
    ref_first = torch.stack(caps)[:, :, :, 1:, 0].mean(dim=(0, 3))  # (L, H)
    assert np.allclose(np.array(st["noop_first"]), ref_first.numpy(), atol=1e-6)
    assert _hooks_left(lm.model) == 0


def test_outlier_stats_on_variant_mark_dropped_blocks(tiny_lm):
    lm = tiny_lm("gpt2", layers=3)
    st = out.outlier_stats(lm, original_variant(3).with_dropped([1]), _ids(3, B=2, T=8))
    assert st["blocks"] == [0, 2]
    assert st["inf_norm"]["attn_out"][1] is None and st["noop_first"][1] is None
    assert st["inf_norm"]["attn_out"][2] is not None and len(st["noop_first"][2]) == 4


def test_outlier_blocks_rule():
    n = 5
    stats = {
        "modules": ["attn_out", "mlp_in", "mlp_out", "residual"],
        "inf_norm": {m: [1.0] * n for m in ("attn_out", "mlp_in", "mlp_out", "residual")},
        "kurtosis": {m: [3.0] * n for m in ("attn_out", "mlp_in", "mlp_out", "residual")},
    }
    stats["inf_norm"]["mlp_out"][3] = 50.0  # 50 x the median
    stats["kurtosis"]["attn_out"][1] = 40.0  # > 10 x median and > 20
    stats["kurtosis"]["mlp_in"][2] = 25.0  # > 20 but < 10 x median (30): not flagged
    stats["inf_norm"]["residual"][4] = 99.0  # residual stream does not count
    got = out.outlier_blocks(stats)
    assert [(g["block"], g["modules"]) for g in got] == [(1, ["attn_out"]), (3, ["mlp_out"])]


# ---- map ----------------------------------------------------------------------------------------------
def test_map_tiny_model_pca_for_blocks_and_umap_for_heads(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    ids = _ids(4, B=2, T=16)
    res = emap.analyze_map(lm, original_variant(4), ids)
    b, h = res["blocks"], res["heads"]
    assert b["method"] == "pca" and "PCA" in b["reason"] and b["index"] == [0, 1, 2, 3]
    assert h["method"] == "umap" and h["reason"] is None  # 4 blocks x 4 heads = 16 points
    assert np.isfinite(np.array(h["xy"])).all() and np.array(h["xy"]).shape == (16, 2)
    # PCA: the same coordinates (up to each axis' sign) as numpy's SVD of the centred features.
    x, _ = emap.block_features(emap.calibration_pass(lm, original_variant(4), ids, modules=False, attention=False, block_io=True)["io"], [0, 1, 2, 3])
    c = x - x.mean(0)
    u, s, _ = np.linalg.svd(c)
    assert np.allclose(np.abs(np.array(b["xy"])), np.abs(u[:, :2] * s[:2]), atol=1e-6)
    # Block influence colour = mean over tokens of 1 - cos(block input, output), from the block trace.
    trace = trace_blocks(lm.model, lm.adapter, ids)
    outs = trace.inputs[1:] + [trace.output]
    bi = [float(1 - torch.nn.functional.cosine_similarity(x_, y_, dim=-1).mean()) for x_, y_ in zip(trace.inputs, outs)]
    assert np.allclose(b["color"]["values"], bi, atol=1e-6)


def test_map_head_features_are_attention_statistics(tiny_lm):
    lm = tiny_lm("opt", layers=2)
    ids = _ids(5, B=1, T=9)
    v = original_variant(2)
    res = emap.analyze_map(lm, v, ids)
    assert res["heads"]["method"] == "pca"  # 8 heads < 15
    p = att.capture_attention(lm, v, ids).probs  # (L, H, T, T)
    t = torch.arange(9)
    prev = p[:, :, t[1:], t[1:] - 1].mean(-1).flatten()
    selfm = p.diagonal(dim1=-2, dim2=-1)[..., 1:].mean(-1).flatten()
    assert np.allclose(res["heads"]["values"]["prev"], prev.numpy(), atol=1e-6)
    assert np.allclose(res["heads"]["values"]["self"], selfm.numpy(), atol=1e-6)
    assert res["heads"]["block"] == [0] * 4 + [1] * 4


# ---- attribution --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attribution_completeness(tiny_lm, family):
    lm = tiny_lm(family, layers=2)
    ids = torch.tensor([list(b"hello world")])
    base = attr.baseline_ids(lm, ids)
    r = attr.integrated_gradients(lm, original_variant(2), ids, target=65, baseline_ids=base, steps=32,
                                  method="gausslegendre")  # smooth tiny-model integrand: near exact
    diff = r["f_input"] - r["f_baseline"]
    assert abs(diff) > 1e-3  # the test means something
    assert r["sum"] == pytest.approx(diff, abs=1e-4 + 1e-3 * abs(diff))  # IG completeness
    assert abs(r["delta"]) < 1e-4 + 1e-3 * abs(diff)
    # the default (trapezoid) rule: the miss shrinks as the steps grow (first order: 8x the steps, ~1/8)
    miss = [abs(attr.integrated_gradients(lm, original_variant(2), ids, 65, base, n)["sum"] - diff) for n in (32, 256)]
    assert miss[1] < miss[0] / 4 and miss[1] < 1e-2 * abs(diff)
    assert r["attributions"][0] == 0.0  # the kept first token moves nowhere on the path
    assert _hooks_left(lm.model) == 0


def test_attribution_side_by_side_default_target(tiny_lm):
    lm = tiny_lm("llama", layers=3)
    v = original_variant(3).with_dropped([1])
    res = attr.analyze_attribution(lm, v, "abcdefgh", steps=4, max_tokens=6)
    assert [c["variant"] for c in res["columns"]] == ["original", v.name]
    assert len(res["tokens"]) == 6 and len(res["columns"][1]["attributions"]) == 6
    with torch.no_grad():
        logits = lm.model(torch.tensor([list(b"cdefgh")])).logits[0, -1]
    assert res["target"]["id"] == int(logits.argmax())
    assert res["columns"][0]["greedy_token"] == res["target"]["id"]


def test_attribution_doubles_the_steps_until_it_converges(tiny_lm, monkeypatch):
    """A column that misses completeness is rerun at 2x the steps until it converges or would pass
    max_steps; the column says the steps it used and every try."""
    lm = tiny_lm("llama", layers=2)
    real = attr.integrated_gradients
    calls = []

    def fake(lm_, v, ids, target, base, steps, output="logprob", internal_batch_size=None, method=attr.METHOD):
        r = real(lm_, v, ids, target, base, steps, output, internal_batch_size, method)
        calls.append(steps)
        r["converged"] = steps >= 16  # pretend: converges at 16 steps
        return r

    monkeypatch.setattr(attr, "integrated_gradients", fake)
    res = attr.analyze_attribution(lm, original_variant(2), "abcdefgh", steps=4, max_tokens=6, max_steps=64)
    col = res["columns"][0]
    assert calls == [4, 8, 16] and col["steps"] == 16 and [t["steps"] for t in col["tries"]] == [4, 8, 16]
    assert col["converged"] and col["seconds"] == pytest.approx(sum(t["seconds"] for t in col["tries"]))
    calls.clear()  # never converging: stops before passing max_steps, and says so
    monkeypatch.setattr(attr, "integrated_gradients", lambda *a, **k: {**fake(*a, **k), "converged": False})
    col = attr.analyze_attribution(lm, original_variant(2), "abcdefgh", steps=4, max_tokens=6, max_steps=12)["columns"][0]
    assert calls == [4, 8] and col["steps"] == 8 and not col["converged"]
    calls.clear()
    attr.analyze_attribution(lm, original_variant(2), "abcdefgh", steps=4, max_tokens=6, max_steps=None)
    assert calls == [4]


# ---- the real model, briefly -------------------------------------------------------------------------
def test_default_model_attention_and_noop(default_lm):
    v = original_variant(default_lm.num_blocks)
    impl = default_lm.model.config._attn_implementation
    cap, rep = att.analyze_attention(default_lm, v, "The cat sat on the mat. It was warm.", max_tokens=64)
    L, H = default_lm.num_blocks, default_lm.model.config.num_attention_heads
    assert cap.probs.shape[:2] == (L, H)
    assert rep["pagerank"]["converged"]
    assert default_lm.model.config._attn_implementation == impl
    assert _hooks_left(default_lm.model) == 0


def test_attribution_defaults_converge_on_the_default_model(default_lm):
    """The Attribution tab's defaults (32 trapezoid steps, doubled up to 256) converge on SmolLM2's
    original for the built-in prompt, where Gauss-Legendre at 8-64 steps never did (README)."""
    res = attr.analyze_attribution(default_lm, original_variant(default_lm.num_blocks))
    col = res["columns"][0]
    assert col["converged"], col["tries"]
    diff = col["f_input"] - col["f_baseline"]
    assert abs(col["sum"] - diff) <= 0.1 * abs(diff) + 0.05  # completeness, from the figures themselves


# ---- panels (handlers called without a browser) -----------------------------------------------------
def test_panel_handlers_on_a_tiny_model(tiny_lm):
    import json

    from workbench.engine.data import Calibration
    from workbench.panels import attention as pa
    from workbench.panels import attribution as pt
    from workbench.panels import map as pm
    from workbench.panels import outliers as po
    from workbench.store import Store

    lm = tiny_lm("llama", layers=4)
    store = Store(default_model=lm.spec)
    store.register_model(lm)
    sid = store.new_session()
    store.attach(sid, lm.spec)
    store.set_calibration(sid, 2, 24)
    grid, hmap, bars, info, _, _ = pa.render(store, sid, pa.AttentionForm("ab. " * 200, "current variant", 0.85, False, 2, "1"))
    assert "cropped from 800 to its last 512" in info
    assert "pooled to 16x16" in grid.layout.title.text  # 512-token maps reach the browser pooled
    assert len(hmap.data[0].z) == pa.HEAD_TOKENS and "last 128 of 512" in hmap.layout.title.text
    store.apply_step(sid, {"op": "prune_blocks", "blocks": [1]})
    heat, norms, summary = po.compute(store, sid, "noop_first")
    assert json.loads(heat)["data"][0]["y"] == ["0", "1 (dropped)", "2", "3"]  # original indices; block 1 an empty row
    fig, _ = po.open_head(store, sid, 3 * po.HEAD_CODE + 2)
    assert fig.layout.title.text.startswith("block 3, head 2")
    bfig, _ = pm.compute(store, sid, "entropy")
    assert json.loads(bfig)["data"][0]["customdata"] == [0, 2, 3]
    _, note = pm.click(store, sid, 2)
    assert store.pending(sid) == [2] and "2" in note
    afig, text = pt.compute(store, sid, "abcdefg", "", 4)
    assert [t.name for t in afig.data] == ["original", store.current(sid).name] and "captum delta" in text


@pytest.mark.gpu
def test_views_on_gpu_match_cpu(tiny_lm):
    """Self-check for the lead's GPU run: the same tiny model on CUDA gives the CPU's numbers."""
    from workbench.engine.loading import wrap_model

    from conftest import ByteTokenizer

    cpu = tiny_lm("llama", layers=3)
    gpu = wrap_model(tiny_model("llama", 3), ByteTokenizer(), spec="tiny-llama", device="cuda")
    v = original_variant(3).with_dropped([1])
    ids = _ids(6, B=2, T=16)
    a = att.capture_attention(cpu, v, ids[:1]).probs
    b = att.capture_attention(gpu, v, ids[:1].cuda()).probs
    assert torch.allclose(a, b, atol=1e-4)
    sa, sb = out.outlier_stats(cpu, v, ids), out.outlier_stats(gpu, v, ids.cuda())
    assert np.allclose(sa["kurtosis"]["mlp_out"][2], sb["kurtosis"]["mlp_out"][2], rtol=1e-3)
    assert np.allclose(np.array(sa["noop_first"][2]), np.array(sb["noop_first"][2]), atol=1e-4)
    m = emap.analyze_map(gpu, v, ids.cuda())
    assert m["blocks"]["index"] == [0, 2]
    x = torch.tensor([list(b"hello world")])
    ra = attr.integrated_gradients(cpu, v, x, 65, attr.baseline_ids(cpu, x), steps=16)
    rb = attr.integrated_gradients(gpu, v, x.cuda(), 65, attr.baseline_ids(gpu, x.cuda()), steps=16)
    assert np.allclose(ra["attributions"], rb["attributions"], atol=1e-3)


@pytest.mark.parametrize("step", [
    {"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "blocks": [1]},
    {"op": "sparsify", "method": "magnitude", "sparsity": 0.5, "blocks": [1]},
    {"op": "fuse_blocks", "blocks": [1], "steps": 2, "samples": 2, "seq_len": 16, "batch": 2},
])
def test_views_run_on_variants_of_every_operation(tiny_lm, step):
    from workbench.engine.data import Calibration
    from workbench.engine.recipe import OpContext, apply_steps, step_from_dict

    lm = tiny_lm("llama", layers=4)
    v0 = original_variant(4)
    v = apply_steps(OpContext(lm=lm, calibration=Calibration(samples=2, seq_len=16)), v0, [step_from_dict(step)])
    ids = _ids(7, B=2, T=12)
    c0, c = att.capture_attention(lm, v0, ids[:1]), att.capture_attention(lm, v, ids[:1])
    assert c.blocks == v.kept()
    if step["op"] == "fuse_blocks":
        assert c.blocks == [0, 2, 3]
    else:  # block 0 is untouched and sees the same input; block 1 was changed
        assert torch.equal(c.probs[0], c0.probs[0])
        assert not torch.allclose(c.probs[1], c0.probs[1], atol=1e-4)
    st = out.outlier_stats(lm, v, ids)
    assert [i for i, x in enumerate(st["noop_first"]) if x is not None] == v.kept()
    assert emap.analyze_map(lm, v, ids)["blocks"]["index"] == v.kept()
    r = attr.integrated_gradients(lm, v, ids[:1], 65, attr.baseline_ids(lm, ids[:1]), steps=64)  # the trapezoid rule needs more than 16
    assert abs(r["sum"] - (r["f_input"] - r["f_baseline"])) < 0.05 * abs(r["f_input"] - r["f_baseline"]) + 1e-3


def test_cancelled_pass_raises_and_leaves_no_hooks(tiny_lm):
    import threading

    from workbench.engine.errors import Cancelled

    lm = tiny_lm("llama", layers=2)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        out.outlier_stats(lm, original_variant(2), _ids(8, B=2, T=8), cancel=stop)
    assert _hooks_left(lm.model) == 0


def test_umap_leaves_torch_thread_count_alone():
    # numba's parallel kernels reset the OpenMP thread count; torch must keep the one it was given.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = emap.embed_2d(np.random.default_rng(0).normal(size=(20, 3)))
        assert res["method"] == "umap"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_blocks_with_outliers_is_the_rule_on_cached_stats(tiny_lm):
    lm = tiny_lm("opt", layers=3)
    v, ids = original_variant(3), _ids(9, B=2, T=10)
    want = [f["block"] for f in out.outlier_blocks(out.outlier_stats(lm, v, ids), inf_norm_factor=1.0)]
    assert out.blocks_with_outliers(lm, v, ids, inf_norm_factor=1.0) == want
    assert want  # with factor 1, every block above the median is flagged: the check is not vacuous
