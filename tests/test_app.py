"""The app without a browser: the session store, the panels' handlers, and a gradio_client smoke test.

Everything runs on a tiny random llama registered in the store as the app's default model.
"""

from __future__ import annotations

import json
import socket
import threading

import gradio as gr
import pytest
import torch
import torch.nn.functional as F

from workbench.engine import evaluate as ev
from workbench.engine.errors import Cancelled, ExportError, RecipeError, WorkbenchError
from workbench.engine.variant import DROP, state_fingerprint, view_model
from workbench.panels import blocks, compare, export, model
from workbench.store import SessionError

from conftest import TINY_SPEC



def _no_progress(frac, desc=None):
    pass


def _logits(lm, variant, ids):
    return view_model(lm.model, lm.adapter, variant)(input_ids=ids, use_cache=False).logits


# ---- store ----------------------------------------------------------------------------------------
def test_sessions_are_isolated_and_share_one_model(store):
    a, b = store.new_session(), store.new_session()
    assert store.attach(a) is store.attach(b)  # one loaded model per spec
    store.toggle(a, 1)
    store.apply_step(a, {"op": "prune_blocks", "blocks": store.pending(a)})
    assert store.current(a).dropped() == [1]
    assert store.current(b).is_identity() and store.pending(b) == []
    with pytest.raises(SessionError):
        store.current("no-such-session")


def test_apply_never_touches_the_original_and_undo_restores(store, sid):
    lm = store.lm(sid)
    before = state_fingerprint(lm.model)
    v0 = store.current(sid)
    v1 = store.apply_step(sid, {"op": "prune_blocks", "blocks": [2]})
    v2 = store.apply_step(sid, {"op": "prune_blocks", "blocks": [0]})
    assert v2.dropped() == [0, 2] and v2.steps == [{"op": "prune_blocks", "blocks": [2]}, {"op": "prune_blocks", "blocks": [0]}]
    after = state_fingerprint(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert store.undo(sid) is v1 and store.undo(sid) is v0
    with pytest.raises(WorkbenchError, match="nothing to undo"):
        store.undo(sid)
    assert store.switch(sid, v2.id) is v2 and store.current(sid) is v2


def test_failed_or_cancelled_job_leaves_the_session_as_it_was(store, sid):
    store.toggle(sid, 3)
    state = (store.current(sid), len(store.variants(sid)), store.pending(sid))
    with pytest.raises(RecipeError, match="unknown op 'no_such_op'"):
        store.apply_step(sid, {"op": "no_such_op", "blocks": [3]})
    with pytest.raises(RecipeError, match="every block"):
        store.apply_step(sid, {"op": "prune_blocks", "blocks": [0, 1, 2, 3]})
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        store.apply_step(sid, {"op": "prune_blocks", "blocks": [3]}, cancel=cancel)
    with pytest.raises(Cancelled):
        store.full_eval(sid, cancel=cancel, max_tokens=512)
    assert (store.current(sid), len(store.variants(sid)), store.pending(sid)) == state
    assert "full" not in store.figures(sid, store.current(sid))


def test_model_use_is_serialised(store, sid):
    """Hooks on the shared model fire in every thread: a second computation waits for the first."""
    store.toggle(sid, 1)
    done = threading.Event()
    with store.using(sid):
        t = threading.Thread(target=lambda: (store.preview(sid), done.set()))
        t.start()
        assert not done.wait(0.5)
    t.join(30)
    assert done.is_set()


def test_quick_figures_match_a_full_forward_of_the_variant(store, sid):
    """The cached quick evaluation (run from the first changed block) against a naive full forward."""
    lm = store.lm(sid)
    v = store.apply_step(sid, {"op": "prune_blocks", "blocks": [1]})
    q = store.quick(sid, v)
    ids = ev.quick_cache(lm).ids
    ref = F.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1)
    var = F.log_softmax(_logits(lm, v, ids)[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - var)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == var.argmax(-1)).float().mean().item()
    assert q["kl"] == pytest.approx(kl, rel=2e-2, abs=1e-4)  # the cache holds fp16 log-probs
    assert q["top1"] == pytest.approx(top1, abs=1.5 / ids[:, 1:].numel())
    assert q["kl"] > 0


