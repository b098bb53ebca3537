"""Typed forms: handlers with many settings take one frozen dataclass parsed from the dict Gradio passes
for a set of inputs (one value per component). The parse functions against hand-written cases, and the
app's own events called the way Gradio calls them."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from workbench.engine.errors import RecipeError, WorkbenchError
from workbench.panels import attention, blocks, sparsity
from workbench.panels.context import form_values, number, whole



@pytest.fixture
def store_sid(tiny_store):
    return tiny_store(calibration=(2, 32))


def test_field_parsers_take_widget_values_and_name_the_field_they_refuse():
    assert whole({"bits": 4.0}, "bits", 8) == 4 and whole({}, "bits", 8) == 8  # a Number box gives floats
    assert number({"shrink": "0.25"}, "shrink", 0.0) == 0.25 and number({}, "shrink", 0.1) == 0.1
    for bad in (None, "", "four", 2.5, float("nan")):
        with pytest.raises(RecipeError, match="^group size: enter a whole number"):
            whole({"group_size": bad}, "group_size", 64)
    with pytest.raises(WorkbenchError, match="^damping: enter a number") as e:
        number({"damping": None}, "damping", 0.85, WorkbenchError)
    assert type(e.value) is WorkbenchError
    assert form_values({"c1": 1, "c2": "x", "other": 0}, {"a": "c1", "b": "c2"}) == {"a": 1, "b": "x"}


def test_apply_form_parses_what_the_widgets_give_and_makes_the_same_step():
    raw = {"mode": "quantize", "rank": 8.0, "steps": 16.0, "method": "gptq", "bits": 4, "group_size": 32,
           "observer": "mse", "shrink": 0.4}
    form = blocks.ApplyForm.parse(raw)
    assert form == blocks.ApplyForm("quantize", 8, 16, "gptq", 4, 32, "mse", 0.4)
    assert (form.sp_method, form.sparsity) == ("wanda", 0.5)  # the Blocks tab has no sparsify fields: defaults
    assert form.step([2], [0, 1, 2, 3]) == {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32,
                                            "observer": "mse", "hessian_shrink": 0.4, "blocks": [2]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        form.bits = 8
    with pytest.raises(RecipeError, match="^rank: enter a whole number"):
        blocks.ApplyForm.parse({**raw, "rank": None})  # a cleared number box: a message, not a TypeError


def test_sweep_and_attention_forms():
    f = sparsity.SweepForm.parse({"methods": ["wanda"], "patterns": [], "points": 5.0, "max_sparsity": 0.8,
                                  "eval_tokens": 0, "tolerance_pct": 2, "magnitude_scope": "layer", "log_y": False})
    assert f == sparsity.SweepForm(("wanda",), (), 5, 0.8, 0, 2.0, "layer", False)
    with pytest.raises(RecipeError, match="choose at least one method"):
        sparsity.SweepForm.parse({"methods": [], "patterns": ["2:4"]})
    a = attention.AttentionForm.parse({"prompt": "Hi", "which": "original", "damping": 0.9, "skip_first": True,
                                       "block": "3", "head": None})
    assert a == attention.AttentionForm("Hi", "original", 0.9, True, 3, "avg")
    assert attention.AttentionForm.parse({"block": ""}).block is None
    with pytest.raises(WorkbenchError, match="^block: enter a whole number"):
        attention.AttentionForm.parse({"block": "three"})


def _event(demo, api_name=None, elem_id=None):
    for bf in demo.fns.values():
        if api_name is not None and bf.api_name == api_name:
            return bf
        if elem_id is not None and any(getattr(demo.blocks.get(t[0]), "elem_id", None) == elem_id for t in bf.targets):
            return bf
    raise AssertionError(f"no event {api_name or elem_id}")


def test_the_apps_form_events_get_one_dict_keyed_by_component(store, sid):
    """The Apply and Show-attention events take a set of inputs; Gradio's own call path (call_function,
    which zips the component values into the dict) reaches the handler, which parses its form."""
    from workbench.app import build_app

    demo = build_app(store=store)
    apply_ev = _event(demo, api_name="apply")  # the Blocks tab's Apply
    assert apply_ev.inputs_as_dict
    session = next(c for c in apply_ev.inputs if c.__class__.__name__ == "State")
    labels = {getattr(c, "label", None): c for c in apply_ev.inputs}
    settings = {"Mode": "quantize", "quantize: method": "rtn", "quantize: bits": 8, "quantize: group size": 32,
                "quantize: scales": "minmax"}
    values = [sid if c is session else settings.get(c.label, c.value) for c in apply_ev.inputs]
    assert set(settings) <= set(labels)
    store.toggle(sid, 1)
    out = asyncio.run(demo.call_function(apply_ev, values))
    while out.get("iterator") is not None:  # a generator handler: drain it as the queue does
        out = asyncio.run(demo.call_function(apply_ev, values, iterator=out["iterator"]))
        if out["is_generating"] is False:
            break
    step = store.current(sid).steps[-1]
    assert (step["op"], step["method"], step["bits"], step["group_size"], step["blocks"]) == ("quantize", "rtn", 8, 32, [1])

    show = _event(demo, elem_id="wb-attention-go")
    assert show.inputs_as_dict
    values = [sid if c.__class__.__name__ == "State" else c.value for c in show.inputs]
    out = asyncio.run(demo.call_function(show, values))
    info = out["prediction"][3]
    assert info == attention.render(store, sid, attention.AttentionForm())[3]
