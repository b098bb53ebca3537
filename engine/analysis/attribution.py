"""Token attributions of a next-token prediction by Integrated Gradients on the embedding layer.

Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017, arXiv 1703.01365), computed with captum's
LayerIntegratedGradients on the token-embedding layer: the path runs from the embeddings of a baseline
prompt (every token but the first replaced by the pad/eos token) to the prompt's own embeddings, and the attribution of
token t is the sum over the hidden dimension of (e_t - e'_t) * the path-averaged gradient. Completeness
promises sum_t attr_t = f(prompt) - f(baseline); captum reports the difference as the convergence delta
(near 0 on small models; on real LLMs the integrand is steep and the delta says how far the sum is off).

f is the log-probability (default) or logit of one target token at the LAST position only, so the LM
head runs on one position per path step. The same prompt, target and baseline are used for the original
and the variant, side by side: where their attributions differ, the compressed model reads the prompt
differently. Cost: one forward and backward pass per step, batched (`internal_batch_size`).
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import UnsupportedArchitecture, WorkbenchError
from ..loading import LoadedModel
from ..variant import Variant, original_variant
from ..block_stream import isolated_view, prompt_ids, run_stack, token_labels

log = logging.getLogger(__name__)

DEFAULT_STEPS = 32  # the first try; doubled while the sum misses completeness, up to MAX_STEPS
MAX_STEPS = 256
DEFAULT_MAX_TOKENS = 32
# The trapezoid rule, not Gauss-Legendre: on SmolLM2 the integrand is steep and not smooth, and the
# Gauss-Legendre sums jumped around (deltas -0.30, -0.40, +0.79 at 8, 32, 64 steps against f(x) - f(b)
# = -1.0), while the trapezoid sums settle as the steps double (-0.025 at 128 steps). README, Attributions.
METHOD = "riemann_trapezoid"


def _baseline_token(tokenizer) -> int:
    for key in ("pad_token_id", "eos_token_id", "unk_token_id"):
        t = getattr(tokenizer, key, None)
        if isinstance(t, int):
            return t
    return 0


def baseline_ids(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The IG baseline: every token but the first replaced by the pad/eos token.

    The first token is kept because decoder LMs park huge "attention sink" activations on it; moving
    it along the path makes the integrand so steep that the Riemann sums stop converging. Its own
    attribution is therefore 0 by construction (said in the result)."""
    base = torch.full_like(ids, _baseline_token(lm.tokenizer))
    base[:, 0] = ids[:, 0]
    return base


