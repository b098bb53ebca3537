"""Validation of recipe-step fields, shared by every step's `__post_init__`.

Each helper returns the value (normalised where a step stores it so, e.g. a block list as a tuple) or
raises `RecipeError` with one line that names the step and the field: "step 'quantize': 'damp' must be
a number in [0, 1), got 2". The CLI checks its flags earlier, while parsing (`workbench/validate.py`);
these checks guard recipes read from JSON and steps built in code.
"""

from __future__ import annotations

import math

from .errors import RecipeError


def _fail(op: str, name: str, what: str, value) -> RecipeError:
    return RecipeError(f"step '{op}': '{name}' must be {what}, got {value!r}")


def block_list(value, name: str, op: str) -> tuple[int, ...]:
    """A list (or tuple) of block indices (ints, not bools) -> a tuple, order and repeats kept."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        raise _fail(op, name, "a list of block indices", value)
    return tuple(value)


def integer(value, name: str, op: str, low: int = 0) -> int:
    """An int (not a bool) >= low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _fail(op, name, f"an integer >= {low}", value)
    return value


def boolean(value, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(op, name, "true or false", value)
    return value


def number(value, name: str, op: str, low: float | None = None, high: float | None = None,
           high_open: bool = False) -> float:
    """A real number (int or float, not a bool, not NaN) in [low, high] ([low, high) with `high_open`);
    with neither bound: non-negative and finite."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if low is None and high is None:
        if not ok or not value >= 0 or math.isinf(value):
            raise _fail(op, name, "a non-negative number", value)
        return value
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    inside = ok and lo <= value and (value < hi if high_open else value <= hi)
    if not inside:
        raise _fail(op, name, f"a number in [{_fmt(lo)}, {_fmt(hi)}{')' if high_open else ']'}", value)
    return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
