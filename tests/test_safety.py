"""Nothing lost, ever: the overwrite rules, the atomic folder writer, every bad input answered.

Tiny models, in-process wherever it can be; the few subprocesses are there because a signal or a
SIGKILL has to hit a real process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from workbench.engine import safe_folder as sf
from workbench.engine.errors import ExportError, WriteFailure
from workbench.engine.export import export_variant
from workbench.engine.workspace import original_variant

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Our cache (the remembered export parents) in a private folder; the HF home too."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def tree(folder: Path) -> dict:
    """path -> bytes of every file under folder (for byte-identity checks)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_export(folder: Path, marker=True, legacy=False) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"old weights")
    if marker:
        (folder / sf.MARKER).write_text("{}\n")
    if legacy:
        (folder / "recipe.json").write_text("{}")
        (folder / "workbench_metrics.json").write_text("{}")
    return folder


# ---- check_target: the overwrite rules --------------------------------------------------------------
def _case_paths(tmp_path: Path) -> dict:
    model = tmp_path / "models" / "src"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    make_export(tmp_path / "ours")
    make_export(tmp_path / "legacy", marker=False, legacy=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "xdg" / "compression-workbench" / "gguf").mkdir(parents=True)
    return {"model": model}


REFUSED = [
    # (target, overwrite, words the refusal must contain)
    ("", True, "no output folder"),
    ("   ", True, "no output folder"),
    ("{cwd}", True, "is the working directory"),
    ("{cwd_parent}", True, "contains the working directory"),
    ("~", True, "is your home directory"),
    ("/", True, "filesystem root"),
    ("{model}", True, "is the model's source"),
    ("{model}/sub", False, "lies inside the model's source"),
    ("{tmp}/models", True, "contains the model's source"),
    ("{tmp}/xdg/compression-workbench", True, "model cache"),
    ("{tmp}/xdg/compression-workbench/gguf/x", False, "lies inside the model cache"),
    ("{tmp}/hf/hub/models--a--b", False, "lies inside the model cache"),
    ("{tmp}/foreign", True, "not an earlier export"),
    ("{tmp}/foreign", False, "already exists"),
    ("{tmp}/ours", False, "already exists"),
    ("{tmp}/afile", True, "is not a folder"),
    ("{tmp}/.x.tmp-1-2-abc", False, "temporary folder"),
]


def _fill(t: str, tmp_path: Path, paths: dict) -> str:
    return t.format(cwd=os.getcwd(), cwd_parent=str(Path.cwd().parent), tmp=tmp_path, model=paths["model"])


@pytest.mark.parametrize("target, overwrite, words", REFUSED)
def test_check_target_refuses(target, overwrite, words, tmp_path, monkeypatch):
    paths = _case_paths(tmp_path)
    monkeypatch.chdir(tmp_path / "empty")  # a cwd with its parent holding the cases
    with pytest.raises(ExportError, match=words):
        sf.check_target(_fill(target, tmp_path, paths), overwrite=overwrite, protect=[str(paths["model"]), "tiny-x"])


@pytest.mark.parametrize("target, overwrite", [("{tmp}/new", False), ("{tmp}/new/deeper", False),
                                               ("{tmp}/empty2", False), ("{tmp}/ours", True),
                                               ("{tmp}/legacy", True)])
def test_check_target_allows(target, overwrite, tmp_path):
    paths = _case_paths(tmp_path)
    (tmp_path / "empty2").mkdir()
    got = sf.check_target(_fill(target, tmp_path, paths), overwrite=overwrite, protect=[str(paths["model"])])
    assert got == Path(_fill(target, tmp_path, paths)).resolve()


def test_symlink_into_the_model_source_is_refused(tmp_path):
    paths = _case_paths(tmp_path)
    link = tmp_path / "innocent"
    link.symlink_to(paths["model"])
    with pytest.raises(ExportError, match="model's source"):
        sf.check_target(link, overwrite=True, protect=[str(paths["model"])])


def test_export_in_progress_is_refused(tmp_path):
    start = sf.process_start(os.getpid())
    (tmp_path / f".out.tmp-{os.getpid()}-{start}-abcdef").mkdir()  # a live writer: this process
    with pytest.raises(ExportError, match="in progress"):
        sf.check_target(tmp_path / "out", overwrite=True)


