"""Quantization: the GPTQ solver against a naive column-by-column reference, RTN bounds, the sequential
driver, mixed precision, sizes, and the compressed-tensors export round trip."""

from __future__ import annotations

import pytest
import torch

from workbench.engine.data import Calibration
from workbench.engine.errors import ExportError, RecipeError
from workbench.engine.ops import gptq as G
from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
from workbench.engine.variant import original_variant, state_fingerprint, view_model


# ---- an independent reference: GPTQ as the OBS recursion on the explicit inverse Hessian ------------
def naive_range_search(x, bits, sym, shrinks=tuple(1 - i / 100 for i in range(20)), norm=2.4):
    """Reference for observer="mse": row by row, try every shrunk min-max range and keep the grid with
    the smallest sum |w_hat - w|^norm (plain Python loops; the first of equal errors wins)."""
    maxq = 2**bits - 1
    scales, zeros = [], []
    for row in x:
        lo0, hi0 = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        best = None
        for p in shrinks:
            lo, hi = lo0 * p, hi0 * p
            if sym:
                hi = max(-lo, hi)
                lo = -hi
            if lo == 0 and hi == 0:
                lo, hi = -1.0, 1.0
            s = (hi - lo) / maxq
            z = float((maxq + 1) // 2) if sym else min(max(round(-lo / s), 0), maxq)
            err = sum(abs(s * (min(max(round(float(w) / s) + z, 0), maxq) - z) - float(w)) ** norm for w in row)
            if best is None or err < best[0]:
                best = (err, s, z)
        scales.append(best[1])
        zeros.append(best[2])
    return torch.tensor(scales, dtype=x.dtype), torch.tensor(zeros, dtype=x.dtype)


def naive_gptq(W, H, bits, group_size, sym, act_order, damp=0.01, observer="minmax", shrink=0.0):
    """Quantize one column at a time; after each, update every remaining column with the OBS step
    -err * Hinv[c, :] / Hinv[c, c] and remove column c from the inverse by Gaussian elimination.
    No Cholesky, no lazy blocks. Group grids: at a group's first column (dynamic) or up front (static)."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    eye = torch.eye(cols, dtype=H.dtype)
    H = H * eye + (1 - shrink) * H * (1 - eye)  # off-diagonal entries shrunk toward 0
    H += damp * torch.diag(H).mean() * eye
    maxq = 2**bits - 1
    g = cols if group_size == -1 else group_size
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else list(range(cols))
    static = act_order in ("weight", "static") or group_size == -1

    def params(x):  # min-max over a (rows, k) slice, range containing 0
        if observer == "mse":
            return naive_range_search(x, bits, sym)
        lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        s = (hi - lo) / maxq
        z = torch.full_like(s, (maxq + 1) // 2) if sym else torch.round(-lo / s)
        return s, z

    grids = {k: params(W[:, k * g : (k + 1) * g]) for k in range(cols // g)} if static else {}
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    remaining = list(range(cols))
    for pos, c in enumerate(order):
        k = pos // g if act_order == "group" else c // g
        if not static and pos % g == 0:
            grids[k] = params(W[:, order[pos : pos + g]])
        s, z = grids[k]
        Q[:, c] = torch.clamp(torch.round(W[:, c] / s) + z, 0, maxq)
        err = (W[:, c] - s * (Q[:, c] - z)) / Hinv[c, c]
        W[:, remaining] -= err[:, None] * Hinv[c, remaining][None, :]
        Hinv = Hinv - Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / Hinv[c, c]
        remaining.remove(c)
    return Q


def _problem(rows=12, cols=64, seed=0, dead=(5,)):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    X = torch.randn(256, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X[:, list(dead)] = 0  # inputs that never fire: dead columns
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order,observer",
    [(4, 16, False, None, "minmax"), (3, 16, True, "weight", "minmax"), (4, -1, False, "group", "minmax"),
     (2, 8, False, "group", "minmax"), (8, 32, True, None, "minmax"), (4, 32, False, "static", "minmax"),
     (3, 16, False, "weight", "mse"), (4, 16, True, None, "mse")],
)
@pytest.mark.parametrize("shrink", [0.0, 0.4])
def test_gptq_matches_naive_column_by_column(bits, group_size, sym, act_order, observer, shrink):
    W, H = _problem()
    scheme = G.Scheme(bits=bits, group_size=group_size, sym=sym, act_order=act_order, block_size=32, observer=observer,
                      shrink=shrink)
    res = G.gptq(W, H, scheme)
    ref = naive_gptq(W, H, bits, group_size, sym, act_order, observer=observer, shrink=shrink)
    assert torch.equal(res.codes.double(), ref)
    # the dequantized weight is the stored grid applied to the codes
    assert torch.allclose(res.weight, G.dequantize(res.codes, res.scale, res.zero, res.g_idx).double())
    assert torch.all(res.weight[:, 5] == 0)  # dead column


@pytest.mark.parametrize("bits,sym", [(4, False), (3, False), (3, True), (2, False)])
def test_mse_observer_matches_a_naive_range_search(bits, sym):
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    x[3] = 0.0  # an all-zero row
    x[4] = x[4].abs()  # a row with no negative weight
    scale, zero = G.grid_params(x, bits, sym, observer="mse")
    ref_s, ref_z = naive_range_search(x, bits, sym)
    assert torch.allclose(scale, ref_s, rtol=1e-12) and torch.equal(zero, ref_z)


def test_mse_observer_fits_weights_at_least_as_well_as_minmax():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    W[:, 7] *= 8  # outlier columns: min-max grids waste their range on them
    for bits in (3, 4):
        mm = G.rtn(W, G.Scheme(bits=bits, group_size=32))
        mse = G.rtn(W, G.Scheme(bits=bits, group_size=32, observer="mse"))
        per_row = lambda r: (r.weight - W).abs().pow(2.4).reshape(64, 4, 32).sum(-1)  # noqa: E731
        assert torch.all(per_row(mse) <= per_row(mm) * (1 + 1e-5))  # per group, on the search's measure
        assert (mse.weight - W).norm() < (mm.weight - W).norm()
    with pytest.raises(ValueError, match="observer"):
        G.Scheme(observer="histogram")


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_gptq_reuses_a_given_static_grid_only_where_it_is_the_same(observer):
    for dead in ((), (5,)):  # a dead column is zeroed first and may change its group's range: searched again
        W, H = _problem(dead=dead)
        W = W.float()
        H = H.float()
        scheme = G.Scheme(bits=3, group_size=16, act_order="weight", observer=observer)
        plain = G.gptq(W, H, scheme)
        r = G.rtn(W, scheme)
        given = G.gptq(W, H, scheme, grid=(r.scale, r.zero))
        assert torch.equal(given.codes, plain.codes) and torch.equal(given.scale, plain.scale)
        if not dead:
            assert torch.equal(plain.scale, r.scale)  # what makes the reuse exact


@pytest.mark.parametrize("act_order,observer", [(None, "minmax"), ("weight", "mse"), (None, "mse")])  # natural groups
def test_full_hessian_shrinkage_leaves_rtn(act_order, observer):
    """shrink = 1 leaves a diagonal Hessian: no error is propagated, every column rounds on its own."""
    W, H = _problem(dead=())
    scheme = G.Scheme(bits=3, group_size=16, act_order=act_order, observer=observer)
    full = G.gptq(W, H, G.Scheme(**{**scheme.__dict__, "shrink": 1.0}))
    assert torch.equal(full.codes, G.rtn(W, scheme).codes)
    assert not torch.equal(G.gptq(W, H, scheme).codes, full.codes)
    # the objective trades off: no shrinkage fits the calibration Hessian best
    errs = [G.gptq(W, H, G.Scheme(**{**scheme.__dict__, "shrink": a})).error for a in (0.0, 0.4, 1.0)]
    assert errs[0] < errs[2] and errs[1] < errs[2]
    with pytest.raises(ValueError, match="shrink"):
        G.Scheme(shrink=1.5)


def test_act_order_group_g_idx_follows_processing_order():
    W, H = _problem(seed=3)
    res = G.gptq(W, H, G.Scheme(bits=4, group_size=16, act_order="group"))
    order = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(res.g_idx[order].long(), torch.arange(64) // 16)
    static = G.gptq(W, H, G.Scheme(bits=4, group_size=16, act_order="weight"))
    assert torch.equal(static.g_idx.long(), torch.arange(64) // 16)  # static: natural groups


@pytest.mark.parametrize("bits,sym", [(4, False), (3, True), (2, False)])
def test_gptq_beats_rtn_on_the_calibration_objective(bits, sym):
    W, H = _problem(rows=32, cols=128, seed=1)
    scheme = G.Scheme(bits=bits, group_size=32, sym=sym)
    assert G.gptq(W, H, scheme).error < G.rtn(W, scheme, hessian=H).error


def test_rtn_8bit_round_trip_is_within_half_a_step():
    W = torch.randn(40, 256, generator=torch.Generator().manual_seed(2))
    for sym in (False, True):
        res = G.rtn(W, G.Scheme(bits=8, group_size=64, sym=sym))
        step = res.scale[:, res.g_idx.long()]  # (out, in)
        assert torch.all((W - res.weight).abs() <= step / 2 + 1e-6)
        assert (W - res.weight).norm() / W.norm() < 0.01  # 8 bits: well under 1 % relative error


def test_objective_is_the_mean_output_error():
    W, _ = _problem()
    X = torch.randn(100, 64, dtype=torch.float64)
    Wq = G.rtn(W, G.Scheme(bits=3, group_size=16)).weight
    direct = ((X @ (W - Wq).T) ** 2).sum(1).mean()
    assert G.objective(W, Wq, X.T @ X / 100) == pytest.approx(float(direct), rel=1e-9)


# ---- the driver on tiny models -------------------------------------------------------------------------
@pytest.fixture
def calib_text(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist()) for _ in range(40)]
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(paras))
    return str(p)


def _ctx(lm, text, samples=4, seq_len=64):
    return OpContext(lm=lm, calibration=Calibration(source=text, samples=samples, seq_len=seq_len))


def _quantize(ctx, variant, **step):
    return apply_steps(ctx, variant, [step_from_dict({"op": "quantize", **step})])


def test_gptq_error_le_rtn_per_linear_and_original_untouched(tiny_lm, calib_text):
    lm = tiny_lm("llama", layers=3)
    before = state_fingerprint(lm.model)
    v = _quantize(_ctx(lm, calib_text), original_variant(3), method="gptq", bits=3, group_size=32, blocks=[0, 2])
    after = state_fingerprint(lm.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    rep = v.reports[-1]
    assert set(rep["blocks"]) == {"0", "2"} and v.tags == {0: "quantized 3-bit g32", 2: "quantized 3-bit g32"}
    for blk in rep["blocks"].values():
        for name, e in blk["linears"].items():
            assert e["error"] <= e["rtn_error"] * (1 + 1e-6), name
    # q/k/v and gate/up read one tensor each: one Hessian per group
    lin = rep["blocks"]["0"]["linears"]
    assert sorted(lin["q"]["hessian_shared_with"]) == ["k", "v"] and lin["gate"]["hessian_shared_with"] == ["up"]
    assert lin["o"]["hessian_shared_with"] == [] and lin["down"]["hessian_shared_with"] == []


def test_sequential_calibration_feeds_the_quantized_output(tiny_lm, calib_text):
    """Block 1's reported RTN error must be measured on inputs coming out of the *quantized* block 0."""
    lm = tiny_lm("llama", layers=3)
    ctx = _ctx(lm, calib_text)
    v = _quantize(ctx, original_variant(3), method="rtn", bits=2, group_size=32, blocks=[0, 1], error_report=True)
    reported = v.reports[-1]["blocks"]["1"]["linears"]["o"]["rtn_error"]

    def o_input_hessian(variant):
        model = view_model(lm.model, lm.adapter, variant)
        o = lm.adapter.linears(lm.adapter.blocks(model)[1])["o"]  # block 1's o is the original module
        xs = []
        h = o.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        try:
            model(input_ids=ctx.calib_ids(), use_cache=False)
        finally:
            h.remove()
        x = torch.cat(xs)
        return x.T @ x / x.shape[0]

    only0 = _quantize(ctx, original_variant(3), method="rtn", bits=2, group_size=32, blocks=[0])
    W = lm.adapter.linears(lm.adapter.blocks(lm.model)[1])["o"].weight.detach()
    Wq = G.rtn(W, G.Scheme(bits=2, group_size=32)).weight
    seq = G.objective(W, Wq, o_input_hessian(only0))
    not_seq = G.objective(W, Wq, o_input_hessian(original_variant(3)))
    assert reported == pytest.approx(seq, rel=1e-4)
    assert abs(seq - not_seq) > 1e-3 * seq  # the test can tell the two orders apart


@pytest.mark.parametrize("true_sequential", [False, True])
def test_true_sequential_fits_later_linears_to_the_quantized_earlier_ones(tiny_lm, calib_text, true_sequential):
    """Block 0's o and down errors, as reported, must be measured on the inputs that the quantized
    q/k/v (and o, gate/up) produce with true_sequential, on the unquantized block's inputs without."""
    lm = tiny_lm("llama", layers=2)
    ctx = _ctx(lm, calib_text)
    v = _quantize(ctx, original_variant(2), method="rtn", bits=2, group_size=32, blocks=[0],
                  true_sequential=true_sequential, error_report=True)
    assert v.reports[-1]["true_sequential"] is true_sequential
    reported = v.reports[-1]["blocks"]["0"]["linears"]

    def input_hessians(variant):  # block 0's o and down inputs in a plain model run
        model = view_model(lm.model, lm.adapter, variant)
        lin = lm.adapter.linears(lm.adapter.blocks(model)[0])
        xs = {"o": [], "down": []}
        hs = [lin[n].register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))
              for n in xs]
        try:
            model(input_ids=ctx.calib_ids(), use_cache=False)
        finally:
            for h in hs:
                h.remove()
        return {n: torch.cat(x).T @ torch.cat(x) / torch.cat(x).shape[0] for n, x in xs.items()}

    fitted, unquantized = input_hessians(v), input_hessians(original_variant(2))
    orig = lm.adapter.linears(lm.adapter.blocks(lm.model)[0])
    for name in ("o", "down"):
        W = orig[name].weight.detach()
        Wq = G.rtn(W, G.Scheme(bits=2, group_size=32)).weight
        with_q, without_q = G.objective(W, Wq, fitted[name]), G.objective(W, Wq, unquantized[name])
        assert abs(with_q - without_q) > 1e-3 * with_q  # the test can tell the two apart
        expected = with_q if true_sequential else without_q
        assert reported[name]["rtn_error"] == pytest.approx(expected, rel=1e-4)