def last_logits(lm: LoadedModel, view, ids: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 logits at the last position of `ids` (n, T); the LM head sees one position."""
    if lm.adapter.lm_head(view) is None:
        raise UnsupportedArchitecture(f"{lm.adapter.family} has no language-model head to attribute")
    blocks = lm.adapter.blocks(view)
    # the final norm and the head run below, on the last position only
    h = run_stack(view, ids, stop_after=blocks[len(blocks) - 1])
    return lm.adapter.head(view, h[:, -1])


def last_position_fn(lm: LoadedModel, view, target: int, output: str = "logprob"):
    """f(ids (n, T)) -> (n,): the target token's log-probability (or logit) at the last position."""

    def f(ids: torch.Tensor) -> torch.Tensor:
        logits = last_logits(lm, view, ids)
        if output == "logit":
            return logits[:, target]
        return torch.log_softmax(logits, dim=-1)[:, target]

    return f


def integrated_gradients(
    lm: LoadedModel,
    variant: Variant,
    ids: torch.Tensor,
    target: int,
    baseline_ids: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    output: str = "logprob",
    internal_batch_size: int | None = None,
    method: str = METHOD,
) -> dict:
    """LayerIntegratedGradients on the token embedding of `variant` for one prompt (1, T) and target.

    Returns {"attributions" (T,), "delta", "f_input", "f_baseline", "sum", "seconds"}."""
    from captum.attr import LayerIntegratedGradients

    view = isolated_view(lm, variant, attn_implementation=None)  # private hooks; keep the fast kernel
    f = last_position_fn(lm, view, target, output)
    embed = lm.adapter.embeddings(view)[0]
    t0 = time.perf_counter()
    lig = LayerIntegratedGradients(f, embed)
    with torch.enable_grad():
        attr, delta = lig.attribute(
            inputs=ids,
            baselines=baseline_ids,
            n_steps=steps,
            method=method,
            internal_batch_size=internal_batch_size or min(steps, 32),  # bounded memory at 256 steps
            return_convergence_delta=True,
        )
    with torch.no_grad():
        fx = float(f(ids)[0])
        fb = float(f(baseline_ids)[0])
    per_token = attr.detach().sum(-1)[0].double()  # (T,)
    d = float(delta.reshape(-1)[0])
    return {
        # Our reading of "converged": the sum misses f(prompt) - f(baseline) by < 10 % of it (+ 0.05).
        "converged": abs(d) <= 0.1 * abs(fx - fb) + 0.05,
        "attributions": per_token.tolist(),
        "delta": d,
        "f_input": fx,
        "f_baseline": fb,
        "sum": float(per_token.sum()),
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def next_token(lm: LoadedModel, variant: Variant, ids: torch.Tensor) -> tuple[int, float]:
    """The variant's greedy next token after `ids` (1, T) and its probability."""
    view = isolated_view(lm, variant, attn_implementation=None)
    probs = torch.softmax(last_logits(lm, view, ids), dim=-1)[0]
    tok = int(probs.argmax())
    return tok, float(probs[tok])


def converging(run, steps: int, max_steps: int | None, progress=None) -> dict:
    """run(steps) -> an integrated_gradients result; doubled steps until it converges or the next
    doubling would pass max_steps (None: one try). The result says the steps it used and every try."""
    tries = []
    while True:
        r = run(steps)
        tries.append({"steps": steps, "delta": r["delta"], "seconds": r["seconds"]})
        if r["converged"] or max_steps is None or 2 * steps > max_steps:
            break
        steps *= 2
        if progress:
            progress(None, f"not converged yet (delta {r['delta']:.3g}): {steps} steps")
    r.update(steps=steps, tries=tries, seconds=sum(t["seconds"] for t in tries))
    return r


def analyze_attribution(
    lm: LoadedModel,
    variant: Variant,
    prompt: str | None = None,
    target: int | str | None = None,
    steps: int = DEFAULT_STEPS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    output: str = "logprob",
    progress=None,
    max_steps: int | None = MAX_STEPS,
) -> dict:
    """Attributions of the prompt's tokens to one next token, for the original and the variant.

    target: a token id, a string that encodes to exactly one token, or None for the original model's
    greedy next token. With the original as `variant`, only one column is computed. Each column starts
    at `steps` integration steps and doubles them while it has not converged, up to `max_steps`
    (None or <= steps: one try)."""
    if steps < 2:
        raise WorkbenchError("integrated gradients need at least 2 steps")
    if output not in ("logprob", "logit"):
        raise WorkbenchError(f"output must be 'logprob' or 'logit', got {output!r}")
    ids, notes = prompt_ids(lm, prompt, max_tokens)
    orig = original_variant(variant.num_blocks)
    greedy = next_token(lm, orig, ids)
    if target is None:
        target_id = greedy[0]
        target_how = "the original model's greedy next token"
    elif isinstance(target, str) and not target.lstrip("-").isdigit():
        enc = lm.tokenizer(target, add_special_tokens=False)["input_ids"]
        enc = enc[0] if enc and isinstance(enc[0], list) else enc
        if len(enc) != 1:
            raise WorkbenchError(f"target {target!r} is {len(enc)} tokens; give one token (or its id)")
        target_id, target_how = int(enc[0]), "given"
    else:
        target_id, target_how = int(target), "given"
    vocab = lm.adapter.lm_head(lm.model).weight.shape[0] if lm.adapter.lm_head(lm.model) is not None else None
    if vocab is not None and not 0 <= target_id < vocab:
        raise WorkbenchError(f"target token id {target_id} is outside the vocabulary (0..{vocab - 1})")
    baseline = baseline_ids(lm, ids)
    runs = [("original", orig)] + ([] if variant.is_identity() else [(variant.name, variant)])
    columns = []
    for k, (name, v) in enumerate(runs):
        if progress:
            progress(k / len(runs), f"integrated gradients on {name} ({steps} steps, {ids.shape[1]} tokens)")
        r = converging(lambda n: integrated_gradients(lm, v, ids, target_id, baseline, n, output), steps, max_steps,
                       progress and (lambda f, m, k=k: progress(k / len(runs), f"{name}: {m}")))
        tok, p = greedy if k == 0 else next_token(lm, v, ids)
        r.update(variant=name, greedy_token=tok, greedy_text=token_labels(lm.tokenizer, [tok])[0], greedy_prob=p)
        columns.append(r)
    if progress:
        progress(1.0, "attributions ready")
    return {
        "tokens": token_labels(lm.tokenizer, ids[0].tolist()),
        "input_ids": ids[0].tolist(),
        "target": {"id": target_id, "text": token_labels(lm.tokenizer, [target_id])[0], "chosen_as": target_how},
        "output": output,
        "steps": steps,
        "max_steps": max_steps,
        "method": f"captum LayerIntegratedGradients ({METHOD}) on the token embedding",
        "baseline": f"token {_baseline_token(lm.tokenizer)} at every position but the first (kept, so its attribution is 0)",
        "columns": columns,
        "notes": notes,
    }
