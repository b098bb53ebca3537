"""FuseGPT fusion: the injected linear, the group window, identity at P = 0, merge = unmerged, training
lowers the group loss, export round trip, replay, cancellation; llama and the biased families."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.engine.adapters import linear_weight
from workbench.engine.data import Calibration
from workbench.engine.errors import BlockIndexError, Cancelled, RecipeError
from workbench.engine.block_stream import run_block, trace_blocks
from workbench.engine.ops.fuse import FuseBlocks, inject_block, merge_block, neighbour_window
from workbench.engine.ops.fuse_linear import FuseLinear
from workbench.engine.recipe import OpContext, step_from_dict
from workbench.engine.variant import DROP, original_variant, state_fingerprint, view_model

IDS = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))
SMALL = dict(samples=4, seq_len=24, batch=2, patience=0)


def _ctx(lm, cancel=None):
    return OpContext(lm=lm, calibration=Calibration(samples=4, seq_len=24), cancel=cancel)


def _logits(lm, variant, ids=IDS):
    return view_model(lm.model, lm.adapter, variant)(input_ids=ids, use_cache=False).logits.float()


# ---- the pure pieces ------------------------------------------------------------------------------
def test_neighbour_window_hand_cases():
    kept = list(range(10))
    assert neighbour_window(kept, 5, 7) == ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 6, 7, 8])  # b-4 .. b+3
    assert neighbour_window(kept, 1, 7) == ([0, 1, 2, 3, 4], [0, 2, 3, 4])  # clamped at the start
    assert neighbour_window(kept, 9, 7) == ([5, 6, 7, 8, 9], [5, 6, 7, 8])  # clamped at the end
    assert neighbour_window(kept, 5, 2) == ([4, 5, 6], [4, 6])
    # positions count among the kept blocks: dropped ones are skipped, indices stay original
    assert neighbour_window([0, 2, 3, 7, 8, 9], 7, 3) == ([2, 3, 7, 8], [2, 3, 8])


@pytest.mark.parametrize("mode", ["lowrank", "vector", "full"])
def test_fuse_linear_matches_naive_formula(mode):
    g = torch.Generator().manual_seed(0)
    w, w_add = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    b, b_add = torch.randn(6, generator=g), torch.randn(6, generator=g)
    fl = FuseLinear(w, b, w_add, b_add, mode=mode, rank=3, lora_rank=2, generator=g)
    x = torch.randn(5, 8, generator=g)
    # P = 0 (and LoRA B = 0): exactly the plain linear
    assert torch.equal(fl(x), F.linear(x, w, b))
    with torch.no_grad():
        for p in fl.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    # naive element loop for W_eff = W + C * W_add + B A, b_eff = b + c_b * b_add
    c = {"lowrank": lambda: fl.coef_p @ fl.coef_q, "vector": lambda: fl.coef_v.expand(6, 8),
         "full": lambda: fl.coef_full}[mode]().detach()
    lora = (fl.lora_b @ fl.lora_a).detach()
    w_eff = torch.empty(6, 8)
    for o in range(6):
        for i in range(8):
            w_eff[o, i] = w[o, i] + c[o, i] * w_add[o, i] + lora[o, i]
    b_eff = torch.tensor([b[o] + fl.coef_bias[o].item() * b_add[o] for o in range(6)])
    mw, mb = fl.merged()
    torch.testing.assert_close(mw, w_eff)
    torch.testing.assert_close(mb, b_eff)
    torch.testing.assert_close(fl(x), x @ w_eff.T + b_eff)
    assert fl.weight_base.equal(w) and fl.weight_add.equal(w_add)  # frozen inputs untouched


def test_lr_schedule_warms_up_then_decays():
    from workbench.engine.ops.fuse import lr_factor

    assert [lr_factor(t, 6, 2) for t in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(4, 6, 2) == pytest.approx(0.5)  # half-way through the cosine part
    assert lr_factor(0, 4, 0) == 1.0 and 0 < lr_factor(3, 4, 0) < 0.2


def test_step_validation_names_the_field():
    with pytest.raises(RecipeError, match="either 'blocks'"):
        FuseBlocks(blocks=[1], k=1)
    with pytest.raises(RecipeError, match="either 'blocks'"):
        FuseBlocks()
    with pytest.raises(RecipeError, match="'coef'"):
        FuseBlocks(blocks=[1], coef="diag")
    with pytest.raises(RecipeError, match="'rank'"):
        FuseBlocks(blocks=[1], rank=0)
    with pytest.raises(RecipeError, match="unknown field"):
        step_from_dict({"op": "fuse_blocks", "blocks": [1], "ranks": 3})


# ---- the group -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_untrained_injection_equals_group_without_block(tiny_lm, family):
    """P = 0: the injected group is the group without b (exact for nn.Linear; GPT-2's Conv1D uses addmm,
    a different kernel, so equal to rounding there); steps=0 merged equals plain removal exactly."""
    lm = tiny_lm(family, layers=5)
    _random_biases(lm)
    a, blocks = lm.adapter, lm.adapter.blocks(lm.model)
    trace = trace_blocks(lm.model, a, IDS)
    b, group = 2, [0, 1, 3, 4]
    students = [inject_block(a, blocks[j], blocks[b], rank=4, generator=torch.Generator().manual_seed(0)) for j in group]
    h_ref, h_inj = trace.inputs[0], trace.inputs[0]
    for j, s in zip(group, students):
        h_ref = run_block(blocks[j], h_ref, trace.calls[j])
        h_inj = run_block(s, h_inj, trace.calls[j])
    if family == "gpt2":
        torch.testing.assert_close(h_inj, h_ref, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(h_inj, h_ref)
    v0 = original_variant(lm.num_blocks)
    fused, _, _ = FuseBlocks(blocks=[b], steps=0, **SMALL).apply(_ctx(lm), v0)
    assert torch.equal(_logits(lm, fused), _logits(lm, v0.with_dropped([b])))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_merged_equals_unmerged_injected(tiny_lm, family):
    lm = tiny_lm(family, layers=4)
    _random_biases(lm)
    a, blocks = lm.adapter, lm.adapter.blocks(lm.model)
    g = torch.Generator().manual_seed(1)
    students = {j: inject_block(a, blocks[j], blocks[1], rank=3, lora_rank=2, generator=g) for j in (0, 2, 3)}
    with torch.no_grad():  # stand-in for training: every trainable gets a random value
        for s in students.values():
            for p in s.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
    v = original_variant(4).with_dropped([1])
    unmerged = v.derive()
    unmerged.overrides.update(students)
    want = _logits(lm, unmerged).detach()
    assert not torch.allclose(want, _logits(lm, v), atol=1e-3)  # the coefficients do change the model
    merged = v.derive()
    merged.overrides.update({j: merge_block(a, s) for j, s in students.items()})
    assert not any(isinstance(m, FuseLinear) for s in merged.overrides.values() if s is not DROP for m in s.modules())
    torch.testing.assert_close(_logits(lm, merged), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_training_lowers_group_loss_and_leaves_original_alone(tiny_lm, family):
    lm = tiny_lm(family, layers=6)
    _random_biases(lm)
    before = state_fingerprint(lm.model)
    v0 = original_variant(6)
    step = FuseBlocks(blocks=[2], group=3, steps=25, lr=3e-2, loss="mse", **SMALL)
    fused, report, resolved = step.apply(_ctx(lm), v0)
    rep = report["per_block"][0]
    assert rep["group"] == [0, 1, 2, 3] and rep["neighbours"] == [0, 1, 3]
    assert rep["loss_end"] < 0.9 * rep["loss_start"]
    # independent check of the claim: the group's output against the teacher, recomputed here
    ids = step_calib(lm, step)
    trace = trace_blocks(lm.model, lm.adapter, ids)
    teacher = trace.inputs[4]
    h_removed, h_fused = trace.inputs[0], trace.inputs[0]
    for j in (0, 1, 3):
        h_removed = run_block(lm.adapter.blocks(lm.model)[j], h_removed, trace.calls[j])
        h_fused = run_block(fused.overrides[j], h_fused, trace.calls[j])
    assert F.mse_loss(h_fused, teacher) < 0.9 * F.mse_loss(h_removed, teacher)
    torch.testing.assert_close(F.mse_loss(h_fused, teacher).item(), rep["loss_end"], rtol=1e-4, atol=0)
    # the variant: b dropped, neighbours replaced and tagged, nothing else touched
    assert fused.dropped() == [2] and fused.replaced() == [0, 1, 3]
    assert all(fused.tags[j] == "fused" for j in (0, 1, 3)) and 4 not in fused.overrides
    assert resolved["blocks"] == [2] and resolved["op"] == "fuse_blocks"
    assert v0.is_identity()
    after = state_fingerprint(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for j in (0, 1, 3) for p in fused.overrides[j].parameters())
    if family in ("gpt2", "opt"):  # biases are fused too: some neighbour bias moved
        blocks = lm.adapter.blocks(lm.model)
        moved = [
            not torch.equal(m.bias, lm.adapter.linears(blocks[j])[n].bias)
            for j in (0, 1, 3)
            for n, m in lm.adapter.linears(fused.overrides[j]).items()
        ]
        assert any(moved)


def _random_biases(lm):
    """Tiny GPT-2/OPT start with zero biases, which would make bias fusion a no-op."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for blk in lm.adapter.blocks(lm.model):
            for m in lm.adapter.linears(blk).values():
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def step_calib(lm, step):
    from workbench.engine.data import calibration_ids

    return calibration_ids(lm.tokenizer, Calibration(samples=step.samples, seq_len=step.seq_len))


