"""Exports: dense shards in the weights' dtype, tied embeddings, modes, bytes on disk, default format per
variant kind; GGUF read back by transformers and by the gguf package; GGUF-exact quantization schemes
bit for bit; emitted recipes for other tools; llama.cpp itself (slow, where the build exists)."""

from __future__ import annotations

import contextlib
import json
import os
import stat

import pytest
import torch

from workbench.engine.errors import ExportError
from workbench.engine.export import default_format, export_any, export_variant
from workbench.engine.export_files import ShardWriter, dense_weight_bytes
from workbench.engine.variant import original_variant, view_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _reload(folder, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval()


def _quantized(tiny_lm, family="llama", blocks=(0, 2), **scheme):
    from workbench.engine.data import Calibration
    from workbench.engine.recipe import OpContext, apply_steps, step_from_dict

    lm = tiny_lm(family)
    ctx = OpContext(lm=lm, calibration=Calibration(samples=4, seq_len=32))
    step = {"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "sym": True, "blocks": list(blocks)}
    step.update(scheme)
    return lm, apply_steps(ctx, original_variant(4), [step_from_dict(step)])




# ---- dense ------------------------------------------------------------------------------------------
def test_dense_export_shards_with_index_and_reloads_same_logits(tiny_lm, tmp_path):
    lm = tiny_lm("mistral")
    v = original_variant(4).with_dropped([2])
    out = export_variant(lm, v, tmp_path / "d", {"steps": v.steps}, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    from safetensors import safe_open

    for p in shards:  # every shard but one-tensor shards stays within the limit (header aside)
        with safe_open(str(p), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        payload = sum(torch.Size(s).numel() * 4 for s in sizes)
        assert payload <= 20_000 or len(sizes) == 1
    assert index["metadata"]["total_size"] == dense_weight_bytes(view_model(lm.model, lm.adapter, v))
    got = _reload(out)
    assert got.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(got), _logits(view_model(lm.model, lm.adapter, v)), rtol=0, atol=0)


def test_shard_writer_holds_at_most_one_shard(tmp_path):
    w = ShardWriter(tmp_path, max_shard_bytes=1000)
    seen = []
    for k in range(6):
        w.add(f"t{k}", torch.full((100,), float(k)))  # 400 bytes each: two per shard
        seen.append(w._pending_bytes)
    assert max(seen) <= 1000
    names = w.close()
    assert names[-1] == "model.safetensors.index.json" and len(names) == 4
    from safetensors.torch import load_file

    t = {}
    for n in names[:-1]:
        t.update(load_file(str(tmp_path / n)))
    assert sorted(t) == [f"t{k}" for k in range(6)] and all(float(t[f"t{k}"][0]) == k for k in range(6))


def test_dense_export_keeps_the_weights_dtype(tiny_lm, tmp_path):
    lm = tiny_lm("qwen2")
    lm.model.to(torch.bfloat16)
    v = original_variant(4).with_dropped([1])
    out = export_variant(lm, v, tmp_path / "bf", {})
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    got = _reload(out, dtype=torch.bfloat16)
    want = view_model(lm.model, lm.adapter, v).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in got.state_dict().items() if k in want)  # bit for bit
    # (logits differ by bf16 noise: `.to(bf16)` above also rounded the rotary buffer a fresh load keeps fp32)


def test_tied_embeddings_reload_tied_with_lm_head_present(tiny_lm, tmp_path):
    lm = tiny_lm("llama")  # the tiny llama ties its embeddings, as SmolLM2 does
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    out = export_variant(lm, original_variant(4).with_dropped([0]), tmp_path / "t", {})
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # written once
    got = _reload(out)
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(got.lm_head.weight, lm.model.lm_head.weight)


def test_untied_model_writes_both_and_original_is_untouched(tiny_lm, tmp_path):
    lm = tiny_lm("mistral")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg_before = lm.model.config.to_dict()
    out = export_variant(lm, original_variant(4), tmp_path / "u", {})
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    assert lm.model.config.to_dict() == cfg_before
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("mask,fmode,dmode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_export_modes_follow_the_umask(tiny_lm, tmp_path, mask, fmode, dmode):
    lm = tiny_lm("llama")
    with umask(mask):
        out = export_variant(lm, original_variant(4).with_dropped([3]), tmp_path / "m", {})
    assert stat.S_IMODE(out.stat().st_mode) == dmode
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {fmode}


def test_metrics_list_bytes_on_disk_per_file(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    out = export_variant(lm, original_variant(4).with_dropped([3]), tmp_path / "b", {}, metrics={"quick_kl": 0.1})
    doc = json.loads((out / "workbench_metrics.json").read_text())
    on_disk = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    on_disk.pop("workbench_metrics.json")
    on_disk.pop(".workbench-export")  # the atomic writer's marker, written last
    assert doc["files_bytes"] == on_disk and doc["bytes_on_disk"] == sum(on_disk.values())
    assert doc["quick_kl"] == 0.1 and doc["format"] == "dense"
    card = (out / "README.md").read_text()
    assert "model.safetensors" in card and "from_pretrained" in card and "gguf" in card


# ---- the default format -----------------------------------------------------------------------------
def test_default_format_follows_the_variant_kind(tiny_lm, tmp_path):
    lm, q = _quantized(tiny_lm)
    assert default_format(lm, q) == "compressed-tensors"
    assert default_format(lm, original_variant(4).with_dropped([1])) == "dense"
    out, fmt = export_any(lm, q, tmp_path / "q", {})
    assert fmt == "compressed-tensors"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    lm2 = _tok_lm("llama")
    g = _steps(lm2, original_variant(4), [{"op": "quantize", "method": "rtn", "gguf": "Q4_1", "blocks": [1]}])
    assert default_format(lm2, g) == "gguf"  # codes solved for a GGUF format go into a GGUF file
    with pytest.raises(ExportError, match="unknown export format"):
        export_any(lm, q, tmp_path / "x", {}, fmt="onnx")


def test_store_export_default_format_per_variant_kind(tiny_lm, tmp_path):
    from workbench.store import Store

    store = Store(default_model="tiny-llama", device="cpu")
    store.register_model(tiny_lm("llama"), "tiny-llama")
    sid = store.new_session()
    store.attach(sid)
    store.set_calibration(sid, 4, 32)
    store.apply_step(sid, {"op": "prune_blocks", "blocks": [1]})
    out = store.export(sid, str(tmp_path / "p"))
    assert json.loads((out / "workbench_metrics.json").read_text())["format"] == "dense"
    store.apply_step(sid, {"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "sym": True, "blocks": [0]})
    out = store.export(sid, str(tmp_path / "q"))
    assert json.loads((out / "workbench_metrics.json").read_text())["format"] == "compressed-tensors"
    out = store.export(sid, str(tmp_path / "qd"), fmt="dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_cli_compress_default_format_and_flag_errors(tiny_lm, tmp_path, monkeypatch, capsys):
    from workbench import cli

    lm = tiny_lm("llama")
    monkeypatch.setattr("workbench.engine.loading.load_model", lambda *a, **k: lm)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"calibration": {"source": "default", "samples": 4, "seq_len": 32},
                                  "steps": [{"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32,
                                             "sym": True, "blocks": [1]}]}))
    assert cli.main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"]["format"] == "compressed-tensors"
    code = cli.main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "o2"), "--format", "dense",
                     "--gguf-type", "Q4_0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --gguf-type applies to --format gguf only") and "Traceback" not in err


def test_cli_compress_gguf(tmp_path, monkeypatch, capsys):
    import gguf

    from workbench import cli

    lm = _tok_lm("qwen2")
    monkeypatch.setattr("workbench.engine.loading.load_model", lambda *a, **k: lm)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": [{"op": "prune_blocks", "blocks": [2]}]}))
    assert cli.main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "g"), "--gguf-type", "q8_0",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"]["format"] == "gguf"
    r = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    assert {t.name: t.tensor_type for t in r.tensors}["blk.1.attn_v.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert "blk.3.attn_v.weight" not in {t.name for t in r.tensors}


# ---- GGUF ---------------------------------------------------------------------------------------------
GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


def _tok_lm(family, layers=4, seed=0):
    from tiny import tiny_bpe_tokenizer, tiny_model
    from workbench.engine.loading import wrap_model

    return wrap_model(tiny_model(family, layers, seed), tiny_bpe_tokenizer(), spec=f"tiny-{family}", device="cpu")


def _gguf_reload(folder, **kw):
    return _reload(folder, gguf_file="model.gguf", dtype=torch.float32, **kw)


def _steps(lm, variant, steps):
    from workbench.engine.data import Calibration
    from workbench.engine.recipe import OpContext, apply_steps, step_from_dict

    ctx = OpContext(lm=lm, calibration=Calibration(samples=4, seq_len=32))
    return apply_steps(ctx, variant, [step_from_dict(s) for s in steps])


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_f32_of_a_pruned_variant_reloads_to_the_same_logits(family, tmp_path):
    from workbench.engine.export_gguf import export_gguf

    lm = _tok_lm(family)
    v = original_variant(4).with_dropped([1])
    out = export_gguf(lm, v, tmp_path / "g", {"steps": v.steps}, tensor_type="F32")
    kw = {}
    if family == "qwen3":  # transformers' GGUF reader ignores qwen3.attention.key_length (llama.cpp reads it)
        import gguf  # and defaults head_dim to 128, Qwen3's own; the tiny model's is 8: check what we wrote

        fields = gguf.GGUFReader(str(out / "model.gguf")).fields
        head_dim = int(fields["qwen3.attention.key_length"].parts[-1][0])
        assert head_dim == lm.model.config.head_dim
        kw["head_dim"] = head_dim
    got = _gguf_reload(out, **kw)
    assert got.config.num_hidden_layers == 3
    # exact: F32 tensors, q/k permuted by us and back by transformers, Gemma norms 1 + w and back
    torch.testing.assert_close(_logits(got), _logits(view_model(lm.model, lm.adapter, v)), rtol=0, atol=0)


@pytest.mark.parametrize("typ,dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_gguf_half_types_hold_the_weights_rounded_to_that_dtype(typ, dtype, tmp_path):
    from workbench.engine.export_gguf import export_gguf

    lm = _tok_lm("qwen2")
    v = original_variant(4).with_dropped([0])
    out = export_gguf(lm, v, tmp_path / "h", {}, tensor_type=typ)
    got = _gguf_reload(out).state_dict()
    want = view_model(lm.model, lm.adapter, v).state_dict()
    for k, t in want.items():
        ref = t if t.dim() < 2 else t.to(dtype).float()  # norms and biases stay F32
        assert torch.equal(got[k], ref), k


def test_llama_qk_permutation_is_llama_cpps():
    from workbench.engine.export_gguf import qk_permutation

    n_head, hd, cols = 4, 8, 5
    w = torch.randn(n_head * hd, cols)
    # convert_hf_to_gguf.py's permute, written out: (n_head, 2, hd/2, cols) -> swap axes 1, 2
    ref = w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2).reshape(n_head * hd, cols)
    assert torch.equal(w[qk_permutation(n_head * hd, n_head)], ref)


def _gguf_tensors(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("scheme", ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"])
def test_gguf_exact_schemes_export_their_own_codes_bit_for_bit(scheme, tmp_path):
    import gguf

    from workbench.engine.export_gguf import export_gguf, qk_permutation

    lm = _tok_lm("llama")
    v = _steps(lm, original_variant(4), [{"op": "quantize", "method": "gptq" if scheme == "Q4_0" else "rtn",
                                          "gguf": scheme, "blocks": [0, 2]}])
    assert v.steps[0]["gguf"] == scheme and v.steps[0]["group_size"] == 32
    out = export_gguf(lm, v, tmp_path / "q", {"steps": v.steps})  # no type asked: the blocks' own
    view = view_model(lm.model, lm.adapter, v)
    # 1. transformers' reader (gguf's numpy dequantizer, q/k un-permuted) gives the in-app weights exactly
    got = _gguf_reload(out).state_dict()
    for b in (0, 2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            k = f"model.layers.{b}.{name}.weight"
            assert torch.equal(got[k], view.state_dict()[k]), k
    # 2. gguf's reader: the tensor types and an independent decode of one block
    r, tensors = _gguf_tensors(out / "model.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type == getattr(gguf.GGMLQuantizationType, scheme)
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # not quantized
    t = tensors["blk.0.attn_q.weight"]
    dq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    q = view.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(dq, q[qk_permutation(q.shape[0], 4)])
    assert "bit for bit" in (out / "README.md").read_text()


def test_gguf_exact_scheme_equals_the_formula_by_hand():
    """Q4_1 decode by hand on one group: d q + m with d = fp16 scale and m = fp16(-d z)."""
    from workbench.engine.ops import gptq

    w = torch.linspace(-0.3, 0.9, 32)[None, :]
    res = gptq.rtn(w, gptq.Scheme(bits=4, group_size=32, sym=False, gguf="Q4_1"))
    d = torch.tensor((0.9 + 0.3) / 15).to(torch.float16).float()
    z = torch.round(0.3 / d)
    m = (-(d * z)).to(torch.float16).float()
    q = torch.clamp(torch.round((w - m) / d), 0, 15)
    assert float(res.scale) == float(d) and float(res.zero) == float(z)
    assert torch.equal(res.codes.float(), q) and torch.equal(res.weight, d * q + m)


def test_gguf_requantizes_other_schemes_and_says_so(tmp_path):
    import gguf

    from workbench.engine.export_gguf import export_gguf

    lm = _tok_lm("qwen2")
    v = _steps(lm, original_variant(4), [{"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32,
                                          "sym": False, "blocks": [1]}])
    out = export_gguf(lm, v, tmp_path / "r", {}, tensor_type="Q4_0")
    assert "re-quantized" in (out / "README.md").read_text()
    _, tensors = _gguf_tensors(out / "model.gguf")
    t = tensors["blk.1.ffn_up.weight"]
    w = view_model(lm.model, lm.adapter, v).model.layers[1].mlp.up_proj.weight.detach().numpy()
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)  # the package's own quantizer
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0 and (t.data == ref).all()


def test_gguf_fused_variant_reloads_to_the_same_logits(tmp_path):
    from workbench.engine.export_gguf import export_gguf

    lm = _tok_lm("llama")
    v = _steps(lm, original_variant(4), [{"op": "fuse_blocks", "blocks": [1, 2]}])
    assert v.dropped() and v.replaced()
    out = export_gguf(lm, v, tmp_path / "f", {}, tensor_type="F32")
    torch.testing.assert_close(_logits(_gguf_reload(out)), _logits(view_model(lm.model, lm.adapter, v)),
                               rtol=0, atol=0)


def test_gguf_metadata_and_gemma3_pattern_after_pruning(tmp_path):
    from workbench.engine.export_gguf import export_gguf

    lm = _tok_lm("gemma3", layers=8)
    kinds = lm.model.config.layer_types
    full = kinds.index("full_attention")  # Gemma 3: every 6th block attends globally
    v = original_variant(8).with_dropped([0, 2])
    out = export_gguf(lm, v, tmp_path / "g3", {}, tensor_type="F16")
    r, tensors = _gguf_tensors(out / "model.gguf")

    def field(key):
        f = r.fields[key]
        return [f.parts[i].tolist() for i in f.data]

    assert field("gemma3.block_count") == [[6]]
    pattern = [bool(x[0]) for x in field("gemma3.attention.sliding_window_pattern")]
    assert pattern == [kinds[i] == "sliding_attention" for i in v.kept()] and pattern.count(False) == 1
    assert pattern.index(False) == v.kept().index(full)
    assert {f"blk.{j}.attn_q_norm.weight" for j in range(6)} <= set(tensors) and "blk.6.attn_q.weight" not in tensors
    assert "output.weight" not in tensors  # tied to token_embd
    # Gemma's norms are stored as 1 + w
    w = lm.model.model.layers[1].input_layernorm.weight.detach()
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_norm.weight"].data.copy()), w + 1)


def test_gguf_says_when_a_pruned_gemma3_breaks_llama_cpps_fixed_pattern(tmp_path):
    """llama.cpp hard-codes Gemma 3's pattern (block j global iff j % 6 == 5); the card says which of the
    file's blocks a pruning moved off it, and nothing when the pattern holds."""
    from workbench.engine.export_gguf import export_gguf, gemma3_pattern_notes

    s, f = "sliding_attention", "full_attention"
    assert gemma3_pattern_notes([s] * 5 + [f] + [s] * 3) == []
    note, = gemma3_pattern_notes([s] * 4 + [f] + [s] * 2)  # block 3 of 5:1 dropped: the global one moved up
    assert "blocks [4, 5]" in note
    lm = _tok_lm("gemma3", layers=8)
    assert lm.model.config.layer_types[5] == f
    for drop, moved in (([7], None), ([6, 7], None), ([1], "[4, 5]")):
        out = export_gguf(lm, original_variant(8).with_dropped(drop), tmp_path / f"p{drop}", {}, tensor_type="F16")
        card = (out / "README.md").read_text()
        assert ("llama.cpp's fixed pattern" in card) == (moved is not None), drop
        if moved:
            assert f"blocks {moved}" in card


def test_gguf_tokenizer_and_chat_template_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from workbench.engine.export_gguf import export_gguf

    import transformers as tf
    from tiny import tiny_bpe_tokenizer, tiny_config
    from workbench.engine.loading import wrap_model

    tok0 = tiny_bpe_tokenizer(merges=("h e", "l l", "he ll", "o Ġ"))
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tok0)  # 260: the byte symbols and the merged tokens
    lm = wrap_model(tf.AutoModelForCausalLM.from_config(cfg).eval(), tok0, spec="tiny-llama-bpe", device="cpu")
    out = export_gguf(lm, original_variant(4), tmp_path / "t", {}, tensor_type="F16")
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    text = "Hello, wörld! hello helloo 123 <tab>\t end"
    assert any(i >= 256 for i in lm.tokenizer(text)["input_ids"])  # the merges are used
    assert tok(text)["input_ids"] == lm.tokenizer(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == lm.tokenizer.eos_token_id
    assert tok.chat_template == lm.tokenizer.chat_template


def _spm_lm(style, family, layers=4):
    import transformers as tf
    from tiny import tiny_config, tiny_spm_tokenizer
    from workbench.engine.loading import wrap_model

    tok0 = tiny_spm_tokenizer(style)
    cfg = tiny_config(family, layers)
    cfg.vocab_size = len(tok0)
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().vocab_size = len(tok0)
    torch.manual_seed(0)
    return wrap_model(tf.AutoModelForCausalLM.from_config(cfg).eval(), tok0, spec=f"tiny-{family}-spm",
                      device="cpu")


@pytest.mark.parametrize("style,family", [("llama", "mistral"), ("llama", "llama"), ("gemma", "gemma3")])
def test_gguf_sentencepiece_tokenizer_round_trips(style, family, tmp_path):
    """A SentencePiece-style BPE with byte fallback goes out as llama.cpp's "llama" tokenizer: transformers
    rebuilds it from our GGUF and encodes text with spaces, digits, non-ASCII (byte fallback) and newlines to
    the in-app ids; the token types, scores and flags are what llama.cpp's SPM tokenizer reads."""
    import gguf
    from transformers import AutoTokenizer

    from tiny import SPM_TEXTS
    from workbench.engine.export_gguf import export_gguf

    lm = _spm_lm(style, family)
    v = original_variant(4).with_dropped([2])
    out = export_gguf(lm, v, tmp_path / "s", {}, tensor_type="F32")
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    for text in SPM_TEXTS:
        want = lm.tokenizer(text)["input_ids"]
        assert tok(text)["input_ids"] == want, text
        assert tok.decode(want, skip_special_tokens=True) == lm.tokenizer.decode(want, skip_special_tokens=True)
    assert any(t.startswith("<0x") for t in lm.tokenizer.convert_ids_to_tokens(lm.tokenizer(SPM_TEXTS[3])["input_ids"]))
    assert (tok.bos_token_id, tok.eos_token_id) == (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id)
    assert tok.chat_template == lm.tokenizer.chat_template
    torch.testing.assert_close(_logits(_gguf_reload(out), IDS % len(tok)),
                               _logits(view_model(lm.model, lm.adapter, v), IDS % len(tok)), rtol=1e-5, atol=1e-5)
    # what llama.cpp reads, by hand from the tiny vocabulary
    f = gguf.GGUFReader(str(out / "model.gguf")).fields
    val = lambda k: f[k].contents()  # noqa: E731
    assert val("tokenizer.ggml.model") == "llama"
    vocab = lm.tokenizer.get_vocab()
    types, scores = val("tokenizer.ggml.token_type"), val("tokenizer.ggml.scores")
    T = gguf.TokenType
    assert types[vocab["<unk>"]] == T.UNKNOWN and types[lm.tokenizer.bos_token_id] == T.CONTROL
    assert types[vocab["<0x41>"]] == T.BYTE and types[vocab["\u2581hello"]] == T.NORMAL
    # the merges, every split of a piece into two pieces, in the pieces' order: a piece scores -(its first rank)
    merges = val("tokenizer.ggml.merges")
    assert merges[:5] == ["h e", "l l", "\u2581 h", "ll o", "he llo"]
    assert [scores[vocab[p]] for p in ("he", "ll", "\u2581h", "llo", "hello")] == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert scores[vocab["a"]] == scores[vocab["<0x41>"]] == -(len(merges) + 1)  # no merge makes them
    assert bool(val("tokenizer.ggml.add_space_prefix")) == (style == "llama")
    assert bool(val("tokenizer.ggml.add_bos_token")) and not bool(val("tokenizer.ggml.add_eos_token"))


def test_gguf_writer_holds_one_converted_tensor_at_a_time(monkeypatch, tmp_path):
    """The GGUF writer streams: when it converts a tensor (packs codes, quantizes, permutes), at most the
    one before it is still alive (not yet collected), never the model's worth; counted with weak
    references to every array the converter hands out. The file is still complete and right (the
    logits of its reload)."""
    import gc
    import weakref

    from workbench.engine import export_gguf as eg

    lm = _tok_lm("llama", layers=6)
    v = _steps(lm, original_variant(6).with_dropped([5]), [{"op": "quantize", "method": "rtn", "gguf": "Q8_0",
                                                           "blocks": [0, 1]}])
    real, refs, most = eg._tensor_data, [], []

    def counted(*a, **kw):
        gc.collect()
        most.append(sum(r() is not None for r in refs))  # converted arrays still alive
        out = real(*a, **kw)
        refs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(eg, "_tensor_data", counted)
    out = eg.export_gguf(lm, v, tmp_path / "m", {}, tensor_type="Q8_0")
    n = len(eg.gguf_plan(lm, v, "Q8_0")[0])
    assert len(most) == n > 40 and max(most) <= 1, most
    torch.testing.assert_close(_logits(_gguf_reload(out)), _logits(view_model(lm.model, lm.adapter, v)),
                               rtol=0.1, atol=0.1)  # Q8_0 re-quantized: close, not equal


def test_gguf_size_shown_before_writing_matches_the_file(tmp_path):
    from workbench.engine.export_gguf import estimate_gguf_bytes, export_gguf

    lm = _tok_lm("llama")
    v = _steps(lm, original_variant(4).with_dropped([3]), [{"op": "quantize", "method": "rtn", "gguf": "Q4_0",
                                                           "blocks": [0, 1]}])
    for typ in (None, "Q8_0", "F16"):
        est = estimate_gguf_bytes(lm, v, typ)
        out = export_gguf(lm, v, tmp_path / f"s{typ}", {}, tensor_type=typ)
        size = (out / "model.gguf").stat().st_size
        # the estimate counts the tensor data; the header, vocabulary and alignment padding come on top
        assert est < size < est + 64 * 1024, (typ, est, size)


def test_gguf_refuses_what_it_cannot_write(tiny_lm, tmp_path):
    from workbench.engine.export_gguf import export_gguf

    with pytest.raises(ExportError, match="GGUF export supports"):
        export_gguf(tiny_lm("gpt2"), original_variant(4), tmp_path / "x", {})
    with pytest.raises(ExportError, match="byte-level BPE"):
        export_gguf(tiny_lm("llama"), original_variant(4), tmp_path / "y", {})  # the stand-in byte tokenizer
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    uni = _tok_lm("llama")
    uni.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)])))
    with pytest.raises(ExportError, match="this one is Unigram"):  # llama.cpp's SPM merges, it has no Viterbi
        export_gguf(uni, original_variant(4), tmp_path / "u", {})
    with pytest.raises(ExportError, match="not one of"):
        export_gguf(_tok_lm("llama"), original_variant(4), tmp_path / "z", {}, tensor_type="Q2_K")
    assert not (tmp_path / "y").exists()