def test_sizes_mixed_precision_and_requantize_from_source(tiny_lm, calib_text):
    from workbench.engine.evaluate import size_of

    lm = tiny_lm("llama", layers=3)
    ctx = _ctx(lm, calib_text)
    base = size_of(lm, original_variant(3))["bytes"]
    v = _quantize(ctx, original_variant(3), method="rtn", bits=4, group_size=32, blocks=[0])
    v = _quantize(ctx, v, method="rtn", bits=8, group_size=-1, sym=True, blocks=[1])
    assert v.tags == {0: "quantized 4-bit g32", 1: "quantized 8-bit per-channel"}
    saved = sum(r["total"]["bytes_saved"] for r in v.reports)
    assert size_of(lm, v)["bytes"] == base - saved
    # 4-bit g32 asymmetric, fp32 scales: 4 + 32/32 + 4/32 bits per weight
    assert v.reports[0]["total"]["bits_per_weight"] == pytest.approx(4 + 1 + 0.125)
    # quantizing block 0 again starts from the original weights, not the 4-bit ones
    again = _quantize(ctx, v, method="rtn", bits=8, group_size=32, blocks=[0])
    direct = _quantize(ctx, original_variant(3), method="rtn", bits=8, group_size=32, blocks=[0])
    qa = lm.adapter.linears(again.overrides[0])["q"].weight
    qd = lm.adapter.linears(direct.overrides[0])["q"].weight
    assert torch.equal(qa, qd)