def test_last_block_group_uses_kl_and_lowers_it(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    fused, report, _ = FuseBlocks(blocks=[3], group=2, steps=20, lr=3e-2, **SMALL).apply(_ctx(lm), original_variant(4))
    rep = report["per_block"][0]
    assert rep["loss"] == "kl" and rep["loss_end"] < rep["loss_start"]
    assert len(rep["history"]) == 21 and rep["history"][0][0] == 0


# ---- as a recipe step ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_export_reload_same_logits(tiny_lm, family, tmp_path):
    from transformers import AutoModelForCausalLM

    from workbench.engine.export import export_variant
    from workbench.engine.recipe import variant_recipe

    lm = tiny_lm(family, layers=5)
    ctx = _ctx(lm)
    step = FuseBlocks(blocks=[3, 1], group=4, steps=4, **SMALL)
    fused, _, resolved = step.apply(ctx, original_variant(5))
    fused.steps = [resolved]
    out = export_variant(lm, fused, tmp_path / "fused", variant_recipe(lm, fused, ctx.calibration))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(lm.adapter.blocks(reloaded)) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits.float(), _logits(lm, fused), rtol=1e-5, atol=1e-5)


def test_replay_of_resolved_step_is_identical(tiny_lm):
    lm = tiny_lm("llama", layers=5)
    ctx = _ctx(lm)
    first, _, resolved = FuseBlocks(blocks=[2], group=4, steps=5, **SMALL).apply(ctx, original_variant(5))
    again, _, _ = step_from_dict(resolved).apply(ctx, original_variant(5))
    assert torch.equal(_logits(lm, first), _logits(lm, again))


