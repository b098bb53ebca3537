"""Block influence metrics against naive reference implementations on tiny models.

The references never use `trace_blocks` / `run_block`: they build the variant with `view_model`
(with the block dropped where the metric asks) and run the whole model, reading hidden states from
a forward hook on the last block or from `output_hidden_states`.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from workbench.engine.analysis import influence as inf
from workbench.engine.analysis import influence_math as im
from workbench.engine.errors import BlockIndexError, Cancelled, WorkbenchError
from workbench.engine.variant import copy_block, original_variant, view_model

ATOL = 2e-5


def _ids(batch=3, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, seq), generator=g)


@torch.no_grad()
def _last_hidden(lm, variant, ids):
    """h_L (last block's output, before the final norm) of the variant, by a hook on a full forward."""
    model = view_model(lm.model, lm.adapter, variant)
    got = {}
    last = lm.adapter.blocks(model)[-1]
    handle = last.register_forward_hook(lambda m, a, out: got.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return got["h"]


@torch.no_grad()
def _hidden_states(lm, variant, ids):
    """h_0..h_P of the variant: output_hidden_states gives the block inputs; the hook gives h_P."""
    model = view_model(lm.model, lm.adapter, variant)
    hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    p = len(variant.kept())
    return [*hs[:p], _last_hidden(lm, variant, ids)]


@torch.no_grad()
def _nll(lm, variant, ids):
    model = view_model(lm.model, lm.adapter, variant)
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)).item()


def _naive_mi(lm, variant, ids):
    ref = _last_hidden(lm, variant, ids)
    out = [None] * variant.num_blocks
    for i in variant.kept():
        h = _last_hidden(lm, variant.with_dropped([i]), ids)
        out[i] = 1.0 - F.cosine_similarity(ref, h, dim=-1).mean().item()
    return out


def _naive_ppl(lm, variant, ids):
    base = _nll(lm, variant, ids)
    out = [None] * variant.num_blocks
    for i in variant.kept():
        out[i] = _nll(lm, variant.with_dropped([i]), ids) - base
    return out


def _close(a, b, atol=ATOL):
    assert [x is None for x in a] == [y is None for y in b]
    for x, y in zip(a, b):
        if x is not None:
            assert abs(x - y) <= atol + 1e-4 * abs(y), (a, b)


def _edited_variant(lm, dropped=(1,), replaced=3):
    """A variant with a dropped block and a replaced block (weights changed), as a recipe would make."""
    v = original_variant(lm.num_blocks).with_dropped(list(dropped))
    blk = copy_block(lm.adapter.blocks(lm.model)[replaced])
    with torch.no_grad():
        for p in blk.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
    v.overrides[replaced] = blk
    v.tags[replaced] = "changed"
    return v


# ---- Macro Influence ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_mi_matches_dropping_each_block_and_running_the_full_model(tiny_lm, family):
    lm = tiny_lm(family, layers=5)
    ids = _ids(seq=72 if family == "gemma2" else 12)  # > gemma2's sliding window of 64
    v = original_variant(lm.num_blocks)
    got = inf.block_scores(lm, v, ids, "mi")
    _close(got["values"], _naive_mi(lm, v, ids))
    assert got["block_passes"] == 5 + 5 * 4 // 2  # one traced pass + P(P-1)/2


@pytest.mark.parametrize("max_rows", [3, 6, 1000])  # one variant per call, two, all stacked
def test_mi_same_for_any_grouping_of_stacked_variants(tiny_lm, max_rows):
    lm = tiny_lm("opt", layers=6)  # OPT passes per-sample position ids: exercises the call tiling
    lm.model.config._attn_implementation = "eager"  # a (B, 1, T, T) mask: tiled too
    ids = _ids()
    v = original_variant(lm.num_blocks)
    _close(inf.block_scores(lm, v, ids, "mi", max_rows=max_rows)["values"], _naive_mi(lm, v, ids))


def test_mi_on_a_variant_skips_dropped_and_uses_replaced_blocks(tiny_lm):
    lm = tiny_lm("llama", layers=6)
    ids = _ids()
    v = _edited_variant(lm)
    got = inf.block_scores(lm, v, ids, "mi")
    assert got["values"][1] is None
    _close(got["values"], _naive_mi(lm, v, ids))
    # the replaced block matters: the original's MI differs
    orig = inf.block_scores(lm, original_variant(6), ids, "mi")["values"]
    assert abs(orig[3] - got["values"][3]) > 1e-4


