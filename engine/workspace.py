"""The workspace: one person's work on one loaded model.

It holds the variants (the original first), the current one, the undo stack, the pending block selection
(click order kept), the calibration choice, what made each variant (its lineage, so a variant whose
blocks were released to keep within a memory budget is rebuilt bit for bit), and one keyed result cache
(engine/results.py) for every figure and analysis of its variants. The original model is never modified.

Computations run under `guard()` (the store passes one that holds the shared model; alone, nothing).
Panels and the CLI ask the workspace and read what it returns; they never write its state.
"""

from __future__ import annotations

import contextlib
import logging

from . import evaluate as ev
from .data import Calibration, calibration_ids_on
from .errors import WorkbenchError
from .loading import LoadedModel
from .recipe import OpContext, Recipe, apply_steps, step_from_dict, variant_recipe
from .results import ResultCache, variant_key
from .variant import DROP, Variant, original_variant

log = logging.getLogger(__name__)

# Per-analysis caps on the entries kept (large results): a 512-token attention capture of a 30-layer,
# 9-head model holds ~280 MB.
LIMITS = {"attention": 2, "outliers": 8, "map": 4}


class _Released:
    """Stands in for a replacement block released to keep within the memory budget."""

    def __repr__(self):
        return "RELEASED"


RELEASED = _Released()


def new_results() -> ResultCache:
    return ResultCache(LIMITS)