def test_k_mode_fuses_lowest_macro_influence_block(tiny_lm):
    from workbench.engine.analysis.influence import block_scores

    lm = tiny_lm("llama", layers=5)
    step = FuseBlocks(k=1, group=2, steps=2, mi_samples=2, **SMALL)
    fused, report, resolved = step.apply(_ctx(lm), original_variant(5))
    mi = block_scores(lm, original_variant(5), step_calib(lm, step)[:2], metric="mi")["values"]
    want = min(range(5), key=lambda i: mi[i])
    assert resolved["blocks"] == [want] and resolved["k"] == 0 and fused.dropped() == [want]
    assert report["per_block"][0]["mi"] == pytest.approx(mi[want])


def test_fused_block_refuses_dropped_and_last_block(tiny_lm):
    lm = tiny_lm("llama", layers=3)
    v = original_variant(3).with_dropped([1])
    with pytest.raises(BlockIndexError, match="already dropped"):
        FuseBlocks(blocks=[1], steps=0, **SMALL).apply(_ctx(lm), v)
    with pytest.raises(BlockIndexError, match="keep at least one"):
        FuseBlocks(blocks=[0, 2], steps=0, **SMALL).apply(_ctx(lm), v)


def test_cancel_leaves_variant_and_model_unchanged(tiny_lm):
    lm = tiny_lm("llama", layers=5)
    before = state_fingerprint(lm.model)
    v = original_variant(5).with_dropped([4])
    snapshot = (dict(v.overrides), dict(v.tags), list(v.steps))
    cancel = threading.Event()
    seen = []

    def progress(frac, msg):
        seen.append(msg)
        if "step 3/" in msg:
            cancel.set()

    ctx = OpContext(lm=lm, calibration=Calibration(samples=4, seq_len=24), progress=progress, cancel=cancel)
    with pytest.raises(Cancelled):
        FuseBlocks(blocks=[1, 2], group=3, steps=10, **SMALL).apply(ctx, v)
    assert any("step 3/" in m for m in seen)
    assert (dict(v.overrides), dict(v.tags), list(v.steps)) == snapshot
    after = state_fingerprint(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in lm.model.parameters())


