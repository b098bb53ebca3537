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
from workbench.engine.workspace import original_variant, view_model

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
