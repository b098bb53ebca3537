"""Native precision (issue 13): the checkpoint's dtype is kept through load, variants and export; a GGUF
loads in the smallest dtype that holds it exactly (measured); fp32 where the numerics need it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ByteTokenizer
from tiny import tiny_model
from workbench.engine import eval as ev
from workbench.engine import loading
from workbench.engine.data import Calibration
from workbench.engine.errors import ModelLoadError
from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
from workbench.engine.workspace import original_variant


def save_tiny(folder, family="llama", layers=4, dtype=torch.bfloat16, seed=0):
    """A tiny random checkpoint saved in `dtype` with the byte tokenizer's files (loads with load_model)."""
    import transformers as tf

    m = tiny_model(family, layers, seed).to(dtype)
    m.config.dtype = dtype
    m.save_pretrained(folder)
    tf.PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer()).save_pretrained(folder)
    return folder


def _byte_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i) if 33 <= i < 127 else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("bf16") / "m")


@pytest.fixture
def calib_text(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist()) for _ in range(40)]
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(paras))
    return str(p)


def test_auto_keeps_the_checkpoint_dtype_and_asked_dtypes_apply(bf16_folder):
    lm = loading.load_model(str(bf16_folder), device="cpu")
    info = lm.info()
    assert lm.storage_dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert info["storage_dtype"] == info["compute_dtype"] == info["checkpoint_dtype"] == "bfloat16"
    assert "checkpoint's own" in info["dtype_note"]
    assert loading.load_model(str(bf16_folder), device="cpu", dtype="float32").storage_dtype == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype 'int3'"):
        loading.load_model(str(bf16_folder), device="cpu", dtype="int3")


def test_gemma_never_computes_in_float16(tmp_path):
    folder = save_tiny(tmp_path / "g", family="gemma2", layers=2, dtype=torch.float32)
    lm = loading.load_model(str(folder), device="cpu", dtype="float16")
    assert lm.storage_dtype == torch.bfloat16 and "overflows in float16" in lm.dtype_note
    d, note = loading.choose_dtype("float16", folder, "llama")
    assert d == torch.float16 and note == "float16 as asked"


def test_gguf_auto_is_the_smallest_exact_dtype_measured(tmp_path):
    """A dequantized-GGUF folder (marked by workbench_source.json) loads in bf16 only when every tensor
    is bf16-exact; one tensor off the bf16 grid keeps float32, and the note counts it."""
    folder = save_tiny(tmp_path / "q", dtype=torch.float32)
    (folder / "workbench_source.json").write_text(json.dumps({"gguf": "x.gguf"}))
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    sd = {k: v.to(torch.bfloat16).float() for k, v in sd.items()}  # every value on the bf16 grid
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert loading.choose_dtype("auto", folder, "llama")[0] == torch.bfloat16
    k = next(k for k in sd if k.endswith("down_proj.weight"))
    sd[k] = sd[k] + 1e-4 * torch.randn_like(sd[k])  # now off the grid (and off fp16's)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "workbench_dtype.json").unlink()  # the measurement is cached: measure the new file
    counts = loading.exact_dtype_counts(folder)
    assert counts["bfloat16"] == 1 and counts["float16"] >= 1 and counts["tensors"] == len(sd)
    d, note = loading.choose_dtype("auto", folder, "llama")
    assert d == torch.float32 and f"1 of {len(sd)} tensors are not exact in bfloat16" in note


def test_default_model_stays_float32_because_its_gguf_values_are_not_bf16_exact(default_lm):
    assert default_lm.storage_dtype == torch.float32
    assert "211 of 272 tensors are not exact in bfloat16" in default_lm.dtype_note