# ---- blocks panel ---------------------------------------------------------------------------------
def test_chart_values_states_and_click_toggle(store, sid):
    from workbench.engine.analysis import influence
    from workbench.engine.data import calibration_ids

    lm = store.lm(sid)
    fig = blocks.chart_figure(store, sid, "bi")
    bar = fig["data"][0]
    ids = calibration_ids(lm.tokenizer, store.session(sid).calibration)
    # reference: BI_i = 1 - mean cos(h_i, h_i+1) from the model's own hidden states (last block: its output
    # is before the final norm, so compare the first n-1 blocks)
    hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(lm.num_blocks - 1):
        ref = 1 - F.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1).mean().item()
        assert bar["y"][i] == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert bar["customdata"] == list(range(4)) and set(bar["marker"]["color"]) == {blocks.COLOURS["kept"]}

    value, text = blocks.click(store, sid, "bi", 2)
    bar = json.loads(value)["data"][0]
    assert bar["marker"]["color"][2] == blocks.COLOURS["selected"] and "selected: **2**" in text
    assert bar["text"][2] == "selected"
    blocks.click(store, sid, "bi", 2)  # a second click deselects
    assert store.pending(sid) == []

    store.toggle(sid, 1)
    status, token = blocks.apply(store, sid, blocks.ApplyForm("prune", 8, 40, "gptq", 4, 64), progress=_no_progress)
    assert "v1" in status and token
    v = store.current(sid)
    bar = blocks.chart_figure(store, sid, "bi")["data"][0]
    assert bar["customdata"] == [0, 1, 2, 3]  # original indices after a drop
    assert bar["text"][1] == "dropped" and bar["hovertext"][1] == "n/a"
    assert bar["marker"]["color"][1] == blocks.COLOURS["dropped"]
    want = influence.block_scores(lm, v, ids.to(lm.device), "bi")["values"]
    assert [bar["y"][i] for i in (0, 2, 3)] == pytest.approx([want[i] for i in (0, 2, 3)])


def test_step_dicts_and_preview(store, sid):
    kept = [0, 1, 2, 3]
    assert blocks.step_for("prune", [3, 1], kept) == {"op": "prune_blocks", "blocks": [1, 3]}
    assert blocks.step_for("fuse", [2], kept, rank=4, steps=10) == {"op": "fuse_blocks", "blocks": [2], "rank": 4, "steps": 10,
                                                                    "guard_samples": 4, "guard_scales": [1.0, 0.5, 0.25]}
    assert blocks.step_for("quantize", [], kept, method="rtn", bits=8, group_size=32) == {
        "op": "quantize", "method": "rtn", "bits": 8, "group_size": 32, "observer": "minmax", "hessian_shrink": 0.0,
        "blocks": kept}
    assert blocks.step_for("quantize", [2], kept, observer="mse", shrink=0.4) == {
        "op": "quantize", "method": "gptq", "bits": 4, "group_size": 64, "observer": "mse", "hessian_shrink": 0.4,
        "blocks": [2]}
    with pytest.raises(RecipeError, match="select blocks"):
        blocks.step_for("prune", [], kept)
    assert blocks.preview_text(store, sid, "prune") == ""
    store.toggle(sid, 3)
    preview = blocks.preview_text(store, sid, "prune")
    q = ev.quick_eval(store.lm(sid), store.current(sid).with_dropped([3]))
    assert f"{q['kl']:.4f}" in preview and store.current(sid).is_identity()  # a preview makes no variant


def test_suggest_selects_the_least_important_blocks(store, sid):
    values = blocks.chart_figure(store, sid, "bi")["data"][0]["y"]
    _, text, note = blocks.suggest(store, sid, "bi", 2, progress=_no_progress)
    want = sorted(range(4), key=lambda i: values[i])[:2]
    assert store.pending(sid) == sorted(want) and f"selected: **{', '.join(map(str, sorted(want)))}**" in text
    assert str(want) in note and store.current(sid).is_identity()


