"""Mixture-of-experts families (Mixtral, Qwen3-MoE): block-level analyses and pruning, per-expert
quantization from the tokens routed to each expert (RTN below 16 tokens, said), router untouched;
fusion and the compressed-tensors export refuse clearly."""

from __future__ import annotations

import pytest
import torch

from tiny import MOE_FAMILIES
from workbench.engine.adapters.experts import MIN_ROUTED_TOKENS
from workbench.engine.data import Calibration
from workbench.engine.errors import ExportError, RecipeError
from workbench.engine.block_stream import run_block, trace_blocks
from workbench.engine.ops import gptq as solver
from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
from workbench.engine.variant import original_variant, state_fingerprint, view_model

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_block_analyses_prune_export_and_generation(tiny_lm, family, tmp_path):
    from transformers import AutoModelForCausalLM

    from workbench.engine.analysis import influence
    from workbench.engine.export import export_variant

    lm = tiny_lm(family, layers=3)
    a = lm.adapter
    assert a.is_moe and a.experts(a.blocks(lm.model)[0]).gate_up_proj.dim() == 3 and a.router(a.blocks(lm.model)[0])
    scores = influence.all_scores(lm, original_variant(3), IDS)
    for m in ("mi", "bi", "angular", "ppl"):
        assert len(scores[m]["values"]) == 3
    v = original_variant(3).with_dropped([1])
    got = view_model(lm.model, a, v)(input_ids=IDS).logits.float()
    trace = trace_blocks(lm.model, a, IDS)  # by hand: blocks 0 and 2 only
    h = run_block(a.blocks(lm.model)[2], run_block(a.blocks(lm.model)[0], trace.inputs[0], trace.calls[0]), trace.calls[2])
    torch.testing.assert_close(got, a.head(lm.model, h), rtol=1e-5, atol=1e-5)
    out = export_variant(lm, v, tmp_path / "exp", {"steps": v.steps})
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits.float(), got, rtol=1e-4, atol=1e-4)
        prompt = IDS[:1, :6]
        gen = back.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                            do_sample=False, pad_token_id=0)
        x = prompt
        for _ in range(gen.shape[1] - prompt.shape[1]):
            x = torch.cat([x, back(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(gen, x)


def _routed_by_hand(router_w: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """(N, top_k) experts per token from the router's weight alone: softmax then top-k."""
    return torch.topk(torch.softmax(x.float() @ router_w.float().T, -1), top_k, dim=-1).indices


def _experts_input_routed_by_hand(lm, block, orig, ids):
    """(the experts' input (N, H) when block 0 `block` runs on `ids`, (N, top_k) experts per token routed
    by hand from the original block's router)."""
    a, seen = lm.adapter, {}
    handle = a.experts(block).register_forward_pre_hook(lambda m, args: [seen.setdefault("x", args[0]), None][1])
    trace = trace_blocks(lm.model, a, ids)
    with torch.no_grad():
        run_block(block, trace.inputs[0], trace.calls[0])
    handle.remove()
    x = seen["x"].float()
    return x, _routed_by_hand(a.router(orig).weight, x, lm.model.config.num_experts_per_tok)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("samples,seq_len", [(1, 12), (4, 32)])
def test_each_expert_is_quantized_from_its_routed_tokens(tiny_lm, family, samples, seq_len):
    lm = tiny_lm(family, layers=2)
    a = lm.adapter
    before = state_fingerprint(lm.model)
    ctx = OpContext(lm=lm, calibration=Calibration(samples=samples, seq_len=seq_len))
    step = step_from_dict({"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "blocks": [0]})
    v = apply_steps(ctx, original_variant(2), [step])
    q_block, orig = v.overrides[0], a.blocks(lm.model)[0]
    rep = v.reports[-1]["blocks"]["0"]
    # reference: the experts' input in the quantized block (its attention quantized first), routed by hand
    ex_q = a.experts(q_block)
    x, top = _experts_input_routed_by_hand(lm, q_block, orig, ctx.calib_ids())
    scheme = step.scheme()
    ex_o = a.experts(orig)
    methods = set()
    for e in range(ex_o.gate_up_proj.shape[0]):
        xe = x[(top == e).any(-1)]
        entry = rep["experts"][str(e)]
        assert entry["routed_tokens"] == xe.shape[0]
        W = ex_o.gate_up_proj[e].float()
        if xe.shape[0] >= MIN_ROUTED_TOKENS:
            H = xe.T @ xe / xe.shape[0]
            r = solver.rtn(W, scheme, hessian=H)
            want = solver.gptq(W, H, scheme, grid=(r.scale, r.zero)).weight
            assert entry["method"] == "gptq" and "note" not in entry
        else:
            want = solver.rtn(W, scheme).weight
            assert entry["method"] == "rtn" and "RTN instead of gptq" in entry["note"]
            assert entry["note"] in rep["notes"]
        methods.add(entry["method"])
        torch.testing.assert_close(ex_q.gate_up_proj[e].float(), want, rtol=1e-4, atol=1e-4)
    assert methods == ({"rtn"} if samples == 1 else {"gptq"} | methods)  # 12 tokens: no expert can reach 16
    # the router and the original model are untouched
    assert torch.equal(a.router(q_block).weight, a.router(orig).weight)
    assert all(torch.equal(before[k], t) for k, t in state_fingerprint(lm.model).items())


def test_moe_fusion_and_compressed_tensors_export_refuse_clearly(tiny_lm, tmp_path):
    from workbench.engine.export_ct import export_compressed

    lm = tiny_lm("mixtral", layers=3)
    ctx = OpContext(lm=lm, calibration=Calibration(samples=1, seq_len=16))
    with pytest.raises(RecipeError, match="mixtures of experts, which fusion does not handle"):
        apply_steps(ctx, original_variant(3), [step_from_dict({"op": "fuse_blocks", "blocks": [1]})])
    q = apply_steps(ctx, original_variant(3), [step_from_dict({"op": "quantize", "method": "rtn", "group_size": 32,
                                                              "blocks": [0]})])
    # RTN (no calibration) reaches every expert slice too, each on its own grid; the router is kept
    qe, oe = lm.adapter.experts(q.overrides[0]), lm.adapter.experts(lm.adapter.blocks(lm.model)[0])
    scheme = solver.Scheme(bits=4, group_size=32, sym=False, act_order=None)
    for name in ("gate_up_proj", "down_proj"):
        for e in range(getattr(oe, name).shape[0]):
            torch.testing.assert_close(getattr(qe, name)[e], solver.rtn(getattr(oe, name)[e], scheme).weight)
    assert not torch.equal(qe.down_proj, oe.down_proj)
    assert torch.equal(lm.adapter.router(q.overrides[0]).weight, lm.adapter.router(lm.adapter.blocks(lm.model)[0]).weight)
    with pytest.raises(ExportError, match="does not write mixture-of-experts"):
        export_compressed(lm, q, tmp_path / "ct", {})


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("samples,seq_len", [(1, 12), (4, 32)])
def test_sparsify_prunes_each_experts_slice_from_its_routed_tokens(tiny_lm, family, samples, seq_len, tmp_path):
    """Wanda on an MoE block: each expert's gate_up / down slice at the requested sparsity per row, the
    mask from |W| * ||X_e|| with X_e the tokens the router sends to expert e (routed by hand here), down's
    inputs act(gate) * up of those tokens; too few routed tokens: magnitude, said; router untouched."""
    from transformers import AutoModelForCausalLM

    from workbench.engine.export import export_variant

    lm = tiny_lm(family, layers=2)
    a = lm.adapter
    before = state_fingerprint(lm.model)
    ctx = OpContext(lm=lm, calibration=Calibration(samples=samples, seq_len=seq_len))
    step = step_from_dict({"op": "sparsify", "method": "wanda", "sparsity": 0.5, "blocks": [0]})
    v = apply_steps(ctx, original_variant(2), [step])
    rep = v.reports[-1]
    s_block, orig = v.overrides[0], a.blocks(lm.model)[0]
    ex_o = a.experts(orig)
    x, top = _experts_input_routed_by_hand(lm, orig, orig, ctx.calib_ids())
    ex_s = a.experts(s_block)
    fell_back = 0
    for e in range(ex_o.gate_up_proj.shape[0]):
        xe = x[(top == e).any(-1)]
        gate, up = (xe @ ex_o.gate_up_proj[e].float().T).chunk(2, dim=-1)
        inputs = {"gate_up_proj": xe, "down_proj": ex_o.act_fn(gate) * up}
        for param, xin in inputs.items():
            W = getattr(ex_o, param)[e].float()
            if xe.shape[0] >= MIN_ROUTED_TOKENS:
                score = W.abs() * xin.pow(2).sum(0).sqrt()[None, :]
            else:
                score = W.abs()
                fell_back += 1
                assert any(f"expert {e} {param}: {xe.shape[0]} routed" in n for n in rep["notes"])
            want = torch.ones_like(W, dtype=torch.bool)  # naive: per row, zero the half with the lowest scores
            for r in range(W.shape[0]):
                want[r, torch.argsort(score[r], stable=True)[: W.shape[1] // 2]] = False
            got = getattr(ex_s, param)[e].float()
            assert torch.equal(got != 0, want & (W != 0))
            torch.testing.assert_close(got[want], W[want])
    assert fell_back == (2 * ex_o.gate_up_proj.shape[0] if samples == 1 else fell_back)  # 12 tokens: all fall back
    assert rep["by_type"]["experts.gate_up_proj"] == pytest.approx(0.5) and rep["by_type"]["experts.down_proj"] == pytest.approx(0.5)
    assert torch.equal(a.router(s_block).weight, a.router(orig).weight)
    assert all(torch.equal(before[k], t) for k, t in state_fingerprint(lm.model).items())
    out = export_variant(lm, v, tmp_path / "sp", {"steps": v.steps})  # plain transformers reloads it
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(back(input_ids=IDS).logits.float(), view_model(lm.model, a, v)(input_ids=IDS).logits.float(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["2:4"])
def test_sparsify_nm_and_magnitude_reach_the_experts(tiny_lm, pattern):
    lm = tiny_lm("mixtral", layers=2)
    a = lm.adapter
    ctx = OpContext(lm=lm, calibration=Calibration(samples=1, seq_len=12))
    v = apply_steps(ctx, original_variant(2), [step_from_dict({"op": "sparsify", "method": "magnitude",
                                                                "pattern": pattern, "blocks": [1]})])
    ex_s, ex_o = a.experts(v.overrides[1]), a.experts(a.blocks(lm.model)[1])
    for param in ("gate_up_proj", "down_proj"):
        W, got = getattr(ex_o, param).float(), getattr(ex_s, param).float()
        groups = (got != 0).reshape(-1, 4).sum(-1)
        assert bool((groups <= 2).all())  # 2 kept of every 4 along the input
        keep = W.abs().reshape(-1, 4).topk(2, dim=-1).indices  # by hand: the two largest of each group
        want = torch.zeros_like(groups.new_zeros(W.numel() // 4, 4), dtype=torch.bool).scatter_(1, keep, True)
        assert torch.equal((got != 0).reshape(-1, 4), want & (W != 0).reshape(-1, 4))
