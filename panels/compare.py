"""Compare panel: the original and the current variant side by side, and all the session's variants."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gradio as gr

from workbench.engine import evaluate as ev
from workbench.engine.errors import Cancelled
from workbench.panels.context import PanelContext, progress_fn
from workbench.panels.summary import describe_steps, plot_of, variants_figure

TITLE = "Compare"
PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "prompts.txt"
NOISE = ("KL(original ‖ variant) and top-1 agreement are the headline; perplexity on a few hundred tokens is "
         "noisy, so trust it only from the full evaluation.")


def example_prompts() -> list[str]:
    return [p.strip() for p in PROMPTS.read_text().splitlines() if p.strip()] if PROMPTS.is_file() else ["Hello!"]


def _decode_rate(times: list[float]) -> float | None:
    """Tokens/s between the first and the last new token: prompt processing and answer length drop out."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 3 and times[-1] > times[0] else None


def _stream(store, sid: str, variant, prompt: str, max_new_tokens: int, out: dict):
    """Yield the growing text of a greedy generation; `out` receives generate()'s measured figures and
    `decode_tokens_per_s`, timed token by token."""
    from transformers import TextIteratorStreamer

    class Timed(TextIteratorStreamer):
        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                times.append(time.perf_counter())
            super().put(value)

    lm, times = store.lm(sid), []
    streamer = Timed(lm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    err: list[BaseException] = []

    def run():
        try:
            with store.using(sid):  # the model is shared: no other computation may run it meanwhile
                out.update(ev.generate(lm, variant, prompt, max_new_tokens=max_new_tokens, streamer=streamer))
        except BaseException as e:  # re-raised in the caller's thread below
            err.append(e)
            streamer.end()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    t.join()
    if err:
        raise err[0]
    out["decode_tokens_per_s"] = _decode_rate(times)
    yield out.get("text", text)


def generate_pair(store, sid: str, prompt: str, max_new_tokens: int = 48):
    """Stream (original text, variant text, speed line): the original first (cached per prompt)."""
    ws = store.workspace(sid)
    lm, orig, cur = ws.lm, ws.original, ws.current
    key = (prompt, int(max_new_tokens))
    done = ws.peek(orig, "generation", key)
    if done is None:
        if ws.peek(orig, "warm") is None:  # the first generation pays one-off costs; keep them out of tokens/s
            with store.using(sid):
                ev.generate(lm, orig, prompt, max_new_tokens=2)
            ws.record(orig, "warm", True)
        done = {}
        for text in _stream(store, sid, orig, prompt, int(max_new_tokens), done):
            yield text, "…", ""
        ws.record(orig, "generation", done, key)
        ws.record(orig, "tps", done["decode_tokens_per_s"])
    otext = done["text"]
    if cur is orig:
        yield otext, otext, speed_text(store, sid)
        return
    res = {}
    for text in _stream(store, sid, cur, prompt, int(max_new_tokens), res):
        yield otext, text, ""
    ws.record(cur, "tps", res["decode_tokens_per_s"])
    yield otext, res["text"], speed_text(store, sid)


def speed_text(store, sid: str) -> str:
    s = store.session(sid)
    to, tv = store.figures(sid, s.variants[0]).get("tps"), store.figures(sid, s.current).get("tps")
    if to is None or tv is None:
        return ""
    line = (f"Decode speed (greedy, tokens after the first, this device, measured once): original **{to:.1f}** "
            f"tokens/s · variant **{tv:.1f}** tokens/s")
    cur = s.current
    if len(cur.kept()) == cur.num_blocks:  # nothing dropped: replaced blocks are dense tensors again
        line += (" — the variant is **not faster** on this device: its quantized or sparse weights are stored "
                 "dequantized / masked and run at full cost, so any difference here is measurement noise.")
    elif tv <= to * 1.05:
        line += " — the variant is **not faster** on this device."
    return line


def figures_table(store, sid: str | None) -> str:
    """Markdown table: original against the current variant on the quick set (and full, if run)."""
    if not sid or store.session(sid).spec is None:
        return "No model loaded yet."
    s = store.session(sid)
    orig, cur = s.variants[0], store.current(sid)
    qo, qv = store.quick(sid, orig), store.quick(sid, cur)
    fv = store.figures(sid, cur)
    rows = [
        ("blocks kept", f"{orig.num_blocks}", f"{len(cur.kept())}"),
        ("parameters", f"{qo['parameters'] / 1e6:.2f} M", f"{qv['parameters'] / 1e6:.2f} M ({qv['parameters'] / qo['parameters']:.1%})"),
        ("size", f"{qo['bytes'] / 2**20:.1f} MiB", f"{qv['bytes'] / 2**20:.1f} MiB ({qv['bytes'] / qo['bytes']:.1%})"),
        ("KL(orig ‖ variant), quick", "0", f"**{qv['kl']:.4f}** nats/token"),
        ("top-1 agreement, quick", "100%", f"**{qv['top1']:.1%}**"),
        ("perplexity, quick (noisy)", f"{qo['ppl']:.2f}", f"{qv['ppl']:.2f}"),
    ]
    if "full" in fv:
        f = fv["full"]
        rows += [("perplexity, full", f"{f['ppl_original']:.2f}", f"{f['ppl']:.2f} ({f['tokens']} tokens)"),
                 ("KL / top-1, full", "", f"{f['kl']:.4f} / {f['top1']:.1%}")]
    head = f"**original** vs **{cur.name}** (quick set: {qv['tokens']} tokens, {qv['seconds']:.2f} s)\n\n"
    table = "| | original | variant |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return head + table + f"\n\n{NOISE}"


def variant_choices(store, sid: str | None) -> list[tuple[str, int]]:
    if not sid or store.session(sid).spec is None:
        return []
    cur = store.current(sid)
    out = []
    for v in store.variants(sid):
        q = store.quick(sid, v)
        mark = " ◀ current" if v is cur else ""
        what = v.description or describe_steps(v)
        out.append((f"{v.name}: {what} · {len(v.kept())}/{v.num_blocks} blocks, KL {q['kl']:.4f}, "
                    f"{q['bytes'] / 2**20:.0f} MiB{mark}", v.id))
    return out


def variants_plot(store, sid: str | None):
    """One plot of all the session's variants: size (MiB) against quick KL, axes fitted to every one of
    them, the Pareto front marked (the Workbench tab's plot)."""
    return plot_of(variants_figure(store, sid))


def refresh(store, sid: str | None):
    choices = variant_choices(store, sid)
    cur = store.current(sid).id if choices else None
    return figures_table(store, sid), gr.update(choices=choices, value=cur), variants_plot(store, sid)


def full_evaluation(store, sid: str, max_tokens: int, progress=gr.Progress()) -> str:
    store.begin_job(sid)
    try:
        store.full_eval(sid, progress_fn(progress), max_tokens=int(max_tokens) if max_tokens else None)
    except Cancelled:
        gr.Warning("Full evaluation cancelled.")
    return figures_table(store, sid)


def switch(store, sid: str, variant_id: int) -> str:
    store.switch(sid, int(variant_id))
    return PanelContext.token()


def build(ctx) -> dict:
    store, sid, g = ctx.store, ctx.session, ctx.guard
    prompts = example_prompts()
    with gr.Row():
        prompt = gr.Dropdown(prompts, value=prompts[0], allow_custom_value=True, label="Prompt", scale=4)
        max_new = gr.Number(48, label="New tokens", precision=0, minimum=1, maximum=512, scale=1)
        auto = gr.Checkbox(True, label="Regenerate after every change", scale=1)
        gen_b = gr.Button("Generate", variant="primary", scale=1)
    with gr.Row():
        out_o = gr.Textbox(label="Original (greedy)", lines=6, elem_classes="wb-gen", elem_id="wb-gen-original")
        out_v = gr.Textbox(label="Current variant (greedy)", lines=6, elem_classes="wb-gen", elem_id="wb-gen-variant")
    speed = gr.Markdown()
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.Markdown(figures_table(store, None), elem_id="wb-figures")
        with gr.Column(scale=2):
            plot = gr.Plot(show_label=False)
    with gr.Row():
        variants = gr.Dropdown([], label="Session variants", scale=4)
        switch_b = gr.Button("Switch to", scale=1)
        undo_b = gr.Button("Undo", scale=1)
    with gr.Row():
        max_tokens = gr.Number(4096, label="Full evaluation: max tokens", precision=0, minimum=256, scale=2)
        full_b = gr.Button("Full evaluation", scale=1)
        cancel_b = gr.Button("Cancel", variant="stop", scale=1, visible=False)

    def gen(s: str, p: str, n: int):
        yield from generate_pair(store, s, p, n)

    def auto_gen(s: str, a: bool, p: str, n: int):
        if a and s and store.session(s).spec is not None:
            yield from generate_pair(store, s, p, n)

    gen_kw = {"concurrency_id": "generate", "concurrency_limit": 1, "show_progress": "minimal"}
    gen_b.click(g(gen), [sid, prompt, max_new], [out_o, out_v, speed], api_name="generate", **gen_kw)
    ctx.changed.change(g(lambda s: refresh(store, s)), sid, [table, variants, plot], show_progress="minimal")
    ctx.changed.change(g(auto_gen), [sid, auto, prompt, max_new], [out_o, out_v, speed], **gen_kw)
    switch_b.click(g(lambda s, v: switch(store, s, v)), [sid, variants], ctx.changed, **ctx.heavy)
    undo_b.click(g(lambda s: (store.undo(s), ctx.token())[1]), sid, ctx.changed, **ctx.heavy)
    shown, hidden = (lambda: gr.update(visible=True)), (lambda: gr.update(visible=False))
    full_b.click(shown, None, cancel_b, queue=False, show_progress="hidden").then(
        g(lambda s, m, progress=gr.Progress(): full_evaluation(store, s, m, progress)), [sid, max_tokens], table,
        api_name="full_eval", **ctx.heavy).then(hidden, None, cancel_b, show_progress="hidden")
    cancel_b.click(g(lambda s: store.cancel(s)), sid, None, show_progress="hidden")
    return {"prompt": prompt, "original": out_o, "variant": out_v, "table": table, "plot": plot,
            "variants": variants, "full_eval": full_b, "speed": speed}
