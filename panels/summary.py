"""A variant in words and in the variants plot, shared by the Workbench screen, the Blocks tab and the
Compare tab: a recipe step in plain words, the status line after a step ("Pruned blocks 13, 14 -> v1: ..."),
plain removal listed beside a fused variant, and the size-against-KL plot of all variants with the
Pareto front. (Kept out of `panels/workbench.py` so that the tabs that use it need not import the screen,
which imports them: no import cycle.)"""

from __future__ import annotations

from workbench.engine.pareto import pareto_front
from workbench.panels.chart import placeholder

SELECTED = "#E45756"  # the current variant in the plot; the selection's outline on the Workbench chart


def _blocks_words(blocks) -> str:
    blocks = sorted(blocks)
    return f"block {blocks[0]}" if len(blocks) == 1 else "blocks " + ", ".join(map(str, blocks))


def num(x: float) -> str:
    """A figure for a sentence: two decimals, or three significant digits below 0.1."""
    return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.2g}"


def mib(nbytes: int) -> str:
    m = nbytes / 2**20
    return f"{m:.0f} MiB" if m >= 10 else f"{m:.2g} MiB"


def _count(n: int) -> str:
    return f"{n} block" + ("" if n == 1 else "s")


def step_words(step: dict) -> str:
    """One recipe step in plain words."""
    op, b = step.get("op"), step.get("blocks") or []
    if op == "prune_blocks":
        return f"pruned {_blocks_words(b)}"
    if op == "fuse_blocks":
        return f"fused {_blocks_words(b)} into their neighbours" if b else f"fused the {step.get('k')} lowest-MI blocks"
    if op == "quantize":
        g = step.get("group_size")
        return (f"quantized {_count(len(b))} to {step.get('bits')}-bit {str(step.get('method', '')).upper()} "
                f"({'per channel' if g == -1 else f'groups of {g}'})")
    if op == "sparsify":
        s = step.get("sparsity")
        return f"sparsified {_count(len(b))} to {s:.0%} ({step.get('method')})" if s is not None else f"sparsified {_count(len(b))}"
    return str(op)


def describe_steps(v) -> str:
    if not v.steps:
        return "the loaded model"
    return "; ".join(step_words(st) for st in v.steps[-1:]) + (f" (from {v.parent})" if v.parent else "")


def status_words(store, sid, v, sibling=None) -> str:
    """"Pruned blocks 13, 14, 16 -> v1: 27 of 30 blocks, KL 0.51, top-1 61 %"."""
    q = store.quick(sid, v)
    words = step_words(v.steps[-1])
    text = (f"{words[0].upper() + words[1:]} → {v.name}: {len(v.kept())} of {v.num_blocks} blocks, "
            f"KL {num(q['kl'])}, top-1 {q['top1'] * 100:.0f} %, {mib(q['bytes'])}")
    if sibling is not None:
        qs = store.quick(sid, sibling)
        guards = [r.get("guard") or {} for r in (v.reports[-1] or {}).get("per_block") or []]
        kept = [g.get("kept") for g in guards]
        if "removal" in kept:
            verdict = (f"fusion did not beat plain removal on held-out calibration text for {kept.count('removal')} of "
                       f"{len(kept)} blocks, so plain removal was kept there")
        elif q["kl"] < qs["kl"]:
            verdict = "fusion helped"
        else:
            verdict = "fusion did not help here: try more steps or more calibration samples"
        text += (f". Plain removal of the same blocks → {sibling.name}: KL {num(qs['kl'])}, top-1 "
                 f"{qs['top1'] * 100:.0f} % ({verdict})")
    return text


def variants_figure(store, sid) -> dict:
    """Size against quick KL for every variant (axes fitted to all of them), the Pareto front marked."""
    if not sid or store.session(sid).spec is None:
        return placeholder("Each variant you make appears here: size against KL", 300)
    vs, cur = store.variants(sid), store.current(sid)
    qs = [store.quick(sid, v) for v in vs]
    xs, ys = [q["bytes"] / 2**20 for q in qs], [q["kl"] for q in qs]
    front = pareto_front(list(zip(xs, ys)))
    fx = sorted(front, key=lambda i: xs[i])
    data = [{"type": "scatter", "mode": "lines", "x": [xs[i] for i in fx], "y": [ys[i] for i in fx], "name": "Pareto front",
             "line": {"color": "#F58518", "dash": "dot"}, "hoverinfo": "skip"},
            {"type": "scatter", "mode": "markers+text", "x": xs, "y": ys, "text": [v.name for v in vs],
             "textposition": "top center", "name": "variants",
             "marker": {"size": [15 if v is cur else 10 for v in vs],
                        "symbol": ["star" if i in front else "circle" for i in range(len(vs))],
                        "color": [SELECTED if v is cur else "#4C78A8" for v in vs]},
             "hovertemplate": "%{text}<br>%{x:.1f} MiB<br>KL %{y:.4f}<extra></extra>"}]
    pad_x = (max(xs) - min(xs)) * 0.1 or max(xs) * 0.05 or 1.0
    pad_y = (max(ys) - min(ys)) * 0.15 or 0.05
    layout = {"height": 300, "margin": {"l": 55, "r": 10, "t": 30, "b": 40}, "showlegend": False,
              "title": {"text": "variants: size against KL (★ Pareto front: nothing smaller and better)", "font": {"size": 12}},
              "xaxis": {"title": {"text": "size (MiB)"}, "range": [min(xs) - pad_x, max(xs) + pad_x]},
              "yaxis": {"title": {"text": "KL to the original (quick set)"}, "range": [min(ys) - pad_y, max(ys) + pad_y]}}
    return {"data": data, "layout": layout, "front": front}


def plot_of(fig: dict):
    import plotly.graph_objects as go

    f = go.Figure(fig["data"])
    f.update_layout(fig["layout"])
    return f


def _units(step: dict) -> int:
    return 1 if step["op"] == "prune_blocks" else max(1, len(step.get("blocks") or []))


def plain_removal_beside(store, sid, base, fused):
    """List plain removal of the fused blocks next to the fused variant (named in order, not made current)."""
    blocks = fused.steps[-1].get("blocks", [])
    return store.workspace(sid).removal_beside(
        base, fused, f"plain removal of {_blocks_words(blocks)} (from {base.name}), beside fused {fused.name}")