class Workspace:
    def __init__(self, lm: LoadedModel, calibration: Calibration | None = None, shared: ResultCache | None = None,
                 guard=None, notify=None):
        self.lm = lm
        root = original_variant(lm.num_blocks)
        self.variants: list[Variant] = [root]
        self.current: Variant = root
        self.undo_stack: list[Variant] = []
        self.pending_set: dict[int, None] = {}  # an ordered set: click order is kept
        self.calibration = calibration or Calibration()
        self.lineage: dict[int, tuple] = {}  # variant id -> (base, resolved steps, calibration)
        self.released: set[int] = set()
        self.results = new_results()  # this workspace's variants
        self.shared = shared if shared is not None else new_results()  # the original's (shared per model)
        self.guard = guard or contextlib.nullcontext
        self.notify = notify or (lambda msg: log.info("%s", msg))
        self._last_preview: tuple | None = None  # ((current id, selection), figures) of the last preview

    @property
    def original(self) -> Variant:
        return self.variants[0]

    # ---- pending selection ----------------------------------------------------------------------
    def toggle(self, block: int) -> list[int]:
        self.current.check_indices([block])
        b = int(block)
        if self.pending_set.pop(b, "absent") == "absent":
            self.pending_set[b] = None
        return self.pending()

    def set_pending(self, blocks) -> list[int]:
        blocks = list(blocks)
        self.current.check_indices(blocks)
        self.pending_set = dict.fromkeys(int(b) for b in blocks)
        return self.pending()

    def clear_pending(self) -> None:
        self.pending_set = {}

    def pending(self) -> list[int]:
        return sorted(self.pending_set)

    def pending_in_order(self) -> list[int]:
        """The selection in the order the blocks were clicked (fusion runs in that order)."""
        return list(self.pending_set)

    def set_calibration(self, samples: int, seq_len: int) -> Calibration:
        self.calibration = Calibration(**{**self.calibration.to_dict(), "samples": int(samples), "seq_len": int(seq_len)})
        return self.calibration

    def calib_ids(self, calibration: Calibration | None = None):
        """The calibration windows (on the model's device), built once per calibration."""
        c = calibration or self.calibration
        return self.shared.get_or_compute(
            None, "calibration_ids", c, lambda: calibration_ids_on(self.lm, c), pinned=True)

    # ---- variants -------------------------------------------------------------------------------
    def find(self, variant_id: int) -> Variant:
        for v in self.variants:
            if v.id == int(variant_id):
                return v
        raise WorkbenchError(f"no variant with id {variant_id} in this session")

    def build(self, steps: list[dict], progress=None, cancel=None, base: Variant | None = None,
              calibration: Calibration | None = None) -> Variant:
        """A new variant from `base` (default: the current one) and recipe steps; not yet listed."""
        parsed = [step_from_dict(d) for d in steps]  # validates before any work
        calib = calibration or self.calibration
        ctx = OpContext(lm=self.lm, calibration=calib, progress=progress, cancel=cancel)
        start = base or self.current
        with self.guard():
            self.materialize(start)
            new = apply_steps(ctx, start, parsed, name=f"v{len(self.variants)}")
        new.parent = start.name
        self.lineage[new.id] = (start, new.steps[len(start.steps):], calib)
        return new

    def push(self, variant: Variant) -> Variant:
        """List `variant` and make it current (the previous one goes on the undo stack)."""
        self.undo_stack.append(self.current)
        self.variants.append(variant)
        self.current = variant
        self.pending_set = {}
        return variant

    def add_sibling(self, variant: Variant) -> Variant:
        """List a variant for comparison without making it current (e.g. plain removal beside fusion)."""
        self.variants.append(variant)
        return variant

    def removal_beside(self, base: Variant, fused: Variant, description: str = "") -> Variant:
        """List plain removal (from `base`) of the blocks `fused` fused, named in order and not made
        current: what a fusion is judged against."""
        blocks = sorted(fused.steps[-1].get("blocks", []))
        plain = base.with_dropped(blocks, name=f"v{len(self.variants)}")
        step = {"op": "prune_blocks", "blocks": blocks}
        plain.steps = list(base.steps) + [step]
        plain.reports = list(base.reports) + [dict(step)]
        plain.parent = base.name
        plain.description = description
        return self.add_sibling(plain)

    def undo(self) -> Variant:
        if not self.undo_stack:
            raise WorkbenchError("nothing to undo")
        with self.guard() if self.undo_stack[-1].id in self.released else contextlib.nullcontext():
            self.materialize(self.undo_stack[-1])  # rebuilt and made current under the guard
            self.current = self.undo_stack.pop()
        self.pending_set = {}
        return self.current

    def switch(self, variant_id: int) -> Variant:
        v = self.find(variant_id)
        if v is self.current:
            return v
        with self.guard() if v.id in self.released else contextlib.nullcontext():
            self.materialize(v)  # made current before a budget may look again
            self.undo_stack.append(self.current)
            self.current, self.pending_set = v, {}
        return v

    def replay(self, text: str, progress=None, cancel=None) -> Variant:
        """Replay a recipe JSON from the original model (the recipe's calibration is adopted)."""
        recipe = Recipe.from_text(text)
        if recipe.model not in (self.lm.spec,):
            log.warning("recipe names model %r; replaying it on the loaded model %r", recipe.model, self.lm.spec)
        new = self.build([st.to_dict() for st in recipe.steps], progress, cancel, base=self.original,
                         calibration=recipe.calibration)
        self.calibration = recipe.calibration
        return self.push(new)

    # ---- memory: release and rebuild ------------------------------------------------------------
    def releasable(self) -> list[Variant]:
        """Variants whose replacement blocks could be released: made here, not current, not released."""
        current = {id(o) for o in self.current.overrides.values()}
        return [v for v in self.variants if v is not self.current and v.id in self.lineage and v.id not in self.released
                and any(o is not DROP and id(o) not in current for o in v.overrides.values())]

    def release(self, v: Variant) -> None:
        v.overrides = {i: (DROP if o is DROP else RELEASED) for i, o in v.overrides.items()}
        self.released.add(v.id)

    def materialize(self, v: Variant) -> None:
        """Rebuild a released variant from what made it (its base, rebuilt first, its resolved steps and the
        calibration they ran with). The caller holds the guard."""
        if v.id not in self.released:
            return
        base, steps, calib = self.lineage[v.id]
        self.materialize(base)
        new = apply_steps(OpContext(lm=self.lm, calibration=calib), base, [step_from_dict(d) for d in steps], name=v.name)
        v.overrides, v.tags = new.overrides, new.tags
        self.released.discard(v.id)
        self.notify(f"Variant {v.name} had been set aside to keep memory within the budget; it was rebuilt "
                    "from its recipe (identical to before).")

    # ---- recipes --------------------------------------------------------------------------------
    def calibration_of(self, v: Variant) -> Calibration:
        """The calibration the variant's steps ran with (not the choice of now: after an undo or a switch they
        differ). A recipe has one calibration; a variant made under several records the last (logged)."""
        chain, cur = [], v
        while cur is not None and cur.id in self.lineage:
            base, steps, calib = self.lineage[cur.id]
            if steps:
                chain.append(calib)
            cur = base
        if not chain:
            return self.calibration
        if any(c != chain[0] for c in chain[1:]):
            log.warning("variant %s was made under %d calibrations; its recipe records the last", v.name, len(set(chain)))
        return chain[0]

    def recipe_of(self, v: Variant | None = None) -> dict:
        v = v or self.current
        return variant_recipe(self.lm, v, self.calibration_of(v))

    # ---- results --------------------------------------------------------------------------------
    def cache_for(self, variant: Variant | None) -> ResultCache:
        return self.shared if variant_key(variant) == "original" else self.results

    def result(self, variant: Variant | None, analysis: str, params, compute):
        """The cached result of `analysis` with `params` for the variant; computed once (under the guard)
        by compute() when missing. Variants never change once made, so a result never goes stale."""
        v = variant or self.current
        cache = self.cache_for(v)
        missing = object()
        got = cache.peek(v, analysis, params, missing)
        if got is not missing:
            return got
        with self.guard():
            self.materialize(v)
            value = compute()
        return cache.put(v, analysis, params, value)

    def peek(self, variant: Variant | None, analysis: str, params=(), default=None):
        """A cached result, or `default`: never computes."""
        v = variant or self.current
        return self.cache_for(v).peek(v, analysis, params, default)

    def latest(self, variant: Variant | None, analysis: str):
        v = variant or self.current
        return self.cache_for(v).latest(v, analysis)

    def record(self, variant: Variant, figure: str, value, params=()) -> None:
        """A figure measured outside an analysis (Compare's decode speed and generations)."""
        self.cache_for(variant).put(variant, figure, params, value)

    def reference(self) -> ev.QuickCache:
        """The quick set's trace and the original's reference log-probs: one per model, pinned."""
        return self.shared.get_or_compute(None, "quick_reference", (), lambda: ev.quick_cache(self.lm), pinned=True)

    def quick(self, variant: Variant | None = None) -> dict:
        """Quick-set figures of a variant."""
        v = variant or self.current
        return self.result(v, "quick", (), lambda: ev.quick_eval(self.lm, v, reference=self.reference()))

    def preview(self) -> dict | None:
        """Quick figures of the current variant with the pending blocks dropped (not kept as a variant)."""
        pend = [b for b in self.pending_set if b in self.current.kept()]
        if not pend:
            return None
        key = (self.current.id, tuple(sorted(pend)))
        with self.guard():
            last = self._last_preview  # asked again for the same selection (the page asks ahead): not rerun
            if last is not None and last[0] == key:
                return last[1]
            # the last preview's states: a click that adds or removes one block runs from that block on
            memo = self.results.peek(None, "preview_states", ()) or ev.RunMemo()
            res = ev.quick_eval(self.lm, self.current.with_dropped(pend, name="preview"), reference=self.reference(),
                                memo=memo)
            self.results.put(None, "preview_states", (), memo)  # counted again: the states it now holds
            self._last_preview = (key, res)
            return res

    def full_eval(self, progress=None, cancel=None, max_tokens: int | None = 4096) -> dict:
        """Held-out figures of the current variant (the newest run is the one kept)."""
        v = self.current
        with self.guard():
            res = ev.full_eval(self.lm, v, max_tokens=max_tokens, progress=progress, cancel=cancel)
        self.cache_for(v).put(v, "full", (), res)
        return res

    def figures(self, variant: Variant) -> dict:
        """What has been measured for the variant: {"quick", "full", "tps"} where known (read only)."""
        return {k: f for k in ("quick", "full", "tps") if (f := self.peek(variant, k)) is not None}

    def scores(self, metric: str, progress=None, cancel=None, variant: Variant | None = None) -> dict:
        """Per-block scores of a variant (default: the current one) on the calibration windows."""
        from .analysis import influence

        v, calib = variant or self.current, self.calibration
        return self.result(v, "scores", (metric, calib), lambda: influence.block_scores(
            self.lm, v, self.calib_ids(calib), metric, progress=progress, cancel=cancel))

    def all_scores(self, progress=None, cancel=None) -> dict:
        """Every block metric of the current variant from one scan, each kept as `scores` would keep it."""
        from .analysis import influence

        v, calib = self.current, self.calibration
        cache = self.cache_for(v)
        if any(cache.peek(v, "scores", (m, calib)) is None for m in influence.METRICS):
            with self.guard():
                every = influence.all_scores(self.lm, v, self.calib_ids(calib), progress=progress, cancel=cancel)
            for m, res in every.items():
                if cache.peek(v, "scores", (m, calib)) is None:
                    cache.put(v, "scores", (m, calib), res)
        return {m: r for m in influence.METRICS if (r := cache.peek(v, "scores", (m, calib))) is not None}

    def held(self) -> dict:
        """{"blocks": {ptr: bytes}, "caches": {ptr: bytes}} of this workspace's replacement blocks and results."""
        from .results import storages

        blocks: dict[int, int] = {}
        for v in list(self.variants):
            blocks.update(storages([o for o in v.overrides.values() if o is not DROP and o is not RELEASED]))
        return {"blocks": blocks, "caches": self.results.storages()}

    # ---- the analyses panels ask for (each cached per variant and parameters) ------------------
    def angular(self, progress=None, cancel=None) -> dict:
        """`angular_distances` (every start block and run length) of the current variant."""
        from .analysis import influence

        v, calib = self.current, self.calibration
        return self.result(v, "angular_runs", (calib,), lambda: influence.angular_distances(
            self.lm, v, self.calib_ids(calib), progress=progress, cancel=cancel))

    def outliers(self, variant: Variant | None = None, progress=None, cancel=None) -> dict:
        """Activation outlier statistics of a variant (default: the current one) on the calibration windows."""
        from .analysis.outliers import outlier_stats

        v, calib = variant or self.current, self.calibration
        return self.result(v, "outliers", (calib,), lambda: outlier_stats(
            self.lm, v, self.calib_ids(calib), progress=progress, cancel=cancel))

    def attention(self, variant: Variant | None = None, prompt: str | None = None, max_tokens: int | None = 512,
                  damping: float | None = None, skip_first: bool = False, progress=None):
        """`analyze_attention` -> (capture, report): a panel switching layer or head redraws from the cache."""
        from .analysis import attention as att

        v = variant or self.current
        damping = att.DEFAULT_DAMPING if damping is None else float(damping)
        return self.result(v, "attention", (prompt or "", max_tokens, damping, bool(skip_first)), lambda: att.analyze_attention(
            self.lm, v, prompt, max_tokens, damping, bool(skip_first), progress=progress))

    def suggest(self, metric: str, k: int, progress=None, cancel=None) -> dict:
        """Select the k blocks `removal_plan` removes first by `metric` (iterative for mi and ppl). -> the plan."""
        from .analysis import influence

        with self.guard():
            plan = influence.removal_plan(self.lm, self.current, self.calib_ids(), metric, int(k),
                                          progress=progress, cancel=cancel)
        self.set_pending(plan["order"])
        return plan

    def embedding_map(self, progress=None, cancel=None) -> dict:
        """The UMAP map of the current variant's blocks and heads."""
        from .analysis.embedding_map import analyze_map

        v, calib = self.current, self.calibration
        return self.result(v, "map", (calib,), lambda: analyze_map(
            self.lm, v, self.calib_ids(calib), seed=calib.seed, progress=progress, cancel=cancel))