def test_quantize_step_gguf_field_validates_and_old_recipes_read_the_same():
    from workbench.engine.errors import RecipeError
    from workbench.engine.recipe import step_from_dict

    s = step_from_dict({"op": "quantize", "gguf": "Q5_1", "bits": 8, "group_size": 128})
    assert (s.bits, s.group_size, s.sym) == (5, 32, False)  # the GGUF format decides
    with pytest.raises(RecipeError, match="'gguf' must be one of"):
        step_from_dict({"op": "quantize", "gguf": "Q2_K"})
    with pytest.raises(RecipeError, match="no g_idx"):
        step_from_dict({"op": "quantize", "gguf": "Q4_0", "act_order": "group"})
    with pytest.raises(RecipeError, match="'bits' must be"):
        step_from_dict({"op": "quantize", "bits": 5})  # 5 bits only as a GGUF format


# ---- sizes before writing, and the Export panel -----------------------------------------------------
def _payload(folder):
    from safetensors import safe_open

    n = 0
    for p in folder.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                n += t.numel() * t.element_size()
    return n


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, False)])
def test_sizes_shown_before_writing_equal_the_bytes_written(bits, sym, tmp_path):
    from workbench.engine.export import estimate_sizes

    lm = _tok_lm("llama")
    v = _steps(lm, original_variant(4).with_dropped([1]), [{"op": "quantize", "method": "rtn", "bits": bits,
                                                           "group_size": 32, "sym": sym, "blocks": [0, 3]}])
    est = {r["format"]: r["bytes"] for r in estimate_sizes(lm, v, "Q4_0")}
    for fmt in ("dense", "compressed-tensors", "gguf"):
        out, _ = export_any(lm, v, tmp_path / fmt, {}, fmt=fmt, gguf_type="Q4_0" if fmt == "gguf" else None)
        if fmt == "gguf":
            size = (out / "model.gguf").stat().st_size
            assert est[fmt] < size < est[fmt] + 64 * 1024  # header and vocabulary on top
        else:
            assert _payload(out) == est[fmt], fmt  # the tensor data exactly; headers aside
            files = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            assert est[fmt] < files < est[fmt] + 64 * 1024


