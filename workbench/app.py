"""The web app: assembles the panels listed in `PANELS` into tabs.

Panel contract (how to add a panel)
-----------------------------------
A panel is a module `panels/<name>.py` (imported as `workbench.panels.<name>`) with

    def build(ctx: PanelContext) -> dict[str, gr.Component]

where `PanelContext` (and `progress_fn`) come from `workbench.panels.context`, imported at the panel's
top; a panel never imports `workbench.app` (nor anything else of `workbench.*` but the engine and panels).

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
`progress=gr.Progress()` and yields. A handler with many settings takes one frozen form dataclass
(`blocks.ApplyForm`, `sparsity.SweepForm`, `attention.AttentionForm`): its event lists the inputs as a
set, Gradio passes one dict keyed by component, and the form's `parse` checks each field (helpers in
`panels/context.py`). Keep panel files short. Block indices shown are always the
original model's 0-based indices.

To add a panel: create `panels/<name>.py` and add `"<name>"` to `PANELS` (a one-line edit).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from pathlib import Path

import gradio as gr

from workbench.engine.errors import WorkbenchError
from workbench.engine.loading import DEFAULT_MODEL
# the panels' shared context lives with the panels; re-exported here for callers of workbench.app
from workbench.panels.context import HEAVY, PanelContext, _message, guard, progress_fn  # noqa: F401
from workbench.store import DEFAULT_BUDGET, DEFAULT_IDLE, Store

log = logging.getLogger(__name__)

PANELS = ["workbench", "model", "blocks", "influence", "compare", "export", "attention", "outliers", "map", "attribution", "sparsity"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def guard_all(demo: gr.Blocks) -> int:
    """Guard every event handler of the app, panels' unguarded ones included. -> handlers wrapped."""
    n = 0
    for bf in demo.fns.values():
        if bf.fn is not None and not getattr(bf.fn, "_wb_guarded", False):
            wrapped = guard(bf.fn)
            n += wrapped is not bf.fn
            bf.fn = wrapped
    return n


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
        with gr.Tabs() as ctx.tabs:
            mods = [importlib.import_module(f"workbench.panels.{name}") for name in PANELS]
            for name, mod in zip(PANELS, mods):
                with gr.Tab(getattr(mod, "TITLE", name.capitalize()), id=name):
                    ctx.components[name] = mod.build(ctx)
        for mod in mods:  # events that reach into a panel built later (a panel's optional `wire(ctx)`)
            if hasattr(mod, "wire"):
                mod.wire(ctx)
        demo.load(functools.partial(start_session, store), outputs=[session, changed], api_name="start_session")
        trigger.wire(demo)
        guard_all(demo)
    demo.workbench_store = store
    return demo


def css() -> str:
    p = ASSETS / "app.css"
    return p.read_text() if p.is_file() else ""


def is_loopback(host: str) -> bool:
    import ipaddress

    h = (host or "").strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """`user:password` lines (blank lines and # comments skipped) -> Gradio's auth list."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"cannot read the auth file {p}: {getattr(e, 'strerror', None) or e}") from e
    pairs = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, pw = line.partition(":")
        if not sep or not user.strip() or not pw:
            raise WorkbenchError(f"{p} line {n}: expected user:password")
        pairs.append((user.strip(), pw))
    if not pairs:
        raise WorkbenchError(f"{p} holds no user:password line")
    return pairs


def check_exposure(host: str, auth_file: str | None, no_auth: bool) -> list[tuple[str, str]] | None:
    """A host other than loopback needs --auth-file or an explicit --no-auth. -> Gradio's auth (or None);
    prints what the choice means for whoever can reach the machine."""
    if auth_file and no_auth:
        raise WorkbenchError("--auth-file and --no-auth contradict each other: choose one")
    auth = read_auth_file(auth_file) if auth_file else None
    if is_loopback(host):
        return auth
    if auth is None and not no_auth:
        raise WorkbenchError(f"--host {host} serves beyond this machine: anyone who can reach it could use the app "
                             "(load models, write folders); pass --auth-file FILE (user:password lines) to require "
                             "a login, or --no-auth to accept that")
    if auth is None:
        print(f"warning: serving on {host} without a login: anyone who can reach this machine can use the app",
              file=sys.stderr, flush=True)
    else:
        print(f"warning: serving on {host} over plain HTTP: passwords travel in clear; put it behind HTTPS "
              "(a reverse proxy) or an SSH tunnel on an untrusted network", file=sys.stderr, flush=True)
    return auth


def launch(model: str | None = DEFAULT_MODEL, host: str = "127.0.0.1", port: int | None = 7860, device: str = "auto",
           allow_pickle: bool = False, block: bool = True, load: dict | None = None, auth_file: str | None = None,
           no_auth: bool = False, session_idle: float | None = DEFAULT_IDLE, memory_budget: int | None = DEFAULT_BUDGET,
           **kwargs):
    """Load the model first (so the page opens ready), then serve on host:port; never a share link.
    `load`: further load_model options (dtype, max_memory, offload_folder) for every model the app loads.
    A host other than loopback needs `auth_file` (or `no_auth`); see `check_exposure`."""
    from workbench.engine.safe_folder import install_signal_cleanup, sweep_remembered

    auth = check_exposure(host, auth_file, no_auth)
    swept = sweep_remembered()  # temp folders of exports whose process was killed
    if swept:
        print(f"removed {len(swept)} leftover temporary export folder(s)", flush=True)
    install_signal_cleanup()
    store = Store(default_model=model or DEFAULT_MODEL, device=device, allow_pickle=allow_pickle,
                  memory_budget=memory_budget, session_idle=session_idle, notify=_notify, **(load or {}))
    store.model(store.default_model, progress=lambda f, m: print(f"[{f * 100:5.1f}%] {m}", flush=True))
    demo = build_app(model=store.default_model, device=device, store=store)
    demo.queue(default_concurrency_limit=4)
    store.start_expiry()
    # Open a browser tab only where there is a desktop to show it (a headless server has none).
    desktop = sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    kwargs.setdefault("inbrowser", desktop)
    if auth:
        kwargs["auth"] = auth
    try:
        out = demo.launch(server_name=host, server_port=port, share=False, css=css(), prevent_thread_lock=not block,
                          **kwargs)
    except BaseException:
        store.close()
        raise
    if block:
        store.close()
    return out


def _notify(msg: str) -> None:
    """Tell the session (a toast when called inside an event), else the log."""
    try:
        gr.Info(msg)
    except Exception:  # outside an event gradio has nobody to tell
        log.info("%s", msg)