@pytest.mark.gpu
def test_gpu_self_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "self_checks.py"  # the self-checks live with the benches
    spec = importlib.util.spec_from_file_location("self_checks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.gpu_self_check()
    assert result["ok"], result


def test_second_fusion_trains_on_the_fused_variant(tiny_lm):
    """Fusions chain: the second one's teacher and inputs come from the variant after the first
    (recomputed here by hand from the trace, block by block)."""
    lm = tiny_lm("llama", layers=6)
    ctx = _ctx(lm)
    opts = dict(group=3, steps=3, lr=3e-2, loss="mse", **SMALL)
    both, report, _ = FuseBlocks(blocks=[1, 3], **opts).apply(ctx, original_variant(6))
    first, _, _ = FuseBlocks(blocks=[1], **opts).apply(ctx, original_variant(6))
    rep = report["per_block"][1]
    assert rep["group"] == [0, 2, 3, 4] and rep["neighbours"] == [0, 2, 4]
    trace = trace_blocks(lm.model, lm.adapter, step_calib(lm, FuseBlocks(blocks=[1], **opts)))
    mod = {i: first.overrides.get(i, lm.adapter.blocks(lm.model)[i]) for i in range(6)}
    teacher, student = trace.inputs[0], trace.inputs[0]
    for i in (0, 2, 3, 4):
        teacher = run_block(mod[i], teacher, trace.calls[i])
    for i in (0, 2, 4):
        student = run_block(mod[i], student, trace.calls[i])
    assert rep["loss_start"] == pytest.approx(F.mse_loss(student, teacher).item(), rel=1e-5)
    assert both.dropped() == [1, 3] and both.replaced() == [0, 2, 4]


def test_panel_fuse_summary_shows_each_block_and_its_curve():
    from workbench.panels.blocks import fuse_summary

    report = {"per_block": [{"block": 3, "neighbours": [1, 2, 4], "loss": "mse", "loss_start": 4.0, "loss_end": 1.0,
                             "steps_run": 3, "seconds": 2.0, "history": [[0, 4.0], [1, 3.0], [2, 2.0], [3, 1.0]]}]}
    text = fuse_summary(report)
    assert "block 3 → [1, 2, 4]" in text and "4 → 1" in text and "`█▅▃▁`" in text  # levels int(7 * (x - 1) / 3): 7, 4, 2, 0
    assert fuse_summary({"op": "prune_blocks"}) == ""


def test_relative_mse_loss_by_hand_and_as_the_steps_start_loss(tiny_lm):
    """"nmse": per token ||s - t||^2 / ||t||^2, averaged over tokens (a hand loop); the step reports it at
    step 0 for the plain-removal student, and "auto_nmse" switches to KL only for a group ending last."""
    from workbench.engine.ops.fuse import group_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g) * 10
    ref = sum(((s[b, i] - t[b, i]) ** 2).sum() / (t[b, i] ** 2).sum() for b in range(2) for i in range(3)) / 6
    assert group_loss(s, t, "nmse").item() == pytest.approx(ref.item(), rel=1e-6)
    lm = tiny_lm("llama", layers=6)
    opts = dict(group=3, steps=2, lr=3e-2, **SMALL)
    _, report, _ = FuseBlocks(blocks=[2], loss="auto_nmse", **opts).apply(_ctx(lm), original_variant(6))
    rep = report["per_block"][0]
    trace = trace_blocks(lm.model, lm.adapter, step_calib(lm, FuseBlocks(blocks=[2], **opts)))
    blocks = lm.adapter.blocks(lm.model)
    teacher, student = trace.inputs[1], trace.inputs[1]
    for i in (1, 2, 3):
        teacher = run_block(blocks[i], teacher, trace.calls[i])
    for i in (1, 3):
        student = run_block(blocks[i], student, trace.calls[i])
    assert rep["loss"] == "nmse" and rep["group"] == [0, 1, 2, 3]  # block 0 feeds 1: starting at 1 is the same
    assert rep["loss_start"] == pytest.approx(group_loss(student, teacher, "nmse").item(), rel=1e-5)
    _, report, _ = FuseBlocks(blocks=[5], loss="auto_nmse", **opts).apply(_ctx(lm), original_variant(6))
    assert report["per_block"][0]["loss"] == "kl"