def test_bf16_stays_bf16_through_variants_and_export(bf16_folder, calib_text, tmp_path):
    import transformers as tf

    from workbench.engine.export import export_variant
    from workbench.engine.recipe import variant_recipe

    lm = loading.load_model(str(bf16_folder), device="cpu")
    ctx = OpContext(lm=lm, calibration=Calibration(source=calib_text, samples=4, seq_len=32))
    steps = [{"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "blocks": [0]},
             {"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "blocks": [1]},
             {"op": "sparsify", "sparsity": 0.5, "blocks": [2]},
             {"op": "prune_blocks", "blocks": [3]}]
    v = apply_steps(ctx, original_variant(4), [step_from_dict(s) for s in steps])
    for i in v.replaced():
        assert {p.dtype for p in v.overrides[i].parameters()} == {torch.bfloat16}, i
    q = ev.quick_eval(lm, v)
    assert q["kl"] > 0 and q["bytes"] < ev.size_of(lm, original_variant(4))["bytes"]
    out = export_variant(lm, v, tmp_path / "out", variant_recipe(lm, v, ctx.calibration))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" and cfg["num_hidden_layers"] == 3
    back = tf.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    exported = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    source = sum(f.stat().st_size for f in bf16_folder.glob("*.safetensors"))
    assert exported < source  # bf16 out (an fp32 export would be ~1.5x the source here)


def test_fp32_reductions_on_a_bf16_model(bf16_folder):
    """Quick compare of a bf16 model gives the KL computed by hand in float64 from its own logits."""
    lm = loading.load_model(str(bf16_folder), device="cpu")
    v = original_variant(4).with_dropped([1])
    q = ev.quick_eval(lm, v)
    qc = ev.quick_cache(lm)
    from workbench.engine.workspace import view_model

    ids = qc.ids
    ref = torch.log_softmax(lm.model(input_ids=ids).logits[:, :-1].double(), -1)
    var = torch.log_softmax(view_model(lm.model, lm.adapter, v)(input_ids=ids).logits[:, :-1].double(), -1)
    kl = (ref.exp() * (ref - var)).sum(-1).mean().item()
    assert q["kl"] == pytest.approx(kl, rel=2e-2, abs=1e-4)  # ref log-probs are cached in fp16


def test_cli_dtype_flag_and_info_report_both_dtypes(bf16_folder, capsys):
    from workbench.cli import main

    assert main(["info", "--model", str(bf16_folder), "--dtype", "float32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["result"]
    assert res["storage_dtype"] == "float32" and res["compute_dtype"] == "float32"
    assert res["checkpoint_dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["info", "--dtype", "int3"])  # argparse refuses: exit 2 with its one usage line


# ---- memory bounded in the vocabulary: chunked log-softmax / KL / perplexity ---------------------------
def _naive(model, vmodel, ids):
    """KL, top-1, NLL of the variant and NLL of the original, from whole logits in float64."""
    ref = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
    var = torch.log_softmax(vmodel(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
    t = ids[:, 1:, None]
    return {"kl": (ref.exp() * (ref - var)).sum(-1).mean().item(),
            "top1": (ref.argmax(-1) == var.argmax(-1)).double().mean().item(),
            "nll": -var.gather(-1, t).mean().item(), "ref_nll": -ref.gather(-1, t).mean().item()}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_chunked_eval_equals_whole_logits(family, tiny_lm, monkeypatch, tmp_path):
    import math

    from workbench.engine.workspace import view_model

    lm = tiny_lm(family, layers=3)
    monkeypatch.setattr(ev, "LOGIT_CHUNK_BYTES", 4 * 256 * 7)  # 7 tokens a chunk: many uneven chunks
    assert ev.chunk_tokens(256) == 7
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: " + "some words here and there " * 12 for i in range(12)))
    v = original_variant(3).with_dropped([1])
    full = ev.full_eval(lm, v, source=str(text), seq_len=32, max_tokens=32 * 5, batch_size=2)
    from workbench.engine import data

    ids = data.evaluation_ids(lm.tokenizer, str(text), 32, 32 * 5)
    ref = _naive(lm.model, view_model(lm.model, lm.adapter, v), ids)
    assert full["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-6)
    assert full["top1"] == pytest.approx(ref["top1"], abs=1e-9)
    assert math.log(full["ppl"]) == pytest.approx(ref["nll"], rel=1e-5)
    assert math.log(full["ppl_original"]) == pytest.approx(ref["ref_nll"], rel=1e-5)
    ppl, n = ev.perplexity(view_model(lm.model, lm.adapter, v), ids, batch_size=3)
    assert n == ids[:, 1:].numel() and math.log(ppl) == pytest.approx(ref["nll"], rel=1e-5)
    q = ev.quick_eval(lm, v)
    qc = ev.quick_cache(lm)
    rq = _naive(lm.model, view_model(lm.model, lm.adapter, v), qc.ids)
    assert q["kl"] == pytest.approx(rq["kl"], rel=2e-2, abs=1e-4)  # the reference is cached in fp16
    assert q["top1"] == pytest.approx(rq["top1"], abs=1e-9)
    assert qc.ref_nll == pytest.approx(rq["ref_nll"], rel=1e-5)