def test_quantize_from_the_panel_tags_blocks(store, sid):
    store.set_calibration(sid, 2, 32)
    store.toggle(sid, 0)
    blocks.apply(store, sid, blocks.ApplyForm("quantize", 8, 40, "rtn", 8, 32), progress=_no_progress)
    v = store.current(sid)
    assert v.block_state(0).startswith("quantized") and v.kept() == [0, 1, 2, 3]
    bar = blocks.chart_figure(store, sid, "bi")["data"][0]
    assert bar["marker"]["color"][0] == blocks.COLOURS["quantized"]
    store.toggle(sid, 1)  # the mode's proposed GPTQ settings reach the recorded step
    blocks.apply(store, sid, blocks.ApplyForm("quantize", 8, 40, "gptq", 4, 32, blocks.DEFAULT_OBSERVER,
                                             blocks.DEFAULT_SHRINK), progress=_no_progress)
    step = store.current(sid).steps[-1]
    assert (step["observer"], step["hessian_shrink"], step["blocks"]) == ("mse", 0.4, [1])


def test_cancel_from_the_panel_leaves_the_variant(store, sid):
    store.set_calibration(sid, 2, 32)
    before = (store.current(sid), len(store.variants(sid)))
    status, token = blocks.apply(store, sid, blocks.ApplyForm("quantize", 8, 40, "rtn", 8, 32),
                                 progress=lambda *a, **k: store.cancel(sid))  # "Cancel" pressed mid-job
    assert status.startswith("Cancelled") and not isinstance(token, str)
    assert (store.current(sid), len(store.variants(sid))) == before


def test_blocks_apply_job_says_the_step_and_time_then_the_time_left(store, sid, monkeypatch):
    """The Blocks tab's Apply shows the job in words (not Gradio's 0.0 % bar): the step and the elapsed
    time during the first block, then the time left; the last yield is apply's own result."""
    import time

    real = store.apply_step

    def slow(s, step, progress=None, cancel=None):  # reports like the engine, slowly enough to be seen
        for i in range(len(step["blocks"])):
            progress(i / len(step["blocks"]), f"RTN block {step['blocks'][i]}")
            time.sleep(0.03)
        return real(s, step, progress, cancel)

    monkeypatch.setattr(store, "apply_step", slow)
    store.set_calibration(sid, 2, 32)
    for b in (0, 1):
        store.toggle(sid, b)
    seen = list(blocks.apply_job(store, sid, blocks.ApplyForm("quantize", 8, 40, "rtn", 8, 32), poll=0.005))
    lines = [y[0] for y in seen[:-1]]
    assert lines and all("elapsed" in line for line in lines)
    assert any(line.startswith("RTN block 0") and "left" not in line for line in lines)  # first block: no estimate
    assert any(line.startswith("RTN block 1") and "left" in line for line in lines)  # after it: the time left
    job, status, token = seen[-1]
    assert job == "" and "v1" in status and isinstance(token, str)
    assert store.current(sid).block_state(0).startswith("quantized")


def test_blocks_suggest_job_ends_with_the_suggestion(store, sid):
    store.set_calibration(sid, 2, 32)
    seen = list(blocks.suggest_job(store, sid, "bi", 2, poll=0.005))
    chart, selection, note = seen[-1]
    want = blocks.suggest(store, sid, "bi", 2, progress=_no_progress)
    assert note == want[2] and note.startswith("Suggested by bi")
    assert all(isinstance(y[2], str) and "elapsed" in y[2] for y in seen[:-1])


def test_guard_turns_workbench_errors_into_messages():
    from workbench.app import guard

    def bad():
        raise RecipeError("unknown op 'x'")

    def bad_gen():
        yield 1
        raise ExportError("exists")

    with pytest.raises(gr.Error, match="unknown op 'x'"):
        guard(bad)()
    g = guard(bad_gen)()
    assert next(g) == 1
    with pytest.raises(gr.Error, match="exists"):
        next(g)


# ---- model, compare, export panels ----------------------------------------------------------------
def test_model_panel(store, sid):
    assert model.spec_for("default", "") is None
    with pytest.raises(WorkbenchError):
        model.spec_for("local folder", " ")
    with pytest.raises(WorkbenchError):
        model.spec_for("GGUF file", "/x/model.bin")
    info, token = model.load(store, sid, "default", "", progress=_no_progress)
    assert "4 blocks" in info and "LlamaForCausalLM" in info and token
    with pytest.raises(WorkbenchError, match="no such model folder"):
        model.load(store, sid, "local folder", "/no/such/folder", progress=_no_progress)


