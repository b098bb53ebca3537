"""Attention probabilities of a prompt, and token importance by weighted PageRank on them.

- Capture: the model (original or any variant) runs on a private, isolated copy of its module tree whose
  configs say `_attn_implementation = "eager"`, so the attention modules return their probabilities
  even where the loaded model uses a fused kernel (SDPA). Parameters are shared; the original's modules,
  configs and hook tables are never touched, so nothing needs restoring and no other thread sees our hooks.
- PageRank (Zero-TPrune, Wang et al., CVPR 2024, arXiv 2305.17328): the attention matrix A of one head
  (rows = queries, each row sums to 1) is the adjacency of a graph; s_0 = 1/N, s_(t+1) = A^T s_t.
  Under a causal mask the plain iteration drains every bit of mass into the first token (it is the
  only node every other node can reach), so we add damping with a uniform teleport,
  s_(t+1) = d A^T s_t + (1 - d)/N (d = 0.85 by default; d = 1 is the paper's plain iteration), and can
  leave out the first ("sink") token altogether. Iterated until the L1 change is below `tol`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..block_stream import (  # noqa: F401  (prompt_ids, token_labels, DEFAULT_PROMPT: callers read them here)
    DEFAULT_PROMPT,
    forward_base,
    isolated_view,
    owned_hooks,
    prompt_ids,
    token_labels,
    view_blocks,
)
from ..errors import UnsupportedArchitecture, WorkbenchError
from ..loading import LoadedModel
from ..variant import Variant

log = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.85
DEFAULT_TOL = 1e-6


def attention_probs_of(out) -> torch.Tensor:
    """The probabilities an attention module returned: (B, H, T, T), or a typed error."""
    probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    if not isinstance(probs, torch.Tensor):
        raise UnsupportedArchitecture("the attention module returned no probabilities, even in eager mode")
    return probs


# ---- capture --------------------------------------------------------------------------------------
@dataclass
class AttentionCapture:
    """Attention of one prompt. probs: (L, H, T, T) float32 on CPU, rows = queries; blocks[l] is the
    original index of layer l (dropped blocks are absent)."""

    input_ids: list[int]
    tokens: list[str]
    blocks: list[int]
    probs: torch.Tensor
    causal: bool
    variant: str = "original"
    notes: list[str] = field(default_factory=list)

    @property
    def num_heads(self) -> int:
        return int(self.probs.shape[1])


@torch.no_grad()
def capture_attention(
    lm: LoadedModel,
    variant: Variant,
    input_ids: torch.Tensor,
    blocks: list[int] | None = None,
) -> AttentionCapture:
    """Attention probabilities of every head of the variant's kept blocks (or only `blocks`, original
    indices) for one prompt, captured from the attention modules in eager mode."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise WorkbenchError("capture_attention takes one prompt (batch of 1)")
    view = isolated_view(lm, variant)
    pairs = view_blocks(lm, view, variant)
    if blocks is not None:
        want = set(int(b) for b in blocks)
        missing = want - {i for i, _ in pairs}
        if missing:
            raise WorkbenchError(f"block(s) {sorted(missing)} are not in variant '{variant.name}'")
        pairs_used = [(i, b) for i, b in pairs if i in want]
    else:
        pairs_used = pairs
    got: dict[int, torch.Tensor] = {}

    def make(i):
        def hook(module, args, out):
            got[i] = attention_probs_of(out)[0].float().cpu()  # (H, T, T)

        return hook

    handles = [lm.adapter.attention(b).register_forward_hook(make(i)) for i, b in pairs_used]
    with owned_hooks(*handles):
        forward_base(lm, view, input_ids.to(lm.device), stop_after=pairs_used[-1][1] if pairs_used else None)
    order = [i for i, _ in pairs_used]
    probs = torch.stack([got[i] for i in order]) if order else torch.empty(0)
    ids = input_ids[0].tolist()
    return AttentionCapture(
        input_ids=ids,
        tokens=token_labels(lm.tokenizer, ids),
        blocks=order,
        probs=probs,
        causal=lm.adapter.causal,
        variant=variant.name,
    )


# ---- PageRank -------------------------------------------------------------------------------------
@dataclass
class PageRankResult:
    scores: torch.Tensor  # (..., N), each row sums to 1 (the skipped first token holds 0)
    iterations: int
    delta: float  # L1 change of the last iteration (max over the batch)
    converged: bool