def test_export_panel_shows_sizes_and_writes_the_chosen_format(tmp_path):
    from workbench.panels import export as panel
    from workbench.store import Store

    store = Store(default_model="tiny-bpe", device="cpu")
    store.register_model(_tok_lm("llama"), "tiny-bpe")
    sid = store.new_session()
    store.attach(sid)
    store.set_calibration(sid, 4, 32)
    store.apply_step(sid, {"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "sym": True, "blocks": [0]})
    table = panel.sizes(store, sid, "Q8_0")
    assert "Default for this variant: **compressed-tensors**" in table
    assert all(f"| {f} |" in table for f in ("dense", "compressed-tensors", "gguf")) and "llama.cpp" in table
    assert "{" not in table  # plain words, not JSON
    msg = panel.export(store, sid, str(tmp_path / "g"), False, "gguf", "Q8_0", progress=lambda *a, **k: None)
    assert "as **gguf**" in msg and "llama-cli" in msg and (tmp_path / "g" / "model.gguf").is_file()
    msg = panel.export(store, sid, str(tmp_path / "d"), False, panel.DEFAULT, "default", progress=lambda *a, **k: None)
    assert "as **compressed-tensors**" in msg
    with pytest.raises(ExportError, match="gguf format only"):
        panel.export(store, sid, str(tmp_path / "x"), False, "dense", "Q4_0", progress=lambda *a, **k: None)


# ---- recipes for other tools ------------------------------------------------------------------------
def test_emit_llm_compressor_recipe_targets_the_quantized_blocks():
    import re

    import yaml

    from workbench.engine.emit import emit

    recipe = {"steps": [{"op": "prune_blocks", "blocks": [1]},
                        {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                         "act_order": "weight", "blocks": [2, 3], "damp": 0.01, "observer": "mse"},
                        {"op": "quantize", "method": "rtn", "bits": 8, "group_size": -1, "sym": False,
                         "act_order": None, "blocks": [0]},
                        {"op": "fuse_blocks", "blocks": [4, 5]}]}
    name, text = emit("llm-compressor", recipe, 8, dropped=[1, 5])
    assert name.endswith(".yaml") and "cannot reproduce step 4: fusion" in text
    doc = yaml.safe_load(text)
    gptq = doc["quant_stage_0"]["quant_modifiers"]["GPTQModifier"]
    w = gptq["config_groups"]["group_0"]["weights"]
    assert w == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                 "actorder": "weight", "observer": "mse"}
    pattern = gptq["config_groups"]["group_0"]["targets"][0].removeprefix("re:")
    names = [f"model.layers.{i}.{m}" for i in range(6) for m in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm")]
    # original blocks 2 and 3 are blocks 1 and 2 once block 1 is gone
    assert [n for n in names if re.search(pattern, n)] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    rtn = doc["quant_stage_1"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]["group_0"]
    assert rtn["weights"]["strategy"] == "channel" and rtn["weights"]["symmetric"] is False
    with pytest.raises(ExportError, match="no quantize step"):
        emit("llm-compressor", {"steps": [{"op": "prune_blocks", "blocks": [1]}]}, 8, [1])


def test_emit_llama_quantize_args_match_the_gguf_tensor_names(tmp_path):
    import re
    import shlex

    import gguf

    from workbench.engine.emit import emit
    from workbench.engine.export_gguf import export_gguf

    recipe = {"steps": [{"op": "prune_blocks", "blocks": [1]},
                        {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "sym": False, "blocks": [0, 3]},
                        {"op": "quantize", "method": "rtn", "gguf": "Q8_0", "bits": 8, "group_size": 32, "sym": True,
                         "blocks": [2]}]}
    name, text = emit("llama-quantize", recipe, 4, [1])
    cmd = shlex.split(text.strip().splitlines()[-1])
    assert cmd[0] == "llama-quantize" and cmd[cmd.index("--prune-layers") + 1] == "1" and cmd[-1] == "F16"
    overrides = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--tensor-type"]
    assert sorted(o.split("=")[1] for o in overrides) == ["q4_1", "q8_0"]
    assert "GPTQ's error-compensating solve" in text
    # the patterns select exactly the intended blocks of the original model's GGUF (the command's input)
    out = export_gguf(_tok_lm("llama"), original_variant(4), tmp_path / "src", {}, tensor_type="F16")
    names = [t.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors]
    for o in overrides:
        pat, typ = o.rsplit("=", 1)
        hit = {int(n.split(".")[1]) for n in names if re.search(pat, n)}
        assert hit == ({0, 3} if typ == "q4_1" else {2})


def test_cli_emit_writes_both_files_into_the_export(tiny_lm, tmp_path, monkeypatch, capsys):
    from workbench import cli

    lm = tiny_lm("llama")
    monkeypatch.setattr("workbench.engine.loading.load_model", lambda *a, **k: lm)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"calibration": {"source": "default", "samples": 4, "seq_len": 32},
                                  "steps": [{"op": "prune_blocks", "blocks": [3]},
                                            {"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32,
                                             "sym": True, "blocks": [1]}]}))
    assert cli.main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--emit", "llm-compressor",
                     "--emit", "llama-quantize", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"]["emitted"] == ["llama-quantize.sh", "llm-compressor-recipe.yaml"]
    assert "QuantizationModifier" in (tmp_path / "o" / "llm-compressor-recipe.yaml").read_text()
    assert "--prune-layers 3" in (tmp_path / "o" / "llama-quantize.sh").read_text()
    files = json.loads((tmp_path / "o" / "workbench_metrics.json").read_text())["files_bytes"]
    assert "llama-quantize.sh" in files


