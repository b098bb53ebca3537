"""CLI contract: JSON documents, bad input as one clear line, compress -> loadable export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workbench.cli import main


def run_cli(*args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["info", "--model", "/nonexistent/folder"], "no such model folder"),
        (["info", "--model", "/nonexistent/m.gguf"], "no such GGUF file"),
        (["eval", "--recipe", "/nonexistent.json"], "no such recipe file"),
        (["info", "--device", "cuda:7"], "cuda:7"),
        (["info", "--model", "no-such-org/no-such-model"], "could not get 'no-such-org/no-such-model'"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_corrupt_recipe_and_unknown_op(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["eval", "--recipe", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    unk = tmp_path / "unk.json"
    unk.write_text(json.dumps({"steps": [{"op": "teleport"}]}))
    assert main(["eval", "--recipe", str(unk)]) == 2
    assert "unknown op 'teleport'" in capsys.readouterr().err


def test_corrupt_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: could not read the config") and "Traceback" not in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                                       "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 64}))
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: could not load") and "Traceback" not in err


def test_pickle_only_folder_needs_opt_in(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_cli_round_trip(default_lm, tmp_path):
    """Real model: info/eval JSON, out-of-range and prune-everything errors, compress -> export loads."""
    code, out, err = run_cli("info", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema_version"] == 1 and doc["result"]["num_blocks"] == 30 and doc["units"]

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "default", "steps": [{"op": "prune_blocks", "blocks": [40]}]}))
    code, out, err = run_cli("eval", "--recipe", str(recipe))
    assert code == 2 and "out of range" in err and "Traceback" not in err
    recipe.write_text(json.dumps({"steps": [{"op": "prune_blocks", "blocks": list(range(30))}]}))
    code, out, err = run_cli("eval", "--recipe", str(recipe))
    assert code == 2 and "every block" in err

    recipe.write_text(json.dumps({"model": "default", "steps": [{"op": "prune_blocks", "blocks": [12, 14]}]}))
    code, out, err = run_cli("eval", "--recipe", str(recipe), "--max-tokens", "600", "--seq-len", "128", "--json")
    assert code == 0, err
    res = json.loads(out)["result"]
    assert res["blocks_kept"] == 28 and res["kl"] > 0 and 0 < res["top1"] < 1 and res["ppl"] > res["ppl_original"]

    dest = tmp_path / "exported"
    code, out, err = run_cli("compress", "--recipe", str(recipe), "--out", str(dest), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["result"]["dropped"] == [12, 14]
    assert json.loads((dest / "recipe.json").read_text())["steps"][0]["blocks"] == [12, 14]
    code, out, err = run_cli("compress", "--recipe", str(recipe), "--out", str(dest))
    assert code == 2 and "already exists" in err
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(dest)
    assert m.config.num_hidden_layers == 28
