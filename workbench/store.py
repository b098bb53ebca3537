"""Session store: heavy state lives here, engine-side; a browser session holds only its id.

One loaded model per model spec, shared by every session (loaded once, under a lock). Each session has
its own variants, a pending block selection, an undo stack, a calibration choice and the figures
measured for its variants. Panels call the methods below; they never touch the engine's objects
directly except to read them.

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
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from workbench.engine import eval as ev
from workbench.engine.data import Calibration, calibration_ids
from workbench.engine.errors import WorkbenchError
from workbench.engine.export import export_any
from workbench.engine.loading import DEFAULT_MODEL, LoadedModel, load_model
from workbench.engine.recipe import OpContext, Recipe, apply_steps, step_from_dict, variant_recipe
from workbench.engine.workspace import DROP, Variant, original_variant
from workbench import budget as B

log = logging.getLogger(__name__)


def _quiet(frac: float, msg: str) -> None:
    log.info("%3.0f%% %s", frac * 100, msg)


class SessionError(WorkbenchError):
    """The browser session is unknown (expired) or has no model yet."""


@dataclass
class Session:
    id: str
    spec: str | None = None  # model spec; None until a model is attached
    variants: list[Variant] = field(default_factory=list)
    current: Variant | None = None
    pending: dict[int, None] = field(default_factory=dict)  # an ordered set: click order is kept
    undo: list[Variant] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    figures: dict[int, dict] = field(default_factory=dict)  # variant id -> {"quick": .., "full": .., "tps": ..}
    scores: dict[tuple, dict] = field(default_factory=dict)  # (variant id, metric, calibration) -> scores
    cancel: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # computations running for this session (an idle session with a job is kept)
    lineage: dict[int, tuple] = field(default_factory=dict)  # variant id -> (base, resolved steps, calibration)
    released: set[int] = field(default_factory=set)  # ids of variants whose blocks were released


class _Released:
    """Stands in for a replacement block released to keep within the memory budget."""

    def __repr__(self):
        return "RELEASED"


RELEASED = _Released()
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
        """Load (or reuse) a model and make it the session's; a different model resets its variants."""
        s = self.session(sid)
        spec = model_key((spec or self.default_model).strip(), dtype, max_memory, offload_folder)
        lm = self.model(spec, progress)
        if s.spec != spec or s.current is None:
            root = original_variant(lm.num_blocks)
            s.spec, s.variants, s.current = spec, [root], root
            s.pending, s.undo, s.figures, s.scores = {}, [], {}, {}
        return lm

    def lm(self, sid: str) -> LoadedModel:
        s = self.session(sid)
        if s.spec is None:
            raise SessionError("no model is loaded yet: load one in the Model tab")
        return self.model(s.spec)

    def current(self, sid: str) -> Variant:
        self.lm(sid)
        return self.session(sid).current

    # ---- pending selection ----------------------------------------------------------------------
    def toggle(self, sid: str, block: int) -> list[int]:
        s = self.session(sid)
        self.current(sid).check_indices([block])
        b = int(block)
        if s.pending.pop(b, "absent") == "absent":
            s.pending[b] = None
        return sorted(s.pending)

    def set_pending(self, sid: str, blocks) -> list[int]:
        self.current(sid).check_indices(list(blocks))
        self.session(sid).pending = dict.fromkeys(int(b) for b in blocks)
        return self.pending(sid)

    def clear_pending(self, sid: str) -> None:
        self.session(sid).pending = {}

    def pending(self, sid: str) -> list[int]:
        return sorted(self.session(sid).pending)

    def pending_in_order(self, sid: str) -> list[int]:
        """The selection in the order the blocks were clicked (fusion runs in that order)."""
        return list(self.session(sid).pending)

    def set_calibration(self, sid: str, samples: int, seq_len: int) -> Calibration:
        s = self.session(sid)
        s.calibration = Calibration(**{**s.calibration.to_dict(), "samples": int(samples), "seq_len": int(seq_len)})
        return s.calibration

    # ---- variants -------------------------------------------------------------------------------
    def _push(self, s: Session, variant: Variant) -> Variant:
        s.undo.append(s.current)
        s.variants.append(variant)
        s.current = variant
        s.pending = {}
        self.enforce_budget()
        return variant

    def apply_step(self, sid: str, step: dict, progress=_quiet, cancel: threading.Event | None = None) -> Variant:
        """Apply one recipe step to the current variant; the new variant becomes current."""
        return self.apply_steps(sid, [step], progress=progress, cancel=cancel)

    def apply_steps(self, sid: str, steps: list[dict], progress=_quiet, cancel=None, base: Variant | None = None) -> Variant:
        lm, s = self.lm(sid), self.session(sid)
        parsed = [step_from_dict(d) for d in steps]  # validates before any work
        ctx = OpContext(lm=lm, calibration=s.calibration, progress=progress, cancel=cancel or s.cancel)
        start = base or s.current
        with self.using(sid):
            self._materialize(s, start)
            new = apply_steps(ctx, start, parsed, name=f"v{len(s.variants)}")
        new.parent = start.name
        s.lineage[new.id] = (start, new.steps[len(start.steps):], ctx.calibration)
        return self._push(s, new)

    def add_sibling(self, sid: str, variant: Variant) -> Variant:
        """List a variant for comparison without making it current (e.g. plain removal beside fusion)."""
        self.session(sid).variants.append(variant)
        return variant

    def undo(self, sid: str) -> Variant:
        s = self.session(sid)
        if not s.undo:
            raise WorkbenchError("nothing to undo")
        prev = s.undo[-1]
        if prev.id in s.released:  # rebuilt and made current under the lock: the budget cannot take it between
            with self.using(sid):
                self._materialize(s, prev)
                s.current = s.undo.pop()
        else:
            s.current = s.undo.pop()
        s.pending = {}
        return s.current

    def switch(self, sid: str, variant_id: int) -> Variant:
        s = self.session(sid)
        for v in s.variants:
            if v.id == int(variant_id):
                if v is s.current:
                    return v
                with self.using(sid) if v.id in s.released else contextlib.nullcontext():
                    self._materialize(s, v)  # made current before the budget may look again
                    s.undo.append(s.current)
                    s.current, s.pending = v, {}
                return v
        raise WorkbenchError(f"no variant with id {variant_id} in this session")

    def variants(self, sid: str) -> list[Variant]:
        return list(self.session(sid).variants)

    # ---- recipes and export ---------------------------------------------------------------------
    def recipe_of(self, sid: str, variant: Variant | None = None) -> dict:
        """The recipe that replays the variant, with the calibration its steps ran with (not the session's
        choice of now: after an undo or a switch they differ). A recipe has one calibration; a variant whose
        steps ran under different ones records the last (logged)."""
        s = self.session(sid)
        v = variant or s.current
        return variant_recipe(self.lm(sid), v, self.calibration_of(s, v))

    @staticmethod
    def calibration_of(s: Session, v: Variant) -> Calibration:
        chain, cur = [], v
        while cur is not None and cur.id in s.lineage:
            base, steps, calib = s.lineage[cur.id]
            if steps:
                chain.append(calib)
            cur = base
        if not chain:
            return s.calibration
        if any(c != chain[0] for c in chain[1:]):
            log.warning("variant %s was made under %d calibrations; its recipe records the last", v.name, len(set(chain)))
        return chain[0]

    def import_recipe(self, sid: str, text: str, progress=_quiet, cancel=None) -> Variant:
        """Replay a recipe JSON from the original model (the recipe's calibration is adopted)."""
        recipe = Recipe.from_text(text)
        s = self.session(sid)
        lm = self.lm(sid)
        if recipe.model not in (s.spec, lm.spec):
            log.warning("recipe names model %r; replaying it on the loaded model %r", recipe.model, s.spec)
        old = s.calibration
        s.calibration = recipe.calibration
        try:
            return self.apply_steps(sid, [st.to_dict() for st in recipe.steps], progress, cancel, base=s.variants[0])
        except BaseException:
            s.calibration = old
            raise

    def export(self, sid: str, out_dir: str, overwrite: bool = False, progress=_quiet, fmt: str | None = None,
               gguf_type: str | None = None) -> Path:
        """Export the current variant (`fmt` None: its default format, see export.default_format)."""
        v = self.current(sid)
        lm = self.lm(sid)
        q = self.quick(sid, v)
        metrics = {f"quick_{k}": q[k] for k in ("kl", "top1", "ppl", "tokens")}
        metrics.update({"parameters": q["parameters"], "bytes": q["bytes"]})
        full = self.session(sid).figures.get(v.id, {}).get("full")
        if full:
            metrics.update({f"full_{k}": full[k] for k in ("kl", "top1", "ppl", "ppl_original", "tokens") if k in full})
        with self.using(sid):
            out, _ = export_any(lm, v, out_dir, self.recipe_of(sid, v), fmt=fmt, gguf_type=gguf_type, metrics=metrics,
                                overwrite=overwrite, progress=progress)
            return out

    # ---- figures --------------------------------------------------------------------------------
    def figures(self, sid: str, variant: Variant) -> dict:
        return self.session(sid).figures.setdefault(variant.id, {})

    def quick(self, sid: str, variant: Variant | None = None) -> dict:
        """Quick-set figures of a variant (cached per variant: variants never change once made)."""
        v = variant or self.current(sid)
        f = self.figures(sid, v)
        if "quick" not in f:
            with self.using(sid) as lm:
                self._materialize(self.session(sid), v)
                f["quick"] = ev.quick_eval(lm, v)
        return f["quick"]

    def preview(self, sid: str) -> dict | None:
        """Quick figures of the current variant with the pending blocks dropped (not kept as a variant)."""
        s = self.session(sid)
        pend = [b for b in s.pending if b in s.current.kept()]
        if not pend:
            return None
        with self.using(sid) as lm:
            return ev.quick_eval(lm, s.current.with_dropped(pend, name="preview"))

    def full_eval(self, sid: str, progress=_quiet, cancel=None, max_tokens: int | None = 4096) -> dict:
        v = self.current(sid)
        with self.using(sid) as lm:
            res = ev.full_eval(lm, v, max_tokens=max_tokens, progress=progress, cancel=cancel or self.session(sid).cancel)
        self.figures(sid, v)["full"] = res
        return res

    def scores(self, sid: str, metric: str, progress=None, cancel=None) -> dict:
        """Per-block scores of the current variant on the session's calibration ids (cached)."""
        from workbench.engine.analysis import influence

        s, lm = self.session(sid), self.lm(sid)
        key = (s.current.id, metric, s.calibration)
        if key not in s.scores:
            ids = calibration_ids(lm.tokenizer, s.calibration).to(lm.device)
            with self.using(sid):
                s.scores[key] = influence.block_scores(lm, s.current, ids, metric, progress=progress, cancel=cancel)
        return s.scores[key]

    # ---- memory budget ---------------------------------------------------------------------------
    def _original_storages(self) -> set[int]:
        ptrs = set()
        for lm in list(self._models.values()):
            ptrs |= set(B.storages(lm.model))
        return ptrs

    def memory_used(self) -> dict:
        """Bytes the store holds beyond the loaded models: {"blocks", "caches", "total"} (see budget.py)."""
        orig = self._original_storages()
        blocks: dict[int, int] = {}
        caches: dict[int, int] = {}
        for s in list(self._sessions.values()):
            for v in list(s.variants):
                blocks.update(B.storages([o for o in v.overrides.values() if o is not DROP and o is not RELEASED]))
            caches.update(B.storages(list(s.scores.values())))
        for lm in list(self._models.values()):
            caches.update(B.storages(list(B.model_caches(lm).values())))
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
        with self._lock:
            for lm in list(self._models.values()):
                for cache in B.model_caches(lm).values():
                    done["caches"] += len(cache)
                    cache.clear()
            for s in list(self._sessions.values()):
                keep = {k: v for k, v in s.scores.items() if s.current is not None and k[0] == s.current.id}
                done["caches"] += len(s.scores) - len(keep)
                s.scores = keep
        candidates = sorted(((v.id, s, v) for s in list(self._sessions.values()) if not s.busy
                             for v in list(s.variants) if v is not s.current and v.id in s.lineage
                             and v.id not in s.released and any(o is not DROP for o in v.overrides.values())),
                            key=lambda t: t[0])
        for _, s, v in candidates:
            if self.memory_used()["total"] <= self.memory_budget:
                break
            current_mods = {id(o) for o in s.current.overrides.values()} if s.current else set()
            if all(o is DROP or id(o) in current_mods for o in v.overrides.values()):
                continue  # its blocks are the current variant's too: releasing frees nothing
            v.overrides = {i: (DROP if o is DROP else RELEASED) for i, o in v.overrides.items()}
            s.released.add(v.id)
            done["variants"].append(v.name)
        if done["variants"]:
            log.info("memory budget: released the blocks of %s", ", ".join(done["variants"]))
        B.trim()
        return done

    def _materialize(self, s: Session, v: Variant) -> None:
        """Rebuild a released variant from what made it (its base, rebuilt first, its resolved steps and
        the calibration they ran with). The caller holds the model (`using`)."""
        if v.id not in s.released:
            return
        base, steps, calib = s.lineage[v.id]
        self._materialize(s, base)
        ctx = OpContext(lm=self.model(s.spec), calibration=calib, progress=None)
        new = apply_steps(ctx, base, [step_from_dict(d) for d in steps], name=v.name)
        v.overrides, v.tags = new.overrides, new.tags
        s.released.discard(v.id)
        self.notify(f"Variant {v.name} had been set aside to keep memory within the budget; it was rebuilt "
                    "from its recipe (identical to before).")

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
