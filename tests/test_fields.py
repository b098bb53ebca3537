"""The shared step-field checks: each refusal is the one-line message the steps gave before they shared
the helper (hand-written here), and what passes comes back normalised."""

from __future__ import annotations

import math

import pytest

from workbench.engine import fields
from workbench.engine.errors import RecipeError
from workbench.engine.recipe import step_from_dict


def test_block_list():
    assert fields.block_list([3, 1, 3], "blocks", "prune_blocks") == (3, 1, 3)
    for bad in ([1, True], "1,2", [1.0], 5):
        with pytest.raises(RecipeError) as e:
            fields.block_list(bad, "blocks", "prune_blocks")
        assert str(e.value) == f"step 'prune_blocks': 'blocks' must be a list of block indices, got {bad!r}"


def test_integer_boolean_number():
    assert fields.integer(2, "k", "fuse_blocks", 1) == 2
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(RecipeError, match=r"^step 'fuse_blocks': 'k' must be an integer >= 1, got "):
            fields.integer(bad, "k", "fuse_blocks", 1)
    assert fields.boolean(False, "sym", "quantize") is False
    with pytest.raises(RecipeError) as e:
        fields.boolean(1, "sym", "quantize")
    assert str(e.value) == "step 'quantize': 'sym' must be true or false, got 1"
    assert fields.number(0, "damp", "quantize", 0, 1, high_open=True) == 0
    for bad in (1, 1.0, -0.1, math.nan, True, "0.1"):
        with pytest.raises(RecipeError) as e:
            fields.number(bad, "damp", "quantize", 0, 1, high_open=True)
        assert str(e.value) == f"step 'quantize': 'damp' must be a number in [0, 1), got {bad!r}"
    assert fields.number(1, "hessian_shrink", "quantize", 0, 1) == 1
    with pytest.raises(RecipeError, match=r"must be a number in \[0, 1\], got 1.5$"):
        fields.number(1.5, "hessian_shrink", "quantize", 0, 1)
    assert fields.number(0.05, "lr", "fuse_blocks") == 0.05
    for bad in (-1, math.inf, math.nan, False):
        with pytest.raises(RecipeError) as e:
            fields.number(bad, "lr", "fuse_blocks")
        assert str(e.value) == f"step 'fuse_blocks': 'lr' must be a non-negative number, got {bad!r}"


@pytest.mark.parametrize("step, message", [
    ({"op": "quantize", "damp": 1}, "step 'quantize': 'damp' must be a number in [0, 1), got 1"),
    ({"op": "quantize", "blocks": [0, "1"]}, "step 'quantize': 'blocks' must be a list of block indices, got [0, '1']"),
    ({"op": "quantize", "true_sequential": "yes"}, "step 'quantize': 'true_sequential' must be true or false, got 'yes'"),
    ({"op": "fuse_blocks", "k": 1, "steps": -1}, "step 'fuse_blocks': 'steps' must be an integer >= 0, got -1"),
    ({"op": "fuse_blocks", "k": 1, "lr": -0.5}, "step 'fuse_blocks': 'lr' must be a non-negative number, got -0.5"),
    ({"op": "fuse_blocks", "blocks": [True]}, "step 'fuse_blocks': 'blocks' must be a list of block indices, got [True]"),
    ({"op": "prune_blocks", "blocks": [1.5]}, "step 'prune_blocks': 'blocks' must be a list of block indices, got [1.5]"),
    ({"op": "sparsify", "sparsity": 0.5, "blocks": [None]},
     "step 'sparsify': 'blocks' must be a list of block indices, got [None]"),
])
def test_steps_refuse_with_their_field_named(step, message):
    with pytest.raises(RecipeError) as e:
        step_from_dict(step)
    assert str(e.value) == message
