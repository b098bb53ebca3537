"""What every panel is given: the shared `PanelContext`, the error `guard` and `progress_fn`.

Panels import this module at their top; it imports only gradio and the engine, never `workbench.*`
(the app imports the panels, so a panel importing the app would be an import cycle). The panel
contract itself (what `build(ctx)` gets and returns) is documented in `workbench/app.py`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from workbench.engine.errors import Cancelled, RecipeError, WorkbenchError

log = logging.getLogger(__name__)

HEAVY = {"concurrency_id": "heavy", "concurrency_limit": 1}


def _message(e: BaseException) -> gr.Error:
    if isinstance(e, Cancelled):
        return gr.Error(f"Cancelled: {e}. Nothing was changed.", title="Cancelled")
    if isinstance(e, WorkbenchError):
        return gr.Error(str(e), title=type(e).__name__)
    # an internal error: plain words in the page, the traceback in the server log
    log.error("internal error in a handler", exc_info=e)
    first = next((s for s in str(e).splitlines() if s.strip()), "")
    return gr.Error(f"Something went wrong inside the workbench ({type(e).__name__}{': ' + first[:200] if first else ''}). "
                    "Your session and its variants are unchanged; the server log has the details.",
                    title="Internal error")


def guard(fn):
    """Turn any failure into a gr.Error message (the page stays alive; outputs stay as they were):
    a WorkbenchError in its own words, anything else as an internal error (gr.Error passes through)."""
    if getattr(fn, "_wb_guarded", False) or fn is None:
        return fn
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise _message(e) from e

        gen._wb_guarded = True
        return gen
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return fn  # none of ours; left to gradio

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise _message(e) from e

    plain._wb_guarded = True
    return plain


@dataclass
class PanelContext:
    store: Any  # the workbench.store.Store (typed loosely: panels never import the app side)
    session: gr.State
    changed: gr.Textbox
    heavy: dict = field(default_factory=lambda: dict(HEAVY))
    components: dict = field(default_factory=dict)
    tabs: gr.Tabs | None = None  # the page's tabs, so a panel can open another one (e.g. a block's attention)

    guard = staticmethod(guard)

    @staticmethod
    def token() -> str:
        """A fresh value to return for `changed`: marks the event as one that changed the variant."""
        return str(time.time_ns())


def progress_fn(progress):
    """Adapt a gr.Progress (or any callable(frac, desc=)) to the engine's progress(frac, msg)."""
    if progress is None:
        return lambda frac, msg: None
    return lambda frac, msg: progress(float(frac), desc=msg)


# ---- typed forms ------------------------------------------------------------------------------------
# A handler with many settings takes one frozen dataclass (a "form"), not one positional parameter per
# component. The event lists its inputs as a set, `{sid, *fields.values()}`: Gradio then calls the
# handler with one dict keyed by component; `form_values` renames it by field, and the form's `parse`
# turns the raw widget values (a cleared number box gives None) into typed fields, each check naming
# the field it refuses.
def form_values(values: dict, fields: dict[str, Any]) -> dict[str, Any]:
    """{component: value} (what Gradio passes for a set of inputs) -> {field name: value}."""
    return {name: values[comp] for name, comp in fields.items()}


def whole(values: dict, name: str, default: int, error: type[WorkbenchError] = RecipeError) -> int:
    """The field `name` as a whole number (`default` when absent); a clear message (`error`) otherwise."""
    v = values.get(name, default)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise error(f"{name.replace('_', ' ')}: enter a whole number (got {v!r})") from None
    if not f.is_integer():
        raise error(f"{name.replace('_', ' ')}: enter a whole number (got {v!r})")
    return int(f)


def number(values: dict, name: str, default: float, error: type[WorkbenchError] = RecipeError) -> float:
    """The field `name` as a number (`default` when absent); a clear message (`error`) otherwise."""
    v = values.get(name, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise error(f"{name.replace('_', ' ')}: enter a number (got {v!r})") from None
