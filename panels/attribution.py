"""Attribution panel: which prompt tokens push the model toward its next token, by integrated gradients
(captum) on the embedding layer, for the original and the current variant side by side, with the
convergence delta captum reports (how far the attributions' sum is from f(prompt) - f(baseline))."""

from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go

from workbench.engine.analysis.attention import DEFAULT_PROMPT
from workbench.engine.analysis.attribution import DEFAULT_MAX_TOKENS, DEFAULT_STEPS, MAX_STEPS, analyze_attribution
from workbench.panels.context import progress_fn

TITLE = "Attribution"
COLOURS = ["#4C78A8", "#F58518"]


def attribution_figure(res: dict) -> go.Figure:
    """Tokens top to bottom, one horizontal bar per model and token."""
    labels = [f"{i}:{t}" for i, t in enumerate(res["tokens"])]
    fig = go.Figure()
    for k, col in enumerate(res["columns"]):
        fig.add_trace(go.Bar(y=labels, x=col["attributions"], orientation="h", name=col["variant"],
                             marker_color=COLOURS[k % 2],
                             hovertemplate="%{y}<br>%{x:.4f}<extra>" + col["variant"] + "</extra>"))
    unit = "log-prob" if res["output"] == "logprob" else "logit"
    fig.update_layout(barmode="group", height=max(320, 22 * len(labels) * max(1, len(res["columns"])) // 1.5 + 100),
                      margin={"l": 110, "r": 10, "t": 50, "b": 40},
                      title={"text": f"Attribution to next token {res['target']['text']!r} ({unit}; "
                                     f"{'/'.join(str(c['steps']) for c in res['columns'])} steps; {res['target']['chosen_as']})", "font": {"size": 12}},
                      yaxis={"autorange": "reversed", "tickfont": {"size": 10}},
                      xaxis={"title": {"text": f"contribution to the target's {unit}"}})
    return fig


def summary_text(res: dict) -> str:
    rows = ["| model | greedy next token | f(prompt) | f(baseline) | sum of attributions | captum delta | steps | time |",
            "|---|---|---|---|---|---|---|---|"]
    for c in res["columns"]:
        steps = " → ".join(str(t["steps"]) for t in c.get("tries", [{"steps": c.get("steps", res["steps"])}]))
        rows.append(f"| {c['variant']} | {c['greedy_text']!r} ({c['greedy_prob']:.2f}) | {c['f_input']:.3f} | "
                    f"{c['f_baseline']:.3f} | {c['sum']:.3f} | {c['delta']:.3g} | {steps} | {c['seconds']:.1f} s |")
    notes = [f"Baseline: {res['baseline']}."] + res.get("notes", [])
    bad = [c["variant"] for c in res["columns"] if not c["converged"]]
    if bad:
        notes.insert(0, f"**Not converged for {', '.join(bad)}**: the attributions' sum misses f(prompt) - f(baseline) "
                        f"by more than 10 % even at {res.get('max_steps') or res['steps']} steps; the bars are indicative only.")
    return "\n".join(rows) + "\n\n" + " ".join(notes)


def compute(store, sid, prompt: str, target: str, steps: int, progress=None):
    with store.using(sid) as lm:  # one computation on the shared model at a time
        res = analyze_attribution(lm, store.current(sid), prompt, target.strip() or None, int(steps),
                                  DEFAULT_MAX_TOKENS, progress=progress)
    return attribution_figure(res), summary_text(res)


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    with gr.Row():
        prompt = gr.Textbox(DEFAULT_PROMPT, label=f"Prompt (its last {DEFAULT_MAX_TOKENS} tokens are used)", lines=2, scale=4)
        target = gr.Textbox("", label="Target next token (empty: the original's greedy token)", scale=1)
        steps = gr.Slider(4, MAX_STEPS, value=DEFAULT_STEPS, step=4, scale=1,
                          label=f"Integration steps (first try; doubled until converged, up to {MAX_STEPS})")
    go_b = gr.Button("Attribute (original vs current variant)", variant="primary", elem_id="wb-attribution-go")
    fig = gr.Plot(label="Token attributions")
    summary = gr.Markdown(elem_id="wb-attribution-summary")

    def run(s, p, t, n, progress=gr.Progress()):
        return compute(store, s, p, t, n, progress_fn(progress))

    go_b.click(g(run), [sid, prompt, target, steps], [fig, summary], **ctx.heavy)
    return {"prompt": prompt, "target": target, "steps": steps, "figure": fig, "summary": summary, "run": go_b}