def test_compare_streams_what_generate_produces(store, sid):
    lm = store.lm(sid)
    v = store.apply_step(sid, {"op": "prune_blocks", "blocks": [1]})
    outs = list(compare.generate_pair(store, sid, "Hello there", 12))
    final_o, final_v, speed = outs[-1]
    assert final_o == ev.generate(lm, store.variants(sid)[0], "Hello there", max_new_tokens=12)["text"]
    assert final_v == ev.generate(lm, v, "Hello there", max_new_tokens=12)["text"]
    assert all(final_v.startswith(o[1]) for o in outs if o[1] not in ("…", ""))
    assert "tokens/s" in speed
    assert compare._decode_rate([10.0, 10.5, 11.0, 11.5]) == pytest.approx(2.0)  # 3 tokens in 1.5 s
    assert compare._decode_rate([1.0, 2.0]) is None  # too few tokens to time decoding alone
    table = compare.figures_table(store, sid)
    assert f"{store.quick(sid, v)['kl']:.4f}" in table and "noisy" in table
    choices = compare.variant_choices(store, sid)
    assert [c[1] for c in choices] == [x.id for x in store.variants(sid)] and "current" in choices[-1][0]
    fig = compare.variants_plot(store, sid)
    assert list(fig.data[1].text) == ["original", v.name]  # data[0]: the Pareto front line
    compare.full_evaluation(store, sid, 512, progress=_no_progress)
    assert "perplexity, full" in compare.figures_table(store, sid)


def test_export_refuses_overwrite_and_reloads(store, sid, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = store.lm(sid)
    v = store.apply_step(sid, {"op": "prune_blocks", "blocks": [0, 2]})
    out = tmp_path / "out"
    msg = export.export(store, sid, str(out), False, progress=_no_progress)
    assert str(out) in msg
    with pytest.raises(ExportError, match="already exists"):
        export.export(store, sid, str(out), False, progress=_no_progress)
    export.export(store, sid, str(out), True, progress=_no_progress)
    assert json.loads((out / "recipe.json").read_text())["steps"] == v.steps
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (1, 16))
    assert torch.allclose(reloaded(input_ids=ids).logits, _logits(lm, v, ids), atol=1e-5)


def test_recipe_download_and_import_replay(store, sid, tmp_path):
    v = store.apply_step(sid, {"op": "prune_blocks", "blocks": [1]})
    path = export.recipe_file(store, sid)
    text = open(path).read()
    assert json.loads(text)["steps"] == [{"op": "prune_blocks", "blocks": [1]}]
    other = store.new_session()
    store.attach(other)
    msg, token = export.import_recipe(store, other, "", path, progress=_no_progress)
    w = store.current(other)
    assert w.dropped() == v.dropped() and "imported" in msg.lower()
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(_logits(store.lm(sid), w, ids), _logits(store.lm(sid), v, ids))
    with pytest.raises(RecipeError, match="not valid JSON"):
        export.import_recipe(store, other, "{oops", None, progress=_no_progress)
    with pytest.raises(RecipeError, match="unknown op"):
        export.import_recipe(store, other, json.dumps({"steps": [{"op": "nope"}]}), None, progress=_no_progress)
    assert store.current(other) is w


def test_refreshers_are_chained_after_every_event_that_changes_the_variant(store):
    """The shared trigger is wired server-side: no browser change event on it (those looped)."""
    from workbench.app import build_app

    demo = build_app(store=store)
    changed = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "wb-changed")
    fns = list(demo.fns.values())
    sources = [f for f in fns if any(o is changed for o in f.outputs)]
    assert {"start_session", "load_model", "apply", "undo", "import_recipe"} <= {f.api_name for f in sources}
    assert not any(t[0] == changed._id and t[1] == "change" for f in fns for t in f.targets)
    after = {}
    for f in fns:
        if f.trigger_after is not None and f.trigger_only_on_success:
            after.setdefault(f.trigger_after, []).append(f)
    counts = {len(after.get(s._id, [])) for s in sources}
    assert len(counts) == 1 and counts.pop() >= 4  # the same refreshers (model, blocks, compare x2, export...)