def _guard_kl(lm):
    """KL(original || variant) on the guard's windows (2 x 24 tokens, seed 1), by hand: an independent
    reference for the guard's figures."""
    from workbench.engine.data import Calibration, calibration_ids
    from workbench.engine.variant import view_model

    ids = calibration_ids(lm.tokenizer, Calibration(samples=2, seq_len=24, seed=1))

    def kl(variant):
        ref = F.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1)
        got = F.log_softmax(view_model(lm.model, lm.adapter, variant)(input_ids=ids).logits[:, :-1].float(), -1)
        return (ref.exp() * (ref - got)).sum(-1).mean().item()

    return kl


def test_output_guard_keeps_plain_removal_unless_the_fusion_is_better_on_held_out_text(tiny_lm):
    """guard_samples > 0: KL(original || variant) of the output on other calibration windows (seed + 1),
    recomputed here by hand; 0 steps (fused == removal exactly) is not better, so removal is kept."""
    lm = tiny_lm("llama", layers=6)
    v0 = original_variant(6)
    kl = _guard_kl(lm)

    same, report, resolved = FuseBlocks(blocks=[2], group=3, steps=0, guard_samples=2, **SMALL).apply(_ctx(lm), v0)
    g = report["per_block"][0]["guard"]
    assert g["kept"] == "removal" and g["kl_fused"] == pytest.approx(g["kl_removal"], rel=1e-6)
    assert same.dropped() == [2] and not same.replaced() and resolved["guard_samples"] == 2
    assert g["kl_removal"] == pytest.approx(kl(v0.with_dropped([2])), rel=1e-4) and g["tokens"] == 2 * 23
    trained, report, _ = FuseBlocks(blocks=[2], group=3, steps=8, lr=3e-2, guard_samples=2, **SMALL).apply(_ctx(lm), v0)
    g = report["per_block"][0]["guard"]
    assert g["kl_fused"] != pytest.approx(g["kl_removal"], rel=1e-6)  # training changed the output
    assert g["kept"] == ("fused" if g["kl_fused"] < g["kl_removal"] else "removal")
    assert kl(trained) == pytest.approx(min(g["kl_fused"], g["kl_removal"]), rel=1e-4)
    assert bool(trained.replaced()) == (g["kept"] == "fused")
    unguarded, report, _ = FuseBlocks(blocks=[2], group=3, steps=8, lr=3e-2, **SMALL).apply(_ctx(lm), v0)
    assert report["per_block"][0]["guard"] is None and unguarded.replaced()  # off by default: recipes replay


def test_guard_scales_keep_the_best_of_removal_and_the_fusion_moved_part_of_the_way(tiny_lm):
    """guard_scales: the neighbours' weights moved s of the way to the fused ones (checked by hand against
    the unguarded fusion's weights), each scored by the guard's KL (recomputed by hand); the lowest of those
    and removal is kept."""
    lm = tiny_lm("llama", layers=6)
    v0 = original_variant(6)
    kl = _guard_kl(lm)

    opts = dict(blocks=[2], group=3, steps=8, lr=3e-2, **SMALL)
    full, _, _ = FuseBlocks(**opts).apply(_ctx(lm), v0)  # the fusion as trained (s = 1), no guard
    got, report, resolved = FuseBlocks(guard_samples=2, guard_scales=[1.0, 0.5, 0.25], **opts).apply(_ctx(lm), v0)
    g = report["per_block"][0]["guard"]
    assert resolved["guard_scales"] == [1.0, 0.5, 0.25] and set(g["kl_by_scale"]) == {"1.0", "0.5", "0.25"}
    blocks = lm.adapter.blocks(lm.model)
    for s in (0.5, 0.25):  # each candidate, rebuilt by hand from the neighbours' own and the fused weights
        cand = v0.with_dropped([2])
        for j in full.replaced():
            blk = copy.deepcopy(blocks[j])
            with torch.no_grad():
                for p, q in zip(blk.parameters(), full.overrides[j].parameters()):
                    p.copy_(p + s * (q - p))
            cand.overrides[j] = blk
        assert g["kl_by_scale"][str(s)] == pytest.approx(kl(cand), rel=1e-4)
    assert g["kl_by_scale"]["1.0"] == pytest.approx(kl(full), rel=1e-4)
    best = min([g["kl_removal"], *g["kl_by_scale"].values()])
    assert kl(got) == pytest.approx(best, rel=1e-4)
    assert g["kept"] == ("removal" if best == g["kl_removal"] else "fused")
    with pytest.raises(RecipeError, match="guard_scales"):
        FuseBlocks(blocks=[2], guard_scales=[0.0])