# ---- the atomic writer --------------------------------------------------------------------------------
def test_atomic_folder_writes_marker_and_replaces_only_when_complete(tmp_path):
    out = make_export(tmp_path / "out")
    before = tree(out)
    with pytest.raises(RuntimeError):
        with sf.atomic_folder(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "xdg"]
    with sf.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert (out / "model.safetensors").read_bytes() == b"new" and sf.is_our_export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "xdg"]
    assert str(tmp_path) in (tmp_path / "xdg" / "compression-workbench" / sf.PARENTS_FILE).read_text()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_are_swept_and_live_ones_kept(tmp_path):
    me, start = os.getpid(), sf.process_start(os.getpid())
    dead = tmp_path / f".a.tmp-{_dead_pid()}-123-aa"
    reused = tmp_path / f".b.tmp-{me}-{start + 1}-bb"  # our id, another start time: a reused id
    live = tmp_path / f".c.tmp-{me}-{start}-cc"
    parked = tmp_path / f".d.old-{_dead_pid()}-5-dd"  # killed between the two renames of a replace
    for p in (dead, reused, live, parked):
        p.mkdir()
        (p / "w").write_bytes(b"x" * 1000)
    with sf.atomic_folder(tmp_path / "e") as tmp:
        (tmp / "f").write_text("new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [live.name, "d", "e", "xdg"]  # the parked export is put back where it was
    assert (tmp_path / "d" / "w").read_bytes() == b"x" * 1000
    gone = tmp_path / f".c.tmp-{_dead_pid()}-1-cc"
    live.rename(gone)  # as if its process had been killed: the app's start sweeps the remembered parents
    assert sf.sweep_remembered() == [gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e", "xdg"]


_SIGNAL_CHILD = textwrap.dedent("""
    import sys, time
    from workbench.engine import safe_folder as sf
    with sf.atomic_folder(sys.argv[1]) as tmp:
        (tmp / "weights").write_bytes(b"x" * 100000)
        print(tmp, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, -signal.SIGINT),
                                       (signal.SIGKILL, -signal.SIGKILL)])
def test_signals_remove_their_temp_folder_and_sigkill_leftovers_are_swept(sig, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", _SIGNAL_CHILD, str(tmp_path / "out")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    tmp = Path(p.stdout.readline().strip())
    assert tmp.is_dir() and tmp.parent == tmp_path
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    err = p.stderr.read()
    assert rc == code, err
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err
    if sig == signal.SIGKILL:
        assert tmp.is_dir()  # nothing runs on SIGKILL: the next export into the parent sweeps it
        with sf.atomic_folder(tmp_path / "next") as t:
            (t / "w").write_text("x")
    assert not tmp.exists() and not (tmp_path / "out").exists()


def test_full_disk_is_one_line_and_leaves_nothing(tiny_lm, tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    out = make_export(tmp_path / "out")
    before = tree(out)

    def full(tensors, path, **kw):  # the dense export streams shards through safetensors' save_file
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("workbench.engine.export_files.save_file", full)
    with pytest.raises(WriteFailure, match=r"the export .*out was not written: the disk is full") as e:
        export_variant(lm, original_variant(4), out, {"steps": []}, overwrite=True)
    assert "\n" not in str(e.value)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "xdg"]

    def rust_full(tensors, path, **kw):  # safetensors reports the OS error only in its words
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("workbench.engine.export_files.save_file", rust_full)
    with pytest.raises(WriteFailure, match="disk is full"):
        export_variant(lm, original_variant(4), tmp_path / "new", {"steps": []})
    assert not (tmp_path / "new").exists()


def test_unwritable_parent_is_one_line(tiny_lm, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(WriteFailure, match="permission denied"):
        export_variant(tiny_lm("llama"), original_variant(4), ro / "out", {"steps": []})


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_export_reloads_with_lm_head(tiny_lm, tmp_path, family):
    """A tied model's export must reload tied (lm_head present); an untied one keeps its own head."""
    from transformers import AutoModelForCausalLM

    from workbench.engine.workspace import view_model

    lm = tiny_lm(family)
    v = original_variant(4).with_dropped([1])
    out = export_variant(lm, v, tmp_path / "out", {"steps": []}, metrics={"a": 1})
    m = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    want = view_model(lm.model, lm.adapter, v)(input_ids=ids).logits
    got = m(input_ids=ids).logits
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    tied = lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    assert (m.get_output_embeddings().weight is m.get_input_embeddings().weight) == tied


def test_cli_full_disk_exits_3_with_one_line(tiny_lm, tmp_path, monkeypatch, capsys):
    from workbench import cli
    from workbench.engine import loading

    lm = tiny_lm("llama")
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: lm)

    def full(tensors, path, **kw):  # the dense export streams shards through safetensors' save_file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("workbench.engine.export_files.save_file", full)
    assert cli.main(["compress", "--model", "tiny", "--out", str(tmp_path / "o")]) == cli.EXIT_ENVIRONMENT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the export") and "disk is full" in err[-1] and "Traceback" not in "".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xdg"]


def test_cli_out_cwd_or_model_folder_never_replaced(tiny_lm, tmp_path, monkeypatch, capsys):
    """Issue cases 1 and 2: --out "" / the model folder / a folder above it, with --overwrite."""
    from workbench import cli
    from workbench.engine import loading

    src = tmp_path / "models" / "m"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    lm = tiny_lm("llama")
    lm.source = str(src)
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: lm)
    work = tmp_path / "work"
    work.mkdir()
    (work / "user-file.txt").write_text("precious")
    monkeypatch.chdir(work)
    before = {k: v for k, v in tree(tmp_path).items() if not k.startswith("xdg")}
    for out, words in (("", "no output folder"), (".", "working directory"), (str(src), "model's source"),
                       (str(src.parent), "contains the model's source")):
        assert cli.main(["compress", "--model", str(src), "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and words in err[-1], err
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("xdg")} == before