# ---- the app, over HTTP -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_app(store):
    from workbench.app import build_app, css

    demo = build_app(store=store)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, css=css(), quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_gradio_client_smoke(running_app, tmp_path):
    from gradio_client import Client

    demo, url = running_app
    assert demo.local_url.startswith("http://127.0.0.1:") and not demo.share
    client = Client(url, verbose=False)
    client.predict(api_name="/start_session")
    info, _ = client.predict("default", "", api_name="/load_model")
    assert "4 blocks" in info
    recipe = {"model": TINY_SPEC, "steps": [{"op": "prune_blocks", "blocks": [2]}]}
    msg, _ = client.predict(json.dumps(recipe), None, api_name="/import_recipe")
    assert "3/4 blocks" in msg
    orig, var, speed = client.predict("Hi", 6, api_name="/generate")
    assert isinstance(orig, str) and isinstance(var, str) and "tokens/s" in speed
    out = tmp_path / "exported"
    msg = client.predict(str(out), False, api_name="/export")
    assert (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    with pytest.raises(Exception, match="already exists"):
        client.predict(str(out), False, api_name="/export")


def test_fuse_step_keeps_click_order_prune_sorts():
    from workbench.panels.blocks import step_for

    assert step_for("fuse", [7, 3, 5], [0, 1, 2, 3, 4, 5, 6, 7])["blocks"] == [7, 3, 5]
    assert step_for("prune", [7, 3, 5], [0, 1, 2, 3, 4, 5, 6, 7])["blocks"] == [3, 5, 7]


def test_fuse_from_the_panel_lists_plain_removal_beside_it(store, sid):
    from workbench.engine.variant import DROP
    from workbench.panels import blocks

    store.toggle(sid, 2)
    status, _ = blocks.apply(store, sid, blocks.ApplyForm("fuse", 4, 2, "gptq", 4, 64), progress=_no_progress)
    names = [v.name for v in store.variants(sid)]
    fused = store.current(sid)
    plain = store.variants(sid)[-1]
    assert names == ["original", "v1", "v2"] and plain.description.startswith("plain removal of block 2")
    assert fused.overrides[2] is DROP and fused.replaced()  # neighbours replaced
    assert plain.dropped() == [2] and not plain.replaced() and plain is not fused
    assert "Plain removal of the same blocks → v2" in status and status.startswith("Fused block 2 into")
    assert store.quick(sid, plain)["kl"] >= 0


def test_chart_marks_outlier_blocks_once_the_outlier_analysis_ran(store, sid, monkeypatch):
    import workbench.engine.analysis.outliers as out
    from workbench.panels import blocks

    assert len(blocks.chart_figure(store, sid, "bi")["data"]) == 1  # nothing computed: no marks
    v = store.current(sid)
    stats = store.workspace(sid).outliers()
    # the tiny model has no outliers under the default rule; a looser rule flags some, as real models do
    monkeypatch.setattr(out, "outlier_blocks", lambda st, **kw: [{"block": 3}, {"block": 1}] if st is stats else [])
    assert blocks.outlier_marks(store, sid, v) == [1, 3]
    data = blocks.chart_figure(store, sid, "bi")["data"]
    assert len(data) == 2 and data[1]["x"] == [1, 3]
    assert blocks.outlier_marks(store, sid, v.with_dropped([0])) == []  # another variant: not analysed yet


def test_generations_use_the_chat_template_where_the_model_has_one():
    """Compare's generate: a tokenizer with a chat template gets the templated prompt (user turn and
    generation prompt), one without gets plain continuation; checked against model.generate by hand."""
    from tiny import tiny_bpe_tokenizer, tiny_model

    from workbench.engine.loading import wrap_model
    from workbench.engine.variant import original_variant

    model = tiny_model("llama", 2)
    tok = tiny_bpe_tokenizer()
    lm = wrap_model(model, tok, spec="tiny-chat", device="cpu")

    def by_hand(ids):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    chat_ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    plain_ids = tok("hello", return_tensors="pt")["input_ids"]
    assert chat_ids.shape[1] > plain_ids.shape[1]  # the template wraps the prompt: the two inputs differ
    assert ev.generate(lm, original_variant(2), "hello", max_new_tokens=6)["text"] == by_hand(chat_ids)
    tok.chat_template = None  # no template: plain continuation of the prompt
    assert ev.generate(lm, original_variant(2), "hello", max_new_tokens=6)["text"] == by_hand(plain_ids)
