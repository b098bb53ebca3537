"""Every common decoder family, end to end on a tiny random model: the structural adapter, fused
projection views against the module's own split, every analysis and op, export, plain reload and
KV-cache generation."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from tiny import DENSE_FAMILIES, tiny_model
from workbench.engine.adapters import adapter_for, linear_weight
from workbench.engine.adapters.fused import head_counts
from workbench.engine.errors import UnsupportedArchitecture
from workbench.engine.block_stream import run_block, trace_blocks
from workbench.engine.variant import original_variant, state_fingerprint, view_model

IDS = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_structural_adapter_maps_the_family_and_its_head_is_the_models(family):
    model = tiny_model(family, layers=2)
    a = adapter_for(model)
    lin = a.linears(a.blocks(model)[0])
    assert "o" in lin and "down" in lin and ({"q", "k", "v"} <= set(lin) or "qkv" in lin)
    assert {"up", "gate_up"} & set(lin)
    assert a.final_norm(model) is not None and a.embeddings(model) and a.norms(a.blocks(model)[0])
    trace = trace_blocks(model, a, IDS)
    # the head (Granite's logit scaling, Gemma 2's soft-cap, OPT's projection) is the model's own
    assert torch.equal(a.head(model, trace.output), model(input_ids=IDS).logits.float())
    # the canonical view names every projection once
    assert set(a.canonical_linears(model, a.blocks(model)[0])) >= {"q", "k", "v", "o", "up", "down"}


def _split_by_rows(mod, rows, x, heads, hd):
    w = linear_weight(mod)[rows]  # (n * hd, in)
    b = mod.bias[rows] if getattr(mod, "bias", None) is not None else None
    y = torch.nn.functional.linear(x, w, b)
    return y.view(*x.shape[:2], heads, hd)  # (B, T, n, hd)


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt-neox", "falcon", "falcon-mq", "falcon-mha"])
def test_fused_qkv_views_equal_the_modules_own_split(family, monkeypatch):
    """q/k/v read through the canonical views equal what the attention module itself splits off its fused
    projection (captured inside its forward; positions all 0 so rotary embeddings are the identity)."""
    model = tiny_model(family, layers=1)
    model.config._attn_implementation = "eager"
    a = adapter_for(model)
    blk = a.blocks(model)[0]
    attn = a.attention(blk)
    nh, nkv, hd = head_counts(model.config)
    seen = {}
    fused = a.linears(blk)["qkv"]
    fused.register_forward_pre_hook(lambda m, args: [seen.setdefault("x", args[0]), None][1])
    if family.startswith("falcon") and hasattr(attn, "_split_heads"):  # transformers < 5.25 splits in a method
        split = attn._split_heads

        def capture(fused_qkv):
            q, k, v = split(fused_qkv)
            seen["qkv"] = [t.reshape(*fused_qkv.shape[:2], -1, hd) for t in (q, k, v)]  # (B, T, n, hd)
            return q, k, v

        monkeypatch.setattr(attn, "_split_heads", capture)
    else:
        mod = importlib.import_module(type(attn).__module__)
        eager = mod.eager_attention_forward

        def capture(module, query, key, value, *args, **kwargs):
            seen["qkv"] = [t.transpose(1, 2) for t in (query, key, value)]  # (B, T, n, hd)
            return eager(module, query, key, value, *args, **kwargs)

        monkeypatch.setattr(mod, "eager_attention_forward", capture)
    with torch.no_grad():
        model(input_ids=IDS, position_ids=torch.zeros_like(IDS))
    views = a.canonical_linears(model, blk)
    x = seen["x"]
    q, k, v = seen["qkv"]
    torch.testing.assert_close(_split_by_rows(*views["q"], x, nh, hd), q)
    for got, want in ((_split_by_rows(*views["k"], x, nkv, hd), k), (_split_by_rows(*views["v"], x, nkv, hd), v)):
        if want.shape[2] != nkv:  # Falcon's new layout hands every query head its group's key/value
            got = got.repeat_interleave(nh // nkv, dim=2)
        torch.testing.assert_close(got, want)


def test_fused_gate_up_view_equals_the_mlp():
    model = tiny_model("phi3", layers=1)
    a = adapter_for(model)
    blk = a.blocks(model)[0]
    views = a.canonical_linears(model, blk)
    x = torch.randn(2, 5, 32)
    gate = torch.nn.functional.linear(x, linear_weight(views["gate"][0])[views["gate"][1]])
    up = torch.nn.functional.linear(x, linear_weight(views["up"][0])[views["up"][1]])
    want = a.mlp(blk)(x)
    torch.testing.assert_close(views["down"][0](torch.nn.functional.silu(gate) * up), want)


def test_unknown_decoder_names_what_it_could_not_find():
    model = tiny_model("llama", layers=1)
    blk = model.model.layers[0]
    blk.ffn_block = blk.mlp  # a family that calls its MLP something we do not know
    del blk.mlp
    with pytest.raises(UnsupportedArchitecture, match=r"layer 0: no MLP projections .*up_proj"):
        adapter_for(model)
    bare = torch.nn.Module()
    bare.config = type("C", (), {"model_type": "mamba"})()
    bare.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba': no list of decoder layers"):
        adapter_for(bare)


# ---- end to end -----------------------------------------------------------------------------------
def _naive_without(lm, ids, dropped):
    trace = trace_blocks(lm.model, lm.adapter, ids)
    h = trace.inputs[0]
    for i, blk in enumerate(lm.adapter.blocks(lm.model)):
        if i not in dropped:
            h = run_block(blk, h, trace.calls[i])
    return lm.adapter.head(lm.model, h)


def _greedy(model, ids, n):
    x = ids
    for _ in range(n):
        x = torch.cat([x, model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_family_end_to_end(tiny_lm, family, tmp_path):
    """Every analysis and op on the family, then export, plain reload and KV-cache generation."""
    from transformers import AutoModelForCausalLM

    from workbench.engine.analysis import attention, influence, outliers, sparsity
    from workbench.engine.data import Calibration
    from workbench.engine.export import export_variant
    from workbench.engine.recipe import OpContext, apply_steps, step_from_dict

    lm = tiny_lm(family, layers=3)
    before = state_fingerprint(lm.model)
    v0 = original_variant(3)
    ids = IDS[:, :12]
    # analyses
    scores = influence.all_scores(lm, v0, ids)
    for m in ("mi", "bi", "angular", "ppl"):
        assert all(torch.isfinite(torch.tensor(x)).all() for x in scores[m]["values"] if x is not None), m
    assert len(scores["mi"]["values"]) == 3
    cap, rep = attention.analyze_attention(lm, v0, prompt="The cat sat on the mat.", max_tokens=12)
    assert len(rep["entropy"]) == 3 and rep["pagerank"]["converged"]
    stats = outliers.outlier_stats(lm, v0, ids)
    assert set(stats["modules"]) >= {"attn_out", "mlp_in", "mlp_out"} and len(stats["noop_first"]) == 3
    sens = sparsity.sensitivity(lm, "wanda", 0.5, variant=v0, calib_ids=ids, tokens=32, blocks=[1])
    assert len(sens["kl"]) == len(sens["types"]) and all(x is not None for row in sens["kl"] for x in row)
    # ops: prune, quantize (GPTQ), sparsify (Wanda), fuse
    ctx = OpContext(lm=lm, calibration=Calibration(samples=2, seq_len=16))
    pruned = apply_steps(ctx, v0, [step_from_dict({"op": "prune_blocks", "blocks": [1]})])
    got = view_model(lm.model, lm.adapter, pruned)(input_ids=ids).logits.float()
    torch.testing.assert_close(got, _naive_without(lm, ids, {1}), rtol=1e-5, atol=1e-5)
    steps = [
        step_from_dict({"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "blocks": [0]}),
        step_from_dict({"op": "sparsify", "method": "wanda", "sparsity": 0.5, "blocks": [2]}),
    ]
    v = apply_steps(ctx, pruned, steps)
    w = {n: linear_weight(m) for n, m in lm.adapter.linears(v.overrides[2]).items()}
    assert all(abs((t == 0).float().mean().item() - 0.5) < 0.05 for t in w.values())
    fused = apply_steps(ctx, v0, [step_from_dict({"op": "fuse_blocks", "blocks": [1], "group": 2, "steps": 2,
                                                   "samples": 2, "seq_len": 16, "batch": 2})])
    assert fused.dropped() == [1]
    assert state_fingerprint(lm.model).keys() == before.keys()
    assert all(torch.equal(before[k], t) for k, t in state_fingerprint(lm.model).items())
    # export -> plain reload -> same logits; KV-cache generation equals step-by-step greedy
    for name, var in (("quantized", v), ("fused", fused)):
        out = export_variant(lm, var, tmp_path / name, {"steps": var.steps})
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 2
        back = AutoModelForCausalLM.from_pretrained(out).eval()
        want = view_model(lm.model, lm.adapter, var)(input_ids=ids).logits.float()
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits.float(), want, rtol=1e-4, atol=1e-4)
            prompt = ids[:1, :6]
            gen = back.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
            want_gen = _greedy(back, prompt, 5)[:, : gen.shape[1]]  # generate stops early at an EOS
            assert torch.equal(gen, want_gen) and (gen.shape[1] == 11 or gen[0, -1] == back.config.eos_token_id)