def test_bad_group_size_and_fields_are_clear_errors(tiny_lm, calib_text):
    lm = tiny_lm("llama", layers=2)  # hidden 32: group 64 cannot tile it
    with pytest.raises(RecipeError, match="does not divide the input width 32"):
        _quantize(_ctx(lm, calib_text), original_variant(2), method="gptq", bits=4, group_size=64)
    for bad in ({"bits": 5}, {"group_size": 48}, {"method": "awq"}, {"act_order": "yes"},
                {"method": "rtn", "act_order": "weight"}, {"blocks": [0.5]}):
        with pytest.raises(RecipeError):
            step_from_dict({"op": "quantize", **bad})


def test_gpt2_conv1d_is_quantized_in_its_own_orientation(tiny_lm, calib_text):
    lm = tiny_lm("gpt2", layers=2)
    v = _quantize(_ctx(lm, calib_text), original_variant(2), method="gptq", bits=4, group_size=32, blocks=[1])
    blk = v.overrides[1]
    conv = lm.adapter.linears(blk)["up"]  # Conv1D, weight (in, out)
    orig = lm.adapter.linears(lm.adapter.blocks(lm.model)[1])["up"]
    assert conv.weight.shape == orig.weight.shape
    rec = conv.workbench_quant
    assert rec.codes.shape == orig.weight.t().shape  # codes are (out, in)
    assert torch.allclose(conv.weight.t(), G.dequantize(rec.codes, rec.scale, rec.zero, rec.g_idx), atol=1e-6)