def test_mi_iterative_plan_matches_naive_greedy(tiny_lm):
    lm = tiny_lm("llama", layers=6)
    ids = _ids()
    v = _edited_variant(lm, dropped=(4,))
    plan = inf.removal_plan(lm, v, ids, "mi", 3)
    cur, order, scores = v, [], []
    for _ in range(3):
        mi = _naive_mi(lm, cur, ids)
        i = min((x, i) for i, x in enumerate(mi) if x is not None)[1]
        order.append(i)
        scores.append(mi[i])
        cur = cur.with_dropped([i])
    assert plan["order"] == order
    _close(plan["scores"], scores)
    assert plan["iterative"] is True
    assert 4 not in plan["order"]
    # after the last removal, h_L against the start variant's h_L
    ref = 1 - F.cosine_similarity(_last_hidden(lm, v, ids), _last_hidden(lm, cur, ids), dim=-1).mean().item()
    assert abs(plan["mi_to_start"][-1] - ref) < ATOL


# ---- Block influence and angular distance ------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_bi_matches_block_hooks(tiny_lm, family):
    lm = tiny_lm(family, layers=4)
    ids = _ids()
    v = original_variant(4) if family == "bert" else _edited_variant(lm, dropped=(0,), replaced=2)
    model = view_model(lm.model, lm.adapter, v)
    seen = []

    def hook(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        seen.append(1 - F.cosine_similarity(x, y, dim=-1).mean().item())

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in lm.adapter.blocks(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    ref = [None] * 4
    for i, s in zip(v.kept(), seen):
        ref[i] = s
    _close(inf.block_scores(lm, v, ids, "bi")["values"], ref)


@pytest.mark.parametrize("last_token", [False, True])
def test_angular_matrix_matches_output_hidden_states(tiny_lm, last_token):
    lm = tiny_lm("qwen2", layers=5)
    ids = _ids()
    v = _edited_variant(lm, dropped=(2,), replaced=0)
    hs = _hidden_states(lm, v, ids)
    p = len(hs) - 1
    got = inf.angular_distances(lm, v, ids, last_token=last_token)
    assert got["blocks"] == [0, 1, 3, 4]
    for n in range(1, p + 1):
        for l in range(p):
            if l + n > p:
                assert got["matrix"][n - 1][l] is None
                continue
            a, b = hs[l], hs[l + n]
            if last_token:
                a, b = a[:, -1], b[:, -1]
            cos = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
            ref = (torch.arccos(cos) / math.pi).mean().item()
            assert abs(got["matrix"][n - 1][l] - ref) < ATOL
    for best in got["best"]:
        row = got["matrix"][best["n"] - 1]
        assert best["distance"] == min(d for d in row if d is not None)
        assert best["blocks"] == got["blocks"][best["start"] : best["start"] + best["n"]]
    per_block = inf.block_scores(lm, v, ids, "angular", last_token=last_token)["values"]
    _close([per_block[i] for i in got["blocks"]], got["matrix"][0])


def test_angular_of_identical_states_is_zero_and_of_opposite_is_one():
    x = torch.randn(2, 5, 8)
    assert im.angular(x, 3 * x) < 1e-3  # float32 arccos near 1 is coarse
    assert abs(im.angular(x, -x) - 1.0) < 1e-3
    y = torch.zeros(2, 5, 8)
    y[..., 0] = 1
    z = torch.zeros(2, 5, 8)
    z[..., 1] = 1
    assert abs(im.angular(y, z) - 0.5) < 1e-6


# ---- Perplexity drop ----------------------------------------------------------------------------
def test_ppl_drop_matches_full_forward_losses_on_a_variant(tiny_lm):
    lm = tiny_lm("mistral", layers=5)
    ids = _ids()
    v = _edited_variant(lm, dropped=(3,), replaced=1)
    got = inf.block_scores(lm, v, ids, "ppl")
    _close(got["values"], _naive_ppl(lm, v, ids), atol=1e-4)
    assert abs(math.log(got["ppl_base"]) - _nll(lm, v, ids)) < 1e-4


def test_ppl_greedy_plan_matches_naive(tiny_lm):
    lm = tiny_lm("llama", layers=5)
    ids = _ids()
    v = original_variant(5)
    plan = inf.removal_plan(lm, v, ids, "ppl", 2)
    cur, order = v, []
    for _ in range(2):
        d = _naive_ppl(lm, cur, ids)
        i = min((x, i) for i, x in enumerate(d) if x is not None)[1]
        order.append(i)
        cur = cur.with_dropped([i])
    assert plan["order"] == order
    assert abs(math.log(plan["ppl_after"][-1]) - _nll(lm, cur, ids)) < 1e-4


# ---- plans, errors, all metrics at once ---------------------------------------------------------
def test_one_shot_plans_are_the_lowest_values(tiny_lm):
    lm = tiny_lm("llama", layers=6)
    ids = _ids()
    v = original_variant(6).with_dropped([2])
    for metric in ("bi", "angular"):
        vals = inf.block_scores(lm, v, ids, metric)["values"]
        plan = inf.removal_plan(lm, v, ids, metric, 3)
        kept = sorted((x, i) for i, x in enumerate(vals) if x is not None)
        assert plan["order"] == [i for _, i in kept[:3]]
        assert plan["iterative"] is False and 2 not in plan["order"]


def test_all_scores_agrees_with_each_metric(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    ids = _ids()
    v = _edited_variant(lm, dropped=(2,), replaced=1)
    every = inf.all_scores(lm, v, ids)
    assert set(every) == set(inf.METRICS)
    for metric in inf.METRICS:
        _close(every[metric]["values"], inf.block_scores(lm, v, ids, metric)["values"], atol=1e-6)


def test_errors_and_cancel(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    ids = _ids()
    v = original_variant(4).with_dropped([0])
    with pytest.raises(WorkbenchError, match="unknown metric"):
        inf.block_scores(lm, v, ids, "nope")
    with pytest.raises(BlockIndexError):
        inf.removal_plan(lm, v, ids, "mi", 3)  # only 3 blocks kept
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        inf.block_scores(lm, v, ids, "mi", cancel=stop)
    seen = []
    inf.removal_plan(lm, v, ids, "mi", 2, progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)


def test_mi_on_the_default_model_is_exact_on_a_few_blocks(default_lm):
    """On the real model: our scan vs dropping the block and running the full model, for 3 blocks."""
    ids = _ids(batch=1, seq=16)
    v = original_variant(default_lm.num_blocks)
    got = inf.block_scores(default_lm, v, ids, "mi")["values"]
    ref = _last_hidden(default_lm, v, ids)
    for i in (0, 14, 29):
        h = _last_hidden(default_lm, v.with_dropped([i]), ids)
        assert abs(got[i] - (1 - F.cosine_similarity(ref, h, dim=-1).mean().item())) < 1e-4


@pytest.mark.gpu
def test_scans_on_cuda_match_cpu(tiny_lm):
    """GPU self-check: every metric on CUDA (memory-sized stacking) equals the CPU result."""
    cpu = tiny_lm("llama", layers=6)
    gpu = tiny_lm("llama", layers=6)
    gpu.model.to("cuda")
    gpu.device = torch.device("cuda")
    ids = _ids(batch=4, seq=32)
    v = original_variant(6).with_dropped([2])
    a, b = inf.all_scores(cpu, v, ids), inf.all_scores(gpu, v, ids)
    for metric in inf.METRICS:
        _close(b[metric]["values"], a[metric]["values"], atol=1e-4)
    assert inf.removal_plan(gpu, v, ids, "mi", 2)["order"] == inf.removal_plan(cpu, v, ids, "mi", 2)["order"]


def test_cli_influence_json_with_plan(default_lm, capsys):
    from workbench.cli import main
    from workbench.engine.data import Calibration, calibration_ids

    args = ["analyze", "influence", "--metric", "mi", "--samples", "1", "--seq-len", "16", "--iterative", "2", "--json"]
    assert main(args) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    res = doc["result"]
    assert doc["inputs"]["calibration"]["samples"] == 1 and len(res["values"]) == default_lm.num_blocks
    ids = calibration_ids(default_lm.tokenizer, Calibration(samples=1, seq_len=16))
    want = inf.block_scores(default_lm, original_variant(default_lm.num_blocks), ids, "mi")["values"]
    _close(res["values"], want, atol=1e-5)
    assert res["order"][0] == im.lowest(want, 1)[0] and len(res["order"]) == 2
    assert main(["analyze", "influence", "--metric", "bi", "--samples", "1", "--seq-len", "16", "--iterative", "30"]) == 2
    assert "k must be between 1 and 29" in capsys.readouterr().err
