"""Session store: the model registry and the map from browser session to workspace.

One loaded model per model spec, shared by every session (loaded once, under a lock), with one shared
result cache for its original's results. Each session has its own engine Workspace (variants, undo, the
pending selection, the calibration choice, its result cache: engine/workspace.py). Panels call the
methods below or ask the workspace; they never write its state.

A job that fails or is cancelled leaves the session exactly as it was: the new variant is attached only
after the step returned.

Memory: the store keeps what it holds (replacement blocks, cached results; see `workbench.budget`)
within `memory_budget` bytes. Over it, cached results go first, then the replacement blocks of the
oldest variants that are no session's current one. A released variant stays listed; switching to it
(or asking its figures) rebuilds it from the steps and calibration that made it, bit for bit, and the
session is told. Sessions idle longer than `session_idle` seconds expire (a running job finishes first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from workbench.engine.errors import WorkbenchError
from workbench.engine.export import export_any
from workbench.engine.loading import DEFAULT_MODEL, LoadedModel, load_model
from workbench.engine.results import ResultCache
from workbench.engine.variant import Variant
from workbench.engine.workspace import RELEASED, Workspace, new_results  # noqa: F401  (RELEASED: tests)
from workbench import budget as B

log = logging.getLogger(__name__)


def _quiet(frac: float, msg: str) -> None:
    log.info("%3.0f%% %s", frac * 100, msg)


class SessionError(WorkbenchError):
    """The browser session is unknown (expired) or has no model yet."""


@dataclass
class Session:
    """A browser session: its workspace (None until a model is attached) and its job bookkeeping."""

    id: str
    spec: str | None = None  # model key; None until a model is attached
    workspace: Workspace | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # computations running for this session (an idle session with a job is kept)

    # read-only views of the workspace, for panels that only show them
    @property
    def current(self) -> Variant | None:
        return self.workspace.current if self.workspace else None

    @property
    def variants(self) -> list[Variant]:
        return list(self.workspace.variants) if self.workspace else []

    @property
    def calibration(self):
        return self.workspace.calibration if self.workspace else None

    @property
    def released(self) -> set[int]:
        return set(self.workspace.released) if self.workspace else set()


DEFAULT_BUDGET = 2 * 2**30
DEFAULT_IDLE = 2 * 3600.0


LOAD_SEP = "@load="


def model_key(spec: str, dtype: str | None = None, max_memory: str | None = None, offload_folder: str | None = None) -> str:
    """The store's key for a checkpoint loaded with the Model panel's choices (precision, memory plan);
    none given (or auto): the plain spec, loaded with the store's own options."""
    opts = {k: v for k, v in (("dtype", dtype), ("max_memory", max_memory), ("offload_folder", offload_folder))
            if v and v != "auto"}
    return f"{spec}{LOAD_SEP}{json.dumps(opts, sort_keys=True)}" if opts else spec


