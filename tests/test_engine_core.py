"""Engine core: adapters, trace replay, variants, cached evaluation, recipe, export round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tiny import CAUSAL_FAMILIES
from workbench.engine import evaluate as ev
from workbench.engine.adapters import adapter_for, linear_weight
from workbench.engine.errors import BlockIndexError, ExportError, RecipeError, UnsupportedArchitecture
from workbench.engine.export import export_variant
from workbench.engine.block_stream import run_block, trace_blocks
from workbench.engine.recipe import OpContext, Recipe, apply_steps, step_from_dict, variant_recipe
from workbench.engine.variant import original_variant, state_fingerprint, view_model
from workbench.engine.data import Calibration

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _naive_logits_without(model, adapter, ids, dropped):
    """Independent reference: run the blocks by hand with the model's own forward hooks bypassed."""
    trace = trace_blocks(model, adapter, ids)
    h = trace.inputs[0]
    for i, blk in enumerate(adapter.blocks(model)):
        if i not in dropped:
            h = run_block(blk, h, trace.calls[i])
    return adapter.head(model, h)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_adapter_finds_every_canonical_module(tiny_lm, family):
    lm = tiny_lm(family)
    a = lm.adapter
    blk = a.blocks(lm.model)[0]
    lin = a.linears(blk)
    assert set(lin) >= ({"o", "up", "down"}), lin.keys()
    for m in lin.values():
        assert linear_weight(m).dim() == 2
    assert a.final_norm(lm.model) is not None and a.lm_head(lm.model) is not None
    assert a.embeddings(lm.model)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_identity_variant_and_head_match_model(tiny_lm, family):
    lm = tiny_lm(family)
    ref = lm.model(input_ids=IDS).logits
    v = original_variant(lm.num_blocks)
    assert view_model(lm.model, lm.adapter, v) is lm.model
    trace = trace_blocks(lm.model, lm.adapter, IDS)
    out = ev.run_from(lm, v, trace, 0)
    assert torch.equal(lm.adapter.head(lm.model, out), ref.float())


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_dropped_variant_view_equals_naive_and_original_untouched(tiny_lm, family):
    lm = tiny_lm(family)
    before = state_fingerprint(lm.model)
    v = original_variant(lm.num_blocks).with_dropped([1, 2])
    got = view_model(lm.model, lm.adapter, v)(input_ids=IDS).logits.float()
    want = _naive_logits_without(lm.model, lm.adapter, IDS, {1, 2})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = state_fingerprint(lm.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the original still has all its blocks and its config
    assert lm.num_blocks == 4 and len(lm.adapter.blocks(lm.model)) == 4


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_kv_cache_generation_on_variant_matches_no_cache(tiny_lm, family):
    lm = tiny_lm(family)
    vm = view_model(lm.model, lm.adapter, original_variant(4).with_dropped([0, 2]))
    prompt = IDS[:1, :8]
    out = vm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    x = prompt
    for _ in range(6):
        x = torch.cat([x, vm(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)


def test_variant_shares_unchanged_tensors(tiny_lm):
    lm = tiny_lm("llama")
    v = original_variant(4).with_dropped([1])
    vm = view_model(lm.model, lm.adapter, v)
    orig_ptrs = {p.data_ptr() for p in lm.model.parameters()}
    assert all(p.data_ptr() in orig_ptrs for p in vm.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_quick_eval_equals_full_computation(tiny_lm, family, monkeypatch):
    lm = tiny_lm(family)
    ids = IDS.clone()
    monkeypatch.setattr(ev.data, "quick_ids", lambda tok, source="default": ids)
    v = original_variant(4).with_dropped([2])
    quick = ev.quick_eval(lm, v)
    # Independent: full forwards of both models, fp32 reference distribution.
    ref = torch.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1)
    var = torch.log_softmax(view_model(lm.model, lm.adapter, v)(input_ids=ids).logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - var)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == var.argmax(-1)).float().mean().item()
    nll = -var.gather(-1, ids[:, 1:, None]).mean().item()
    assert quick["kl"] == pytest.approx(kl, rel=2e-3, abs=2e-3)
    assert quick["top1"] == pytest.approx(top1, abs=1.0 / ids[:, 1:].numel())
    assert quick["nll"] == pytest.approx(nll, rel=1e-4)
    ident = ev.quick_eval(lm, original_variant(4))
    assert ident["kl"] == 0.0 and ident["top1"] == 1.0


def test_size_counts_dropped_blocks(tiny_lm):
    lm = tiny_lm("llama")
    full = ev.size_of(lm, original_variant(4))
    assert full["parameters"] == sum(p.numel() for p in lm.model.parameters())
    one = ev.size_of(lm, original_variant(4).with_dropped([3]))
    blk = sum(p.numel() for p in lm.adapter.blocks(lm.model)[3].parameters())
    assert full["parameters"] - one["parameters"] == blk


def test_bad_block_indices_and_pruning_everything(tiny_lm):
    v = original_variant(4)
    with pytest.raises(BlockIndexError, match="out of range"):
        v.with_dropped([4])
    with pytest.raises(BlockIndexError, match="every block"):
        v.with_dropped([0, 1, 2, 3])


def test_recipe_validation_messages():
    with pytest.raises(RecipeError, match="unknown op 'explode'"):
        step_from_dict({"op": "explode"})
    with pytest.raises(RecipeError, match="blocks"):
        step_from_dict({"op": "prune_blocks", "blocks": "3"})
    with pytest.raises(RecipeError, match="unknown field"):
        step_from_dict({"op": "prune_blocks", "blocks": [1], "colour": "red"})
    with pytest.raises(RecipeError, match="samples"):
        Recipe.from_dict({"calibration": {"samples": 0}})
    r = Recipe.from_dict({"model": "default", "steps": [{"op": "prune_blocks", "blocks": [2, 1]}]})
    assert Recipe.from_dict(json.loads(r.to_json())).to_dict() == r.to_dict()


def test_unknown_architecture_is_a_typed_error():
    class Cfg:
        model_type = "mamba"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(UnsupportedArchitecture, match="mamba"):
        adapter_for(M())


def test_steps_compose_and_record_resolution(tiny_lm):
    lm = tiny_lm("llama")
    ctx = OpContext(lm=lm)
    steps = [step_from_dict({"op": "prune_blocks", "blocks": [1]}), step_from_dict({"op": "prune_blocks", "blocks": [3]})]
    v = apply_steps(ctx, original_variant(4), steps)
    assert v.dropped() == [1, 3] and len(v.reports) == 2
    rec = variant_recipe(lm, v, Calibration())
    assert [s["blocks"] for s in rec["steps"]] == [[1], [3]]


def _save_tiny_tokenizer(path: Path):
    (path / "byte_tokenizer.txt").write_text("bytes\n")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_export_reload_in_fresh_process_same_logits_and_kv_generation(tiny_lm, family, tmp_path):
    lm = tiny_lm(family)
    v = original_variant(4).with_dropped([1])
    out = export_variant(lm, v, tmp_path / "exp", {"steps": v.steps}, metrics={"quick_kl": 0.5})
    assert (out / "recipe.json").is_file() and (out / "README.md").is_file()
    assert any(out.glob("*.safetensors")) and not any(out.glob("*.bin"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 3
    ids = IDS[:1, :10]
    want = view_model(lm.model, lm.adapter, v)(input_ids=ids).logits.float()
    gen_want = view_model(lm.model, lm.adapter, v).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        ids = torch.load({str(tmp_path / 'ids.pt')!r})["ids"]
        with torch.no_grad():
            logits = m(input_ids=ids).logits.float()
            gen = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        torch.save({{"logits": logits, "gen": gen}}, {str(tmp_path / 'got.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    got = torch.load(tmp_path / "got.pt")
    torch.testing.assert_close(got["logits"], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got["gen"], gen_want)


def test_export_refuses_to_overwrite_and_is_atomic(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    target = tmp_path / "exp"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    v = original_variant(4).with_dropped([0])
    with pytest.raises(ExportError, match="already exists"):
        export_variant(lm, v, target, {})
    assert (target / "keep.txt").read_text() == "mine"
    # a folder that is not an earlier export of ours is never replaced, even when asked to overwrite
    with pytest.raises(ExportError, match="not an earlier export"):
        export_variant(lm, v, target, {}, overwrite=True)
    assert (target / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    export_variant(lm, v, ours, {})
    (ours / "stale.txt").write_text("left by an earlier export")
    export_variant(lm, v, ours, {}, overwrite=True)  # an earlier export of ours is replaced whole
    assert not (ours / "stale.txt").exists() and (ours / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_engine_never_imports_gradio_or_upper_layers():
    engine = Path(__file__).resolve().parents[1] / "engine"
    bad = []
    for f in engine.rglob("*.py"):
        for line in f.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")) and any(
                w in s.split("#")[0] for w in ("gradio", "workbench.panels", "from workbench", "import workbench", "panels")
            ):
                bad.append(f"{f.name}: {s}")
    assert not bad, bad
    # and at run time: importing every engine module pulls in no gradio
    code = (
        "import sys, pkgutil, importlib, workbench.engine as e\n"
        "for m in pkgutil.walk_packages(e.__path__, 'workbench.engine.'): importlib.import_module(m.name)\n"
        "assert 'gradio' not in sys.modules, 'gradio imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_slice_call_cuts_only_per_sample_tensors():
    from workbench.engine.block_stream import BlockCall, slice_call

    mask = torch.zeros(4, 1, 6, 6)
    pos = torch.arange(6)[None]  # (1, T): shared by the batch
    cache_pos = torch.arange(6)  # (T,): must not be cut even though T > rows
    rope = (torch.ones(1, 6, 8), torch.ones(1, 6, 8))
    call = BlockCall((None, mask), {"position_ids": pos, "cache_position": cache_pos, "position_embeddings": rope})
    part = slice_call(call, slice(1, 3), 4)
    assert part.args[1].shape == (2, 1, 6, 6)
    assert part.kwargs["position_ids"] is pos and part.kwargs["cache_position"] is cache_pos
    assert part.kwargs["position_embeddings"][0].shape == (1, 6, 8)
    assert slice_call(call, slice(None), 4) is call


def test_variant_only_perplexity_equals_full_eval_and_a_hand_sum(tiny_lm, tmp_path):
    from workbench.engine.data import evaluation_ids

    lm = tiny_lm("llama", layers=3)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Note {i}. " + "the quick brown fox jumps over the lazy dog. " * 5 for i in range(40)))
    v = original_variant(3).with_dropped([1])
    full = ev.full_eval(lm, v, source=str(text), seq_len=32, max_tokens=200)
    ids = evaluation_ids(lm.tokenizer, str(text), 32, 200)
    model = view_model(lm.model, lm.adapter, v)
    ppl, n = ev.perplexity(model, ids, batch_size=3)
    assert n == full["tokens"] and abs(ppl - full["ppl"]) / full["ppl"] < 1e-5
    with torch.no_grad():  # by hand: one window at a time, probabilities through softmax
        nll = 0.0
        for row in ids:
            p = torch.softmax(model(input_ids=row[None]).logits[0, :-1].double(), -1)
            nll -= p[torch.arange(len(row) - 1), row[1:]].log().sum().item()
    assert abs(ppl - float(torch.exp(torch.tensor(nll / n)))) / ppl < 1e-5