def pagerank(
    attn: torch.Tensor,
    damping: float = DEFAULT_DAMPING,
    skip_first: bool = False,
    tol: float = DEFAULT_TOL,
    max_iter: int = 1000,
) -> PageRankResult:
    """Weighted PageRank on attention graphs (Zero-TPrune): s <- d A^T s + (1 - d)/N, s_0 = 1/N.

    attn: (..., N, N), rows = queries, rows sum to 1 (batched over any leading dims, e.g. layers, heads).
    skip_first: drop the first token's row and column and renormalise the rows (query 0 is gone;
    every other query's mass on token 0 is redistributed proportionally); its score is reported as 0.
    A row with no mass left (a "dangling" node) links uniformly to every node, as in standard PageRank.
    Stops when the L1 change of every graph's score vector is below `tol` (float64 arithmetic).
    """
    if not 0.0 <= damping <= 1.0:
        raise WorkbenchError(f"damping must be in [0, 1], got {damping}")
    if attn.shape[-1] != attn.shape[-2]:
        raise WorkbenchError(f"attention matrices must be square, got {tuple(attn.shape[-2:])}")
    a = attn.to(torch.float64)
    n_full = a.shape[-1]
    if skip_first:
        if n_full < 2:
            raise WorkbenchError("skip_first needs at least two tokens")
        a = a[..., 1:, 1:]
    n = a.shape[-1]
    rows = a.sum(-1, keepdim=True)  # (..., N, 1)
    dangling = rows <= 1e-12
    a = torch.where(dangling, torch.full_like(a, 1.0 / n), a / rows.clamp_min(1e-300))
    s = torch.full(a.shape[:-1], 1.0 / n, dtype=torch.float64, device=a.device)  # (..., N)
    delta, it = float("inf"), 0
    while it < max_iter:
        it += 1
        new = damping * (s.unsqueeze(-2) @ a).squeeze(-2) + (1.0 - damping) / n  # s A = A^T s
        delta = float((new - s).abs().sum(-1).max()) if new.numel() else 0.0
        s = new
        if delta < tol:
            break
    if skip_first:
        s = torch.cat([torch.zeros_like(s[..., :1]), s], dim=-1)
    return PageRankResult(scores=s, iterations=it, delta=delta, converged=delta < tol)


def head_entropy(probs: torch.Tensor, causal: bool) -> torch.Tensor:
    """Mean over queries t >= 1 of each row's entropy divided by its maximum (log of the visible keys).

    probs (..., T, T) -> (...); 0 = every query looks at one token, 1 = uniform over what it may see."""
    T = probs.shape[-1]
    p = probs.double().clamp_min(1e-30)
    ent = -(p * p.log()).sum(-1)  # (..., T)
    visible = torch.arange(1, T + 1, dtype=torch.float64, device=probs.device) if causal else torch.full((T,), float(T), dtype=torch.float64, device=probs.device)
    norm = ent[..., 1:] / visible[1:].log()
    return norm.mean(-1)


# ---- the view the CLI and the panel show ----------------------------------------------------------
def attention_report(
    cap: AttentionCapture,
    damping: float = DEFAULT_DAMPING,
    skip_first: bool = False,
    tol: float = DEFAULT_TOL,
    progress=None,
) -> dict:
    """PageRank per layer and head and of the head average, first-token mass and entropy per head.

    Returns plain lists (JSON-ready); the (L, H, T, T) maps themselves stay in the capture."""
    L = len(cap.blocks)
    pr_heads, pr_layer, iters, worst = [], [], 0, 0.0
    first_mass, entropy = [], []
    for li in range(L):
        p = cap.probs[li]  # (H, T, T)
        r = pagerank(p, damping, skip_first, tol)
        ra = pagerank(p.mean(0), damping, skip_first, tol)
        pr_heads.append(r.scores.float().tolist())
        pr_layer.append(ra.scores.float().tolist())
        iters = max(iters, r.iterations, ra.iterations)
        worst = max(worst, r.delta, ra.delta)
        first_mass.append(p[:, 1:, 0].mean(-1).tolist() if p.shape[-1] > 1 else [0.0] * p.shape[0])
        entropy.append(head_entropy(p, cap.causal).float().tolist() if p.shape[-1] > 1 else [0.0] * p.shape[0])
        if progress:
            progress((li + 1) / max(L, 1), f"PageRank layer {cap.blocks[li]}")
    return {
        "variant": cap.variant,
        "tokens": cap.tokens,
        "input_ids": cap.input_ids,
        "blocks": cap.blocks,
        "num_heads": cap.num_heads if L else 0,
        "pagerank": {
            "damping": damping,
            "skip_first": skip_first,
            "tol": tol,
            "max_iterations_used": iters,
            "max_final_delta": worst,
            "converged": worst < tol,
            "per_head": pr_heads,  # [layer][head][token]
            "head_average": pr_layer,  # [layer][token]: PageRank of the head-averaged matrix
        },
        "first_token_mass": first_mass,  # [layer][head]
        "entropy": entropy,  # [layer][head], normalised to [0, 1]
        "notes": list(cap.notes),
    }


def analyze_attention(
    lm: LoadedModel,
    variant: Variant,
    prompt: str | None = None,
    max_tokens: int | None = 512,
    damping: float = DEFAULT_DAMPING,
    skip_first: bool = False,
    tol: float = DEFAULT_TOL,
    progress=None,
) -> tuple[AttentionCapture, dict]:
    """Capture one prompt's attention on the variant and compute its report. -> (capture, report)."""
    ids, notes = prompt_ids(lm, prompt, max_tokens)
    if progress:
        progress(0.05, f"running {variant.name} in eager attention on {ids.shape[1]} tokens")
    cap = capture_attention(lm, variant, ids)
    cap.notes.extend(notes)
    sub = (lambda f, m: progress(0.3 + 0.7 * f, m)) if progress else None
    return cap, attention_report(cap, damping, skip_first, tol, progress=sub)