# ---- llama.cpp itself ---------------------------------------------------------------------------------
LLAMACPP_VENV = os.path.expanduser(os.environ.get("WORKBENCH_LLAMACPP_VENV", "~/.cache/workbench/llamacpp-venv"))


def llamacpp_python() -> str | None:
    """The cached venv's Python if llama-cpp-python is built there (see README: GGUF export)."""
    import subprocess

    py = os.path.join(LLAMACPP_VENV, "bin", "python")
    if not os.path.exists(py):
        return None
    ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0
    return py if ok else None


def llamacpp_top1(py: str, gguf_path, rows: list[list[int]], tmp) -> list[list[int]]:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_top1.py"
    (tmp / "ids.json").write_text(json.dumps(rows))
    r = subprocess.run([py, str(script), str(gguf_path), str(tmp / "ids.json"), str(tmp / "top1.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((tmp / "top1.json").read_text())["top1"]


@pytest.mark.slow
@pytest.mark.parametrize("typ,recipe,min_agree", [
    ("F32", [{"op": "prune_blocks", "blocks": [10, 11, 12]}], 0.99),
    # quantized files: llama.cpp's quantized matmuls also round the activations to 8 bits (q8_0), so top-1
    # flips where the two best logits are close (measured 0.91 for Q8_0 re-quantized, 0.97 for our codes)
    ("Q8_0", [{"op": "prune_blocks", "blocks": [10, 11, 12]}], 0.85),
    (None, [{"op": "quantize", "method": "rtn", "gguf": "Q4_0", "blocks": list(range(30))}], 0.85),
])
def test_llamacpp_loads_our_gguf_and_agrees_on_top1(default_lm, tmp_path, typ, recipe, min_agree):
    """llama.cpp (llama-cpp-python, built once into a cached venv) loads our GGUF of the default model and
    its greedy top-1 on the quick set matches the in-app variant's. F32 and our own Q4_0 codes hold the
    in-app weights exactly (only the kernels' arithmetic differs); Q8_0 re-quantizes."""
    py = llamacpp_python()
    if py is None:
        msg = f"llama-cpp-python is not built in {LLAMACPP_VENV} (README: GGUF export, building llama.cpp)"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    from workbench.engine import evaluate as ev
    from workbench.engine.export_gguf import export_gguf

    lm = default_lm
    v = _steps(lm, original_variant(lm.num_blocks), recipe)
    out = export_gguf(lm, v, tmp_path / "g", {}, tensor_type=typ)
    ids = ev.quick_cache(lm).ids[:2, :64]
    with torch.no_grad():
        want = view_model(lm.model, lm.adapter, v)(input_ids=ids).logits.argmax(-1)
    got = torch.tensor(llamacpp_top1(py, out / "model.gguf", ids.tolist(), tmp_path))
    agree = float((got == want).float().mean())
    print(f"llama.cpp top-1 agreement ({typ or 'own codes'}): {agree:.4f}")
    assert agree >= min_agree


def test_compressed_tensors_reloads_score_like_the_variant_through_the_engines_forwards(tiny_lm, tmp_path):
    """A compressed-tensors reload (symmetric: it loads packed) scores the in-app variant's perplexity in
    `evaluate.perplexity`, whose forwards start below the whole model, where a packed linear had failed
    ("'Linear' object has no attribute 'weight'", seen in bench/export.py); two exports in one process;
    and `load_model` of such a folder runs its blocks."""
    from workbench.engine import evaluate as ev
    from workbench.engine.loading import _packed, load_model

    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    for k, blocks in enumerate([(0, 2), (1, 3)]):
        lm, v = _quantized(tiny_lm, blocks=blocks)
        lm.tokenizer = _tok_lm("llama").tokenizer  # a tokenizer that saves
        out, _ = export_any(lm, v, tmp_path / f"ct{k}", {}, fmt="compressed-tensors")
        m = _reload(out)
        assert _packed(m)  # as loaded: packed, so the test exercises the unpacking
        want, _ = ev.perplexity(view_model(lm.model, lm.adapter, v), ids)
        got, _ = ev.perplexity(m, ids)
        assert got == pytest.approx(want, rel=1e-4) and not _packed(m)
    back = load_model(str(out), device="cpu")
    assert not _packed(back.model)
    torch.testing.assert_close(_logits(back.model, ids), _logits(view_model(lm.model, lm.adapter, v), ids),
                               rtol=1e-4, atol=1e-4)


def llamacpp_tokenize(py: str, gguf_path, texts: list[str], tmp) -> list[list[int]]:
    """llama.cpp's own token ids of `texts` (vocabulary only; BOS as the file's add-BOS flag says)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_tokenize.py"
    (tmp / "texts.json").write_text(json.dumps(texts))
    r = subprocess.run([py, str(script), str(gguf_path), str(tmp / "texts.json"), str(tmp / "ids.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((tmp / "ids.json").read_text())["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("style,family", [("llama", "mistral"), ("gemma", "gemma3")])
def test_llamacpp_tokenizes_our_sentencepiece_gguf_like_the_app(style, family, tmp_path):
    """llama.cpp's SentencePiece tokenizer, driven only by the scores, types and flags we write, gives the
    in-app tokenizer's ids. Not for text that starts with a space under a prefixing (Llama 2 style)
    tokenizer: SentencePiece and llama.cpp always prepend the space, transformers' Metaspace skips it when
    the text already starts with one."""
    py = llamacpp_python()
    if py is None:
        msg = f"llama-cpp-python is not built in {LLAMACPP_VENV} (README: GGUF export, building llama.cpp)"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    from tiny import SPM_TEXTS
    from workbench.engine.export_gguf import export_gguf

    lm = _spm_lm(style, family)
    out = export_gguf(lm, original_variant(4), tmp_path / "s", {}, tensor_type="F32")
    texts = [t for t in SPM_TEXTS if style == "gemma" or not t.startswith(" ")]
    got = llamacpp_tokenize(py, out / "model.gguf", texts, tmp_path)
    assert got == [lm.tokenizer(t)["input_ids"] for t in texts]


def _mistral_v1_sentencepiece():
    """Mistral 7B v0.1's SentencePiece model, as the mistral-common package ships it (data only: found, not
    imported), with the sentencepiece library to run it; skipped where either is missing (setup.sh --test)."""
    import importlib.util
    from pathlib import Path

    spm = pytest.importorskip("sentencepiece", reason="sentencepiece not installed (setup.sh --test)")
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mistral-common (its SentencePiece model file) not installed (setup.sh --test)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.slow
def test_real_mistral_sentencepiece_vocabulary_under_llamacpp_matches_sentencepiece(tmp_path):
    """A real SentencePiece vocabulary (Mistral 7B v0.1, 32000 pieces) as the app holds it (transformers'
    BPE with byte fallback, merges from the pieces' scores), exported with a tiny Mistral model:
    transformers reloads it to the in-app ids, and llama.cpp, reading only our scores, types and flags,
    tokenizes as SentencePiece itself does, text with a leading space included."""
    import transformers as tf
    from transformers import AutoTokenizer, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from tiny import SPM_TEXTS, tiny_config
    from workbench.engine.export_gguf import export_gguf
    from workbench.engine.loading import wrap_model

    sp = _mistral_v1_sentencepiece()
    py = llamacpp_python()
    if py is None:
        pytest.skip(f"llama-cpp-python is not built in {LLAMACPP_VENV} (README: GGUF export, building llama.cpp)")
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    vocab = {t: i for i, t in enumerate(pieces)}
    scores = {t: sp.get_score(i) for i, t in enumerate(pieces)}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>")
    cfg = tiny_config("mistral")
    cfg.vocab_size = len(tok)
    lm = wrap_model(tf.AutoModelForCausalLM.from_config(cfg).eval(), tok, spec="tiny-mistral-v1-vocab", device="cpu")
    out = export_gguf(lm, original_variant(4), tmp_path / "m", {}, tensor_type="F16")
    texts = [*SPM_TEXTS, "The quick brown fox jumps over the lazy dog. 3.14159", "def f(x):\n    return x ** 2\n"]
    back = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    assert [back(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    got = llamacpp_tokenize(py, out / "model.gguf", texts, tmp_path)  # no BOS: the in-app tokenizer adds none
    assert got == [sp.encode(t) for t in texts]