# ---- compressed-tensors: packing and the export round trip ---------------------------------------------
@pytest.mark.parametrize("bits,group_size,sym", [(2, 16, False), (3, 32, True), (4, 16, False), (8, -1, False), (4, -1, True)])
def test_packing_round_trip_through_compressed_tensors(bits, group_size, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from workbench.engine.export_ct import _scheme
    from workbench.engine.ops.quantize import QuantRecord

    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    res = G.rtn(W, G.Scheme(bits=bits, group_size=group_size, sym=sym))
    rec = QuantRecord(res.codes, res.scale, res.zero, res.g_idx, bits, group_size, sym, None, "rtn")
    scheme = _scheme(rec, ["x"])
    half = 2 ** (bits - 1)
    sd = {"weight": res.weight, "weight_scale": res.scale}
    if not sym:
        sd["weight_zero_point"] = (res.zero - half).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(sd, scheme)
    assert packed["weight_packed"].dtype == torch.int32
    assert packed["weight_packed"].numel() * 32 == pytest.approx(W.numel() * bits, abs=32 * W.shape[0])
    codes = unpack_from_int32(packed["weight_packed"], bits, torch.Size(W.shape))
    assert torch.equal(codes.to(torch.int16), res.codes.to(torch.int16) - half)
    back = PackedQuantizationCompressor.decompress(packed, scheme)
    assert torch.equal(back["weight"], res.weight)


def _reload_logits(path, ids):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(path)  # plain: no quantization_config argument
    with torch.no_grad():
        return model(input_ids=ids).logits


LOGIT_TOL = 1e-4  # stated tolerance: max |logit difference| between the reloaded export and the in-app variant


@pytest.mark.parametrize("steps,dequantize", [
    ([dict(method="gptq", bits=4, group_size=32, sym=True, act_order="weight", blocks=[0, 2]),
      dict(method="rtn", bits=8, group_size=-1, sym=True, blocks=[1])], False),  # mixed, plain from_pretrained
    # asymmetric: the config asks transformers to dequantize while loading (its packed-layout path cannot
    # size packed zero points); still a plain from_pretrained
    ([dict(method="gptq", bits=3, group_size=32, sym=False, blocks=[0, 1])], True),
])
def test_compressed_tensors_export_reloads_to_the_variant(tiny_lm, calib_text, tmp_path, steps, dequantize):
    import json

    from workbench.engine.export_ct import export_compressed

    lm = tiny_lm("llama", layers=3)
    ctx = _ctx(lm, calib_text)
    v = apply_steps(ctx, original_variant(3), [step_from_dict({"op": "quantize", **s}) for s in steps])
    out = export_compressed(lm, v, tmp_path / "ct", {"steps": v.steps})
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg.get("dequantize", False) is dequantize
    assert "compressed-tensors" in (out / "README.md").read_text()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = view_model(lm.model, lm.adapter, v)(input_ids=ids).logits
        orig = lm.model(input_ids=ids).logits
    theirs = _reload_logits(out, ids)
    assert (theirs - ours).abs().max().item() <= LOGIT_TOL
    assert (orig - ours).abs().max().item() > 100 * LOGIT_TOL  # quantization did change the logits


def test_compressed_tensors_export_refuses_what_it_cannot_write(tiny_lm, calib_text, tmp_path):
    from workbench.engine.export_ct import export_compressed

    lm = tiny_lm("llama", layers=3)
    ctx = _ctx(lm, calib_text)
    cases = [
        ([dict(method="gptq", bits=4, group_size=32, act_order="group", blocks=[0])], "act_order 'group'"),
        ([dict(method="rtn", bits=4, group_size=32, blocks=[0]), dict(method="rtn", bits=8, group_size=32, blocks=[1])],
         "mixed precision"),
        ([], "no quantized blocks"),
    ]
    for steps, msg in cases:
        v = apply_steps(ctx, original_variant(3), [step_from_dict({"op": "quantize", **s}) for s in steps])
        with pytest.raises(ExportError, match=msg):
            export_compressed(lm, v, tmp_path / "x", {})
    gpt2 = tiny_lm("gpt2", layers=2)
    v = _quantize(_ctx(gpt2, calib_text), original_variant(2), method="rtn", bits=4, group_size=32, blocks=[0])
    with pytest.raises(ExportError, match="Conv1D"):
        export_compressed(gpt2, v, tmp_path / "y", {})


def test_observer_is_optional_in_recipes_and_validated():
    assert step_from_dict({"op": "quantize"}).to_dict()["observer"] == "minmax"  # older recipes replay unchanged
    assert step_from_dict({"op": "quantize", "observer": "mse"}).scheme().observer == "mse"
    assert step_from_dict({"op": "quantize"}).to_dict()["true_sequential"] is False
    assert step_from_dict({"op": "quantize"}).to_dict()["hessian_shrink"] == 0.0
    assert step_from_dict({"op": "quantize", "hessian_shrink": 0.4}).scheme().shrink == 0.4
    with pytest.raises(RecipeError, match="hessian_shrink"):
        step_from_dict({"op": "quantize", "hessian_shrink": 2})
    with pytest.raises(RecipeError, match="true_sequential"):
        step_from_dict({"op": "quantize", "true_sequential": "yes"})
    with pytest.raises(RecipeError, match="observer"):
        step_from_dict({"op": "quantize", "observer": "percentile"})


def test_act_order_default_resolves_per_method():
    assert step_from_dict({"op": "quantize"}).to_dict()["act_order"] == "weight"
    assert step_from_dict({"op": "quantize", "method": "rtn"}).to_dict()["act_order"] is None
    assert step_from_dict({"op": "quantize", "act_order": None}).to_dict()["act_order"] is None


def test_rtn_without_error_report_makes_no_calibration_pass_and_the_same_weights(tiny_lm, calib_text, monkeypatch):
    from workbench.engine.ops import quantize as Q

    lm = tiny_lm("llama", layers=3)
    ctx = _ctx(lm, calib_text)
    with_report = _quantize(ctx, original_variant(3), method="rtn", bits=4, group_size=32, blocks=[0, 2],
                            observer="mse", error_report=True)

    def no_trace(*a, **k):
        raise AssertionError("RTN without its error report must not trace calibration data")

    monkeypatch.setattr(Q, "trace_blocks", no_trace)
    monkeypatch.setattr(ctx, "calib_ids", no_trace)
    plain = _quantize(ctx, original_variant(3), method="rtn", bits=4, group_size=32, blocks=[0, 2], observer="mse")
    for i in (0, 2):
        a, b = with_report.overrides[i].state_dict(), plain.overrides[i].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ra, rb = with_report.reports[-1]["blocks"][str(i)], plain.reports[-1]["blocks"][str(i)]
        assert ra["bytes_after"] == rb["bytes_after"] and ra["bits_per_weight"] == rb["bits_per_weight"]
        assert rb["linears"]["o"]["error"] is None and ra["linears"]["o"]["error"] > 0
    assert plain.reports[-1]["calibration_tokens"] == 0 and plain.reports[-1]["total"]["error"] is None
    assert step_from_dict({"op": "quantize"}).to_dict()["error_report"] is False