class Store:
    """Models shared by spec; sessions by id. Thread-safe for the operations the app performs."""

    def __init__(self, default_model: str = DEFAULT_MODEL, device: str = "auto", allow_pickle: bool = False,
                 memory_budget: int | None = DEFAULT_BUDGET, session_idle: float | None = DEFAULT_IDLE, notify=None,
                 **load):
        self.memory_budget = memory_budget
        self.session_idle = session_idle
        self.notify = notify or (lambda msg: log.info("%s", msg))
        self._stop = threading.Event()
        self._expiry: threading.Thread | None = None
        self.default_model = default_model
        self.device = device
        self.allow_pickle = allow_pickle
        self.load_options = load  # further load_model options: dtype, max_memory, offload_folder
        self._models: dict[str, LoadedModel] = {}
        self._shared: dict[str, ResultCache] = {}  # model key -> the original's results, for every session
        self._sessions: dict[str, Session] = {}
        self._model_lock = threading.Lock()
        self._use_locks: dict[str, threading.RLock] = {}
        self._lock = threading.Lock()

    # ---- models ---------------------------------------------------------------------------------
    def register_model(self, lm: LoadedModel, spec: str | None = None) -> str:
        """Make an in-memory model (tests: a tiny one) available under `spec` (default: lm.spec)."""
        spec = spec or lm.spec
        with self._model_lock:
            self._models[spec] = lm
            self._shared[spec] = new_results()
        return spec

    def model(self, spec: str | None = None, progress=_quiet) -> LoadedModel:
        """The model for `spec`, loaded once. A key from model_key (the Model panel's precision and memory
        choices) is the same checkpoint loaded with those options: another model."""
        key = (spec or self.default_model).strip()
        spec, _, extra = key.partition(LOAD_SEP)
        with self._model_lock:  # one load at a time; the second asker gets the cached model
            lm = self._models.get(key)
            if lm is None:
                opts = {**self.load_options, **(json.loads(extra) if extra else {})}
                lm = load_model(spec, device=self.device, allow_pickle=self.allow_pickle, progress=progress, **opts)
                self._models[key] = lm
                self._shared[key] = new_results()
            return lm

    def loaded_specs(self) -> list[str]:
        return list(self._models)

    @contextlib.contextmanager
    def using(self, sid: str):
        """Hold the session's model for a computation. Hooks (block traces) are registered on the shared
        model's modules and fire in every thread, so two computations must never run it at once."""
        spec = self.session(sid).spec
        with self._model_lock:
            lock = self._use_locks.setdefault(spec, threading.RLock())
        s = self.session(sid)
        with lock:
            s.busy += 1
            try:
                yield self.lm(sid)
            finally:
                s.busy -= 1
                s.last_used = time.monotonic()
        self.enforce_budget()

    # ---- sessions -------------------------------------------------------------------------------
    def new_session(self) -> str:
        sid = uuid.uuid4().hex
        with self._lock:
            self._sessions[sid] = Session(id=sid)
        return sid

    def drop_session(self, sid) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def session(self, sid: str | None) -> Session:
        if not sid:
            raise SessionError("the page is still starting: try again in a moment")
        s = self._sessions.get(sid)
        if s is None:
            raise SessionError("this browser session has expired: reload the page")
        s.last_used = time.monotonic()
        return s

    def attach(self, sid: str, spec: str | None = None, progress=_quiet, dtype: str | None = None,
               max_memory: str | None = None, offload_folder: str | None = None) -> LoadedModel:
        """Load (or reuse) a model and make it the session's; a different model starts a new workspace
        (the calibration choice carries over)."""
        s = self.session(sid)
        spec = model_key((spec or self.default_model).strip(), dtype, max_memory, offload_folder)
        lm = self.model(spec, progress)
        if s.spec != spec or s.workspace is None:
            calib = s.workspace.calibration if s.workspace else None
            s.spec = spec
            s.workspace = Workspace(lm, calib, shared=self._shared[spec], guard=lambda: self.using(sid),
                                    notify=self.notify)
        return lm

    def workspace(self, sid: str) -> Workspace:
        s = self.session(sid)
        if s.workspace is None:
            raise SessionError("no model is loaded yet: load one in the Model tab")
        return s.workspace

    def lm(self, sid: str) -> LoadedModel:
        return self.workspace(sid).lm

    def current(self, sid: str) -> Variant:
        return self.workspace(sid).current

    # ---- pending selection ----------------------------------------------------------------------
    def toggle(self, sid: str, block: int) -> list[int]:
        return self.workspace(sid).toggle(block)

    def set_pending(self, sid: str, blocks) -> list[int]:
        return self.workspace(sid).set_pending(blocks)

    def clear_pending(self, sid: str) -> None:
        self.workspace(sid).clear_pending()

    def pending(self, sid: str) -> list[int]:
        return self.workspace(sid).pending()

    def pending_in_order(self, sid: str) -> list[int]:
        """The selection in the order the blocks were clicked (fusion runs in that order)."""
        return self.workspace(sid).pending_in_order()

    def set_calibration(self, sid: str, samples: int, seq_len: int):
        return self.workspace(sid).set_calibration(samples, seq_len)

    def calib_ids(self, sid: str):
        """The session's calibration windows on the model's device."""
        return self.workspace(sid).calib_ids()

    # ---- variants -------------------------------------------------------------------------------
    def apply_step(self, sid: str, step: dict, progress=_quiet, cancel: threading.Event | None = None) -> Variant:
        """Apply one recipe step to the current variant; the new variant becomes current."""
        return self.apply_steps(sid, [step], progress=progress, cancel=cancel)

    def apply_steps(self, sid: str, steps: list[dict], progress=_quiet, cancel=None, base: Variant | None = None) -> Variant:
        ws = self.workspace(sid)
        new = ws.build(steps, progress=progress, cancel=cancel or self.session(sid).cancel, base=base)
        ws.push(new)
        self.enforce_budget()
        return new

    def add_sibling(self, sid: str, variant: Variant) -> Variant:
        """List a variant for comparison without making it current (e.g. plain removal beside fusion)."""
        return self.workspace(sid).add_sibling(variant)

    def undo(self, sid: str) -> Variant:
        return self.workspace(sid).undo()

    def switch(self, sid: str, variant_id: int) -> Variant:
        return self.workspace(sid).switch(variant_id)

    def variants(self, sid: str) -> list[Variant]:
        return list(self.workspace(sid).variants)

    # ---- recipes and export ---------------------------------------------------------------------
    def recipe_of(self, sid: str, variant: Variant | None = None) -> dict:
        """The recipe that replays the variant, with the calibration its steps ran with."""
        return self.workspace(sid).recipe_of(variant)

    def import_recipe(self, sid: str, text: str, progress=_quiet, cancel=None) -> Variant:
        """Replay a recipe JSON from the original model (the recipe's calibration is adopted)."""
        v = self.workspace(sid).replay(text, progress, cancel or self.session(sid).cancel)
        self.enforce_budget()
        return v

    def export(self, sid: str, out_dir: str, overwrite: bool = False, progress=_quiet, fmt: str | None = None,
               gguf_type: str | None = None) -> Path:
        """Export the current variant (`fmt` None: its default format, see export.default_format)."""
        ws = self.workspace(sid)
        v = ws.current
        q = ws.quick(v)
        metrics = {f"quick_{k}": q[k] for k in ("kl", "top1", "ppl", "tokens")}
        metrics.update({"parameters": q["parameters"], "bytes": q["bytes"]})
        full = ws.peek(v, "full")
        if full:
            metrics.update({f"full_{k}": full[k] for k in ("kl", "top1", "ppl", "ppl_original", "tokens") if k in full})
        with self.using(sid) as lm:
            out, _ = export_any(lm, v, out_dir, ws.recipe_of(v), fmt=fmt, gguf_type=gguf_type, metrics=metrics,
                                overwrite=overwrite, progress=progress)
            return out

    # ---- figures --------------------------------------------------------------------------------
    def figures(self, sid: str, variant: Variant) -> dict:
        """What has been measured for the variant (read only): {"quick", "full", "tps"} where known."""
        return self.workspace(sid).figures(variant)

    def quick(self, sid: str, variant: Variant | None = None) -> dict:
        """Quick-set figures of a variant (cached per variant: variants never change once made)."""
        return self.workspace(sid).quick(variant)

    def preview(self, sid: str) -> dict | None:
        """Quick figures of the current variant with the pending blocks dropped (not kept as a variant)."""
        return self.workspace(sid).preview()

    def full_eval(self, sid: str, progress=_quiet, cancel=None, max_tokens: int | None = 4096) -> dict:
        return self.workspace(sid).full_eval(progress, cancel or self.session(sid).cancel, max_tokens)

    def scores(self, sid: str, metric: str, progress=None, cancel=None) -> dict:
        """Per-block scores of the current variant on the session's calibration ids (cached)."""
        return self.workspace(sid).scores(metric, progress=progress, cancel=cancel)

    # ---- memory budget ---------------------------------------------------------------------------
    def _original_storages(self) -> set[int]:
        ptrs = set()
        for lm in list(self._models.values()):
            ptrs |= set(B.storages(lm.model))
        return ptrs

    def _workspaces(self) -> list[Workspace]:
        return [s.workspace for s in list(self._sessions.values()) if s.workspace is not None]

    def memory_used(self) -> dict:
        """Bytes the store holds beyond the loaded models: {"blocks", "caches", "total"} (see budget.py)."""
        orig = self._original_storages()
        blocks: dict[int, int] = {}
        caches: dict[int, int] = {}
        for ws in self._workspaces():
            held = ws.held()
            blocks.update(held["blocks"])
            caches.update(held["caches"])
        for shared in list(self._shared.values()):
            caches.update(shared.storages())
        b = sum(n for p, n in blocks.items() if p not in orig)
        c = sum(n for p, n in caches.items() if p not in orig and p not in blocks)
        return {"blocks": b, "caches": c, "total": b + c}

    def enforce_budget(self) -> dict:
        """Release cached results, then the oldest non-current variants' blocks, until the store holds
        no more than `memory_budget` bytes. -> what was released {"caches": n, "variants": [names]}."""
        done = {"caches": 0, "variants": []}
        if self.memory_budget is None or self.memory_used()["total"] <= self.memory_budget:
            return done
        with self._model_lock:
            locks = [self._use_locks[k] for k in sorted(self._use_locks)]
        with contextlib.ExitStack() as held:  # no computation runs while blocks are released
            for lock in locks:
                held.enter_context(lock)
            return self._release(done)

    def _release(self, done: dict) -> dict:
        # Cached results holding tensors, least recently used first (the pinned quick reference stays).
        with self._lock:
            caches = list(self._shared.values()) + [ws.results for ws in self._workspaces()]
        entries = sorted(((e.used, cache, key) for cache in caches for key, e in cache.items()
                          if not e.pinned and e.storages), key=lambda t: t[0])
        for _, cache, key in entries:
            if self.memory_used()["total"] <= self.memory_budget:
                break
            done["caches"] += cache.drop(key)
        with self._lock:
            busy = {id(s.workspace) for s in self._sessions.values() if s.busy}
        candidates = sorted(((v.id, ws, v) for ws in self._workspaces() if id(ws) not in busy for v in ws.releasable()),
                            key=lambda t: t[0])
        for _, ws, v in candidates:
            if self.memory_used()["total"] <= self.memory_budget:
                break
            ws.release(v)
            done["variants"].append(v.name)
        if done["variants"]:
            log.info("memory budget: released the blocks of %s", ", ".join(done["variants"]))
        B.trim()
        return done

    # ---- session expiry ----------------------------------------------------------------------------
    def expire_idle(self, now: float | None = None) -> list[str]:
        """Drop sessions idle longer than `session_idle` (never one with a job running). -> ids dropped."""
        if self.session_idle is None:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [sid for sid, s in self._sessions.items() if not s.busy and now - s.last_used > self.session_idle]
            for sid in gone:
                del self._sessions[sid]
        if gone:
            log.info("expired %d idle session(s)", len(gone))
            B.trim()
        return gone

    def start_expiry(self, every: float | None = None) -> None:
        """A background thread that expires idle sessions; `close()` stops it."""
        if self.session_idle is None or self._expiry is not None:
            return
        every = every or max(1.0, min(60.0, self.session_idle / 4))

        def loop():
            while not self._stop.wait(every):
                self.expire_idle()

        self._expiry = threading.Thread(target=loop, name="session-expiry", daemon=True)
        self._expiry.start()

    def close(self) -> None:
        self._stop.set()
        if self._expiry is not None:
            self._expiry.join(timeout=5)
            self._expiry = None

    # ---- cancellation ---------------------------------------------------------------------------
    def begin_job(self, sid: str) -> threading.Event:
        ev_ = self.session(sid).cancel
        ev_.clear()
        return ev_

    def cancel(self, sid: str) -> None:
        self.session(sid).cancel.set()
