"""The web app: assembles the panels listed in `PANELS` into tabs.

Panel contract (how to add a panel)
-----------------------------------
A panel is a module `panels/<name>.py` (imported as `workbench.panels.<name>`) with

    def build(ctx: PanelContext) -> dict[str, gr.Component]

called inside its own `gr.Tab` (title: the module's `TITLE`, else the name capitalised). `ctx` gives:

- `ctx.store`: the `workbench.store.Store`; heavy state (models, variants, caches) lives there.
- `ctx.session`: a `gr.State` holding only this browser session's id; pass it as an input and call
  e.g. `ctx.store.lm(sid)`, `ctx.store.current(sid)`, `ctx.store.apply_step(sid, {...}, progress)`.
- `ctx.changed`: a hidden `gr.Textbox`, the shared "variant changed" trigger. A handler that changes the
  session's model or current variant lists it among its outputs and returns `ctx.token()`; every panel
  that shows the current variant refreshes with `ctx.changed.change(fn, inputs, outputs, **kwargs)`.
  That `.change` is not the browser's change event (two writes arriving together made the browser fire
  it over and over): it records the listener, and once every panel is built, `build_app` chains it with
  `.success(...)` after every event that lists `ctx.changed` among its outputs. It returns None, so
  chain nothing on it; register a second listener instead.
- `ctx.heavy`: keyword arguments for heavy events (`concurrency_id="heavy", concurrency_limit=1`), so
  long jobs queue rather than run two at once.
- `ctx.guard(fn)`: wrap a handler so a `WorkbenchError` becomes a message (gr.Error toast), never a dead
  page; works for plain and generator handlers.
- `ctx.components`: the components of panels built before this one, by panel name (read-only use).

The model is shared by all sessions and hooks registered on it fire in every thread: any engine call that
runs the model (an analysis, a generation) must hold it, `with ctx.store.using(sid) as lm: ...`. The
store's own methods (apply_step, quick, scores, full_eval, export, ...) already do.

Handlers are plain functions with typed parameters that tests call without a browser; long work takes
`progress=gr.Progress()` and yields. Keep panel files short. Block indices shown are always the
original model's 0-based indices.

To add a panel: create `panels/<name>.py` and add `"<name>"` to `PANELS` (a one-line edit).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from workbench.engine.errors import Cancelled, WorkbenchError
from workbench.engine.loading import DEFAULT_MODEL
from workbench.store import Store

log = logging.getLogger(__name__)

PANELS = ["workbench", "model", "blocks", "influence", "compare", "export", "attention", "outliers", "map", "attribution", "sparsity"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
HEAVY = {"concurrency_id": "heavy", "concurrency_limit": 1}


def _message(e: WorkbenchError) -> gr.Error:
    if isinstance(e, Cancelled):
        return gr.Error(f"Cancelled: {e}. Nothing was changed.", title="Cancelled")
    return gr.Error(str(e), title=type(e).__name__)


def guard(fn):
    """Turn WorkbenchError into a gr.Error message (the page stays alive; outputs stay as they were)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except WorkbenchError as e:
                raise _message(e) from e

        return gen

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WorkbenchError as e:
            raise _message(e) from e

    return plain


class ChangeTrigger:
    """Listeners of the shared "variant changed" trigger, chained server-side (see the module doc)."""

    def __init__(self, component: gr.Textbox):
        self.component = component
        self.listeners: list[tuple] = []

    def change(self, fn, inputs=None, outputs=None, **kwargs) -> None:
        self.listeners.append((fn, inputs, outputs, kwargs))

    def wire(self, demo: gr.Blocks) -> int:
        """Chain every listener after each event that outputs to the trigger. -> events chained."""
        from gradio.events import EventListener  # what Dependency.success uses, for events made earlier

        sources = [bf for bf in list(demo.fns.values()) if any(o is self.component for o in bf.outputs)]
        for bf in sources:
            for fn, inputs, outputs, kwargs in self.listeners:
                EventListener("success", trigger_after=bf._id, trigger_only_on_success=True,
                              has_trigger=False).listener(self.component, fn, inputs, outputs, **kwargs)
        return len(sources)


@dataclass
class PanelContext:
    store: Store
    session: gr.State
    changed: gr.Textbox
    heavy: dict = field(default_factory=lambda: dict(HEAVY))
    components: dict = field(default_factory=dict)

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


def start_session(store: Store, progress=gr.Progress()) -> tuple[str, str]:
    """A new session id with the store's default model attached (loaded once, shared by sessions)."""
    sid = store.new_session()
    try:
        store.attach(sid, None, progress_fn(progress))
    except WorkbenchError as e:  # the page still opens: the Model tab can load another model
        gr.Warning(f"could not load the default model: {e}")
    return sid, PanelContext.token()


def build_app(model: str = DEFAULT_MODEL, device: str = "auto", store: Store | None = None, allow_pickle: bool = False) -> gr.Blocks:
    """Build the Blocks app. `store` lets tests pass one with an in-memory model registered."""
    store = store or Store(default_model=model or DEFAULT_MODEL, device=device, allow_pickle=allow_pickle)
    with gr.Blocks(title="Compression Workbench") as demo:
        gr.Markdown("## Compression Workbench", elem_id="wb-title")
        # a plain function, not the bound method: gradio deep-copies the page config, and a bound method
        # would drag the whole store (models included) into that copy on every page load.
        session = gr.State(None, delete_callback=lambda sid: store.drop_session(sid))
        changed = gr.Textbox(visible=False, elem_id="wb-changed", label="changed")
        trigger = ChangeTrigger(changed)
        changed.change = trigger.change  # panels register refreshers; wired below, server-side
        ctx = PanelContext(store=store, session=session, changed=changed)
        for name in PANELS:
            mod = importlib.import_module(f"workbench.panels.{name}")
            with gr.Tab(getattr(mod, "TITLE", name.capitalize()), id=name):
                ctx.components[name] = mod.build(ctx)
        demo.load(functools.partial(start_session, store), outputs=[session, changed], api_name="start_session")
        trigger.wire(demo)
    demo.workbench_store = store
    return demo


def css() -> str:
    p = ASSETS / "app.css"
    return p.read_text() if p.is_file() else ""


def launch(model: str | None = DEFAULT_MODEL, host: str = "127.0.0.1", port: int | None = 7860, device: str = "auto",
           allow_pickle: bool = False, block: bool = True, load: dict | None = None, **kwargs):
    """Load the model first (so the page opens ready), then serve on host:port; never a share link.
    `load`: further load_model options (dtype, max_memory, offload_folder) for every model the app loads."""
    store = Store(default_model=model or DEFAULT_MODEL, device=device, allow_pickle=allow_pickle, **(load or {}))
    store.model(store.default_model, progress=lambda f, m: print(f"[{f * 100:5.1f}%] {m}", flush=True))
    demo = build_app(model=store.default_model, device=device, store=store)
    demo.queue(default_concurrency_limit=4)
    # Open a browser tab only where there is a desktop to show it (a headless server has none).
    desktop = sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    kwargs.setdefault("inbrowser", desktop)
    return demo.launch(server_name=host, server_port=port, share=False, css=css(), prevent_thread_lock=not block, **kwargs)
