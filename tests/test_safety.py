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
from workbench.engine.variant import original_variant

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

    from workbench.engine.variant import view_model

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


# ---- every bad input: one `error:` line, exit 2, before any long work ---------------------------------
BAD_ARGS = [
    (["info", "--device", "tpu:7"], "unknown device 'tpu:7'"),
    (["info", "--device", "cuda:-1"], "unknown device 'cuda:-1'"),
    (["info", "--model", ""], "the model is empty"),
    (["info", "--model", "   "], "the model is empty"),
    (["eval", "--max-tokens", "0"], "at least 1"),
    (["eval", "--max-tokens", "-1"], "at least 1"),
    (["eval", "--samples", "0"], "at least 1"),
    (["eval", "--seq-len", "x"], "not a whole number"),
    (["eval", "--seed", "-2"], "0 or more"),
    (["analyze", "outliers", "--top-k", "-3"], "at least 1"),
    (["analyze", "sparsity", "--blocks", "9,x"], "'x' is not a block index"),
    (["analyze", "sparsity", "--blocks", "-1"], "'-1' is not a block index"),
    (["analyze", "sparsity", "--sensitivity", "1.5"], "between 0 and 1"),
    (["analyze", "sparsity", "--sensitivity", "nan"], "not a finite number"),
    (["analyze", "sparsity", "--max-sparsity", "-0.1"], "between 0 and 1"),
    (["analyze", "sparsity", "--methods", "magnitude,obs"], "unknown 'obs'"),
    (["analyze", "sparsity", "--patterns", "3:3"], "unknown '3:3'"),
    (["analyze", "sparsity", "--points", "0"], "at least 1"),
    (["analyze", "sparsity", "--eval-tokens", "-5"], "at least 1"),
    (["analyze", "attention", "--damping", "2"], "between 0 and 1"),
    (["analyze", "attention", "--tol", "0"], "greater than 0"),
    (["analyze", "attribution", "--steps", "0"], "at least 1"),
    (["analyze", "influence", "--iterative", "0"], "at least 1"),
    (["analyze", "influence", "--metric", "magic"], "invalid choice"),
    (["compress", "--recipe", "r.json"], "required: --out"),
    (["compress", "--out", "o", "--format", "zip"], "invalid choice"),
    (["app", "--port", "70000"], "1..65535"),
    (["app", "--device", "tpu"], "unknown device"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("args, words", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_fail_at_parse_time(args, words, capsys, monkeypatch):
    from workbench import cli
    from workbench.engine import loading

    def never(*a, **k):
        raise AssertionError("a bad argument reached the model load")

    monkeypatch.setattr(loading, "load_model", never)
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and words in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def _recipe_files(tmp_path: Path) -> dict:
    deep = tmp_path / "deep.json"
    deep.write_text('{"steps": ' + "[" * 100000 + "]" * 100000 + "}")
    binary = tmp_path / "bin.json"
    binary.write_bytes(bytes(range(256)) * 4)
    nul = tmp_path / "nul.json"
    nul.write_text('{"steps": []}\x00')
    big = tmp_path / "big.json"
    big.write_text('{"steps": [], "model": "' + "x" * (5 * 2**20) + '"}')
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"model": "caf\xe9"}')
    shallow = tmp_path / "ok17.json"  # brackets inside strings do not count as nesting
    shallow.write_text(json.dumps({"steps": [], "model": "[[[[[[[[[[[[[[[[[[[[{{{{"}))
    return {"deep": (deep, "nests 100001 levels"), "binary": (binary, "not a text file"),
            "nul": (nul, "NUL bytes"), "big": (big, "at most 4 MiB"), "latin": (latin, "not a text file"),
            "shallow": (shallow, None), "folder": (tmp_path, "no such recipe file")}


@pytest.mark.parametrize("kind", ["deep", "binary", "nul", "big", "latin", "shallow", "folder"])
def test_bad_recipe_files_are_one_line(kind, tmp_path, capsys, monkeypatch):
    from workbench import cli
    from workbench.engine import loading
    from workbench.engine.errors import RecipeError
    from workbench.engine.recipe import Recipe

    path, words = _recipe_files(tmp_path)[kind]
    if words is None:
        assert Recipe.from_file(path).steps == []
        return
    with pytest.raises(RecipeError, match=words):
        Recipe.from_file(path)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model for a bad recipe"))
    assert cli.main(["eval", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.strip().count("\n") == 0


def test_json_depth_against_the_parser():
    """json_depth agrees with a recursive walk of what json.loads builds."""
    from workbench.engine.recipe import json_depth

    def walk(x):
        if isinstance(x, dict):
            return 1 + max(map(walk, x.values()), default=0)
        if isinstance(x, list):
            return 1 + max(map(walk, x), default=0)
        return 0

    for text in ['1', '[]', '{"a": [1, {"b": "]]]\\\\"}]}', '[[[]], [[[[]]]]]', '{"s": "\\"{["}', '[{}, [{}]]']:
        assert json_depth(text) == walk(json.loads(text)), text


def test_sparsity_blocks_out_of_range_refused_before_the_sweep(tiny_lm, monkeypatch, capsys):
    from workbench import cli
    from workbench.engine import loading
    from workbench.engine.analysis import sparsity

    lm = tiny_lm("llama")
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: lm)
    monkeypatch.setattr(sparsity, "sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    assert cli.main(["analyze", "sparsity", "--model", "tiny", "--blocks", "1,9"]) == 2
    assert "block index 9 is out of range" in capsys.readouterr().err


# ---- the store: memory budget and idle sessions -------------------------------------------------------
def _store(tiny_lm, **kw):
    from workbench.store import Store

    st = Store(default_model="tiny-llama", device="cpu", **kw)
    st.register_model(tiny_lm("llama"), "tiny-llama")
    return st


def _rtn(block, **kw):
    return {"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "blocks": [block], **kw}


def _block_bytes(mod) -> int:
    """Hand count: the block's state_dict tensors plus each quantized linear's codes/scales/zeros/g_idx."""
    n = sum(t.numel() * t.element_size() for t in mod.state_dict().values())
    for m in mod.modules():
        r = getattr(m, "workbench_quant", None)
        if r is not None:
            n += sum(t.numel() * t.element_size() for t in (r.codes, r.scale, r.zero, r.g_idx))
    return n


def test_memory_used_counts_each_replacement_block_once(tiny_lm):
    st = _store(tiny_lm, memory_budget=None)
    sid = st.new_session()
    st.attach(sid)
    assert st.memory_used()["total"] == 0  # the original's weights are not the store's to count
    v1 = st.apply_step(sid, _rtn(1))
    want = _block_bytes(v1.overrides[1])
    assert st.memory_used()["blocks"] == want > 0
    st.apply_step(sid, {"op": "prune_blocks", "blocks": [0]})  # shares v1's block 1: no new bytes
    assert st.memory_used()["blocks"] == want
    other = st.new_session()
    st.attach(other)
    v3 = st.apply_step(other, _rtn(2))
    assert st.memory_used()["blocks"] == want + _block_bytes(v3.overrides[2])


def test_budget_releases_caches_then_old_variants_and_rebuilds_them_bit_identically(tiny_lm):
    from workbench.engine.variant import view_model
    from workbench.store import RELEASED

    notes = []
    st = _store(tiny_lm, memory_budget=None, notify=notes.append)
    sid = st.new_session()
    lm = st.attach(sid)
    root = st.current(sid)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))

    def logits(v):
        return view_model(lm.model, lm.adapter, v)(input_ids=ids, use_cache=False).logits

    v1 = st.apply_step(sid, _rtn(1))
    st.switch(sid, root.id)
    st.set_calibration(sid, 4, 32)  # v2 calibrates differently: the rebuild must use what v2 used
    v2 = st.apply_step(sid, {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "blocks": [2]})
    st.set_calibration(sid, 6, 48)
    st.switch(sid, root.id)
    v3 = st.apply_step(sid, _rtn(3, observer="mse"))
    want = {v.id: logits(v) for v in (v1, v2, v3)}
    per = {v.id: _block_bytes(next(iter(v.overrides.values()))) for v in (v1, v2, v3)}
    ws = st.workspace(sid)
    ws.results.put(v1, "probe", (), {"k": torch.zeros(50000)})  # a cached analysis result
    ws.results.put(v3, "small", (), {"k": torch.zeros(10)})  # used later: kept while the older one suffices
    assert st.memory_used()["caches"] == 200040

    st.memory_budget = sum(per.values()) + 40  # the blocks fit: only the oldest result goes
    assert st.enforce_budget() == {"caches": 1, "variants": []}
    assert ws.peek(v1, "probe") is None and ws.peek(v3, "small") is not None
    st.memory_budget = per[v2.id] + per[v3.id]  # one block too many: the oldest non-current goes
    assert st.enforce_budget()["variants"] == [v1.name]
    assert st.session(sid).released == {v1.id} and v1.overrides[1] is RELEASED and v1 in st.variants(sid)
    assert st.memory_used()["total"] <= st.memory_budget
    st.memory_budget = 1  # the current variant is never released
    assert st.enforce_budget()["variants"] == [v2.name] and st.session(sid).released == {v1.id, v2.id}

    st.memory_budget = None
    for v in (v2, v1):
        assert st.switch(sid, v.id) is v and v.id not in st.session(sid).released
        assert torch.equal(logits(v), want[v.id]), v.name
    assert len(notes) == 2 and "rebuilt" in notes[0]
    assert st.undo(sid) is v2 and st.current(sid) is v2


def test_idle_sessions_expire_but_not_while_a_job_runs(tiny_lm):
    from workbench.store import SessionError

    st = _store(tiny_lm, session_idle=10)
    sid = st.new_session()
    st.attach(sid)
    t = time.monotonic()
    assert st.expire_idle(now=t + 5) == []
    st.session(sid).busy = 1
    assert st.expire_idle(now=t + 100) == []
    st.session(sid).busy = 0
    assert st.expire_idle(now=t + 100) == [sid]
    with pytest.raises(SessionError, match="expired"):
        st.current(sid)
    fast = _store(tiny_lm, session_idle=0.2)
    a = fast.new_session()
    fast.start_expiry(every=0.05)
    thread = fast._expiry
    deadline = time.monotonic() + 10
    while a in fast._sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a not in fast._sessions
    fast.close()
    assert not thread.is_alive()


# ---- the app: every failure a message, exposure only when asked -------------------------------------
def test_guard_turns_every_failure_into_a_message():
    import gradio as gr

    from workbench.app import guard
    from workbench.engine.errors import RecipeError

    def boom():
        return 1 / 0

    def gen():
        yield 1
        raise KeyError("k")

    with pytest.raises(gr.Error, match="Something went wrong inside the workbench .ZeroDivisionError"):
        guard(boom)()
    with pytest.raises(gr.Error, match="KeyError"):
        list(guard(gen)())
    with pytest.raises(gr.Error, match="nests 40 levels") as e:
        guard(lambda: (_ for _ in ()).throw(RecipeError("the recipe nests 40 levels deep")))()
    assert e.value.title == "RecipeError"
    msg = gr.Error("as is")
    with pytest.raises(gr.Error, match="as is"):
        guard(lambda: (_ for _ in ()).throw(msg))()
    assert guard(guard(boom)) is guard(boom) or getattr(guard(guard(boom)), "__wrapped__", None) is boom


def test_every_handler_of_the_app_is_guarded(tiny_lm):
    from workbench.app import build_app

    demo = build_app(store=_store(tiny_lm))
    fns = [bf.fn for bf in demo.fns.values() if bf.fn is not None]
    assert len(fns) > 20 and all(getattr(f, "_wb_guarded", False) for f in fns)


def test_deeply_nested_recipe_in_the_app_is_a_clear_message(tiny_lm):
    import gradio as gr

    from workbench.app import guard
    from workbench.panels import export

    st = _store(tiny_lm)
    sid = st.new_session()
    st.attach(sid)
    deep = '{"steps": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(gr.Error, match="nests 5001 levels deep"):
        guard(export.import_recipe)(st, sid, deep, None, progress=None)
    assert len(st.variants(sid)) == 1


def _auth_file(tmp_path, text):
    f = tmp_path / "users.txt"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("host, auth, no_auth, outcome", [
    ("127.0.0.1", None, False, None), ("localhost", None, False, None), ("::1", None, False, None),
    ("127.0.0.2", None, False, None),
    ("0.0.0.0", None, False, "pass --auth-file FILE"), ("192.168.1.5", None, False, "pass --auth-file FILE"),
    ("::", None, False, "pass --auth-file FILE"),
    ("0.0.0.0", None, True, "warning: serving on 0.0.0.0 without a login"),
    ("0.0.0.0", "ann:pw\n# c\n\nbob:p:w\n", False, "plain HTTP"),
    ("127.0.0.1", "ann:pw\n", False, [("ann", "pw")]),
    ("0.0.0.0", "ann:pw\n", True, "contradict"),
    ("0.0.0.0", "no colon here\n", False, "line 1: expected user:password"),
    ("0.0.0.0", "# only comments\n", False, "holds no user:password"),
    ("0.0.0.0", b"\xff\xfe", False, "cannot read the auth file"),
])
def test_exposure_rules(host, auth, no_auth, outcome, tmp_path, capsys):
    from workbench.app import check_exposure
    from workbench.engine.errors import WorkbenchError

    f = None
    if auth is not None:
        f = tmp_path / "users.txt"
        f.write_bytes(auth if isinstance(auth, bytes) else auth.encode())
    refusal = isinstance(outcome, str) and not outcome.startswith(("warning", "plain"))
    if refusal:
        with pytest.raises(WorkbenchError, match=outcome):
            check_exposure(host, f and str(f), no_auth)
        return
    got = check_exposure(host, f and str(f), no_auth)
    err = capsys.readouterr().err
    if isinstance(outcome, list) or outcome is None:
        assert got == outcome and err == ""
    else:
        assert outcome in err
        if auth:
            assert got == [("ann", "pw"), ("bob", "p:w")]


def test_cli_app_refuses_an_open_host_before_loading(monkeypatch, capsys):
    from workbench import cli
    from workbench.store import Store

    monkeypatch.setattr(Store, "model", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(["app", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 serves beyond this machine") and err.count("\n") == 1
    for bad, words in ((["--session-idle", "soon"], "not a duration"), (["--memory-budget", "lots"], "not a size")):
        with pytest.raises(SystemExit):
            cli.main(["app", *bad])
        assert words in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gradio_login_is_required_with_an_auth_file(tiny_lm):
    from gradio_client import Client

    from workbench.app import build_app
    from workbench.validate import duration, size

    assert duration("2h") == 7200 and duration("90m") == 5400 and duration("off") is None
    assert size("2G") == 2 * 2**30 and size("512MiB") == 512 * 2**20 and size("off") is None
    demo = build_app(store=_store(tiny_lm))
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            auth=[("ann", "pw")])
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(api_name="/start_session")
        Client(url, auth=("ann", "pw"), verbose=False).predict(api_name="/start_session")
    finally:
        demo.close()


def _soak_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wb_soak", ROOT / "bench" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("budget", [2 * 2**30, 2**20], ids=["2GiB", "1MiB-forces-releases"])
def test_short_soak_eight_sessions(budget):
    """8 gradio_client sessions for ~20 s: no error, every export reloads and matches its recipe replayed,
    the app answers afterwards; the store keeps to its budget (1 MiB: variants are released and rebuilt)."""
    r = _soak_module().soak(sessions=8, seconds=20, budget=budget, hidden=64, layers=6)
    assert r["errors"] == [], r["tracebacks"]
    assert r["exports_checked"] >= 1 and r["actions"] >= 8 and r["answering_after"]
    assert r["store_end"] <= max(budget, r["current_blocks"])  # current variants are never released
    if budget < 2**30:
        assert r["variants_released"] > 0  # releases happened, and the rebuilds behind undo raised nothing
    if budget > 2**30:
        assert r["rss_growth"] < budget


def test_recipe_of_a_variant_records_the_calibration_it_was_made_with(tiny_lm, tmp_path):
    """Undo after importing a recipe with another calibration: the export's recipe still replays it."""
    from workbench.engine.recipe import Recipe, apply_recipe
    from workbench.engine.variant import view_model

    st = _store(tiny_lm, memory_budget=None)
    sid = st.new_session()
    lm = st.attach(sid)
    gptq = {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "blocks": [1]}
    v1 = st.import_recipe(sid, json.dumps({"calibration": {"samples": 2, "seq_len": 32}, "steps": [gptq]}))
    st.import_recipe(sid, json.dumps({"calibration": {"samples": 3, "seq_len": 40}, "steps": [gptq]}))
    assert st.undo(sid) is v1 and st.session(sid).calibration.samples == 3
    rec = st.recipe_of(sid)
    assert rec["calibration"]["samples"] == 2
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    replay = apply_recipe(lm, Recipe.from_dict(rec))
    a = view_model(lm.model, lm.adapter, replay)(input_ids=ids).logits
    b = view_model(lm.model, lm.adapter, v1)(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("out, words", [("", "no output folder given"), ("/", "is a filesystem root"),
                                        (".", "the working directory")])
def test_compress_refuses_a_bad_output_folder_before_loading(out, words, tmp_path, capsys, monkeypatch):
    """`compress --out` is checked against the overwrite rules before the model loads or the recipe runs."""
    from workbench import cli
    from workbench.engine import loading

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(loading, "load_model", never)
    recipe = tmp_path / "r.json"
    recipe.write_text('{"steps": [{"op": "prune_blocks", "blocks": [0]}]}')
    assert cli.main(["compress", "--recipe", str(recipe), "--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
