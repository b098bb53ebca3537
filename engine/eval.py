"""Evaluation: perplexity, KL(original || variant), top-1 agreement, size and latency.

Two tiers:
- quick: a fixed few hundred tokens (QUICK_SAMPLES x QUICK_SEQ_LEN), answered right after every change.
  The original's log-probabilities (fp16) and the hidden state entering each block are cached once per
  loaded model and shared by all sessions; a variant whose first change is block i runs from block i.
  Perplexity on so few tokens is noisy: KL and top-1 agreement are the headline.
- full: the whole evaluation split, original and variant side by side, with progress, cancellable.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data
from .errors import Cancelled
from .hooks import BlockTrace, run_block, trace_blocks
from .loading import LoadedModel
from .workspace import Variant, block_modules, view_model

QUICK_CACHE_BUDGET_BYTES = 512 * 2**20  # stated budget for one model's quick-set cache


@dataclass
class QuickCache:
    """The original's side of every quick comparison, computed once.

    KL(p || q) = sum_v p_v log p_v - sum_v p_v log q_v, and log q_v = z_v - lse(z) for the variant's logits
    z: with the original's log-probabilities (fp16), its negative entropy sum p log p and sum p (fp32, from
    the same rounded log-probabilities, so the pair stays consistent) cached, a comparison needs only the
    variant's logits, one logsumexp and one dot product per token.
    """

    ids: torch.Tensor  # (B, T)
    trace: BlockTrace
    ref_logp: torch.Tensor  # (B, T-1, V) fp16 log-probs of the original at positions predicting ids[:, 1:]
    ref_negent: torch.Tensor  # (B, T-1) fp32 sum_v p log p
    ref_psum: torch.Tensor  # (B, T-1) fp32 sum_v p (1 up to the fp16 rounding of log p)
    ref_top1: torch.Tensor  # (B, T-1) the original's argmax
    ref_nll: float

    def nbytes(self) -> int:
        return self.trace.nbytes() + sum(
            t.numel() * t.element_size() for t in (self.ref_logp, self.ref_negent, self.ref_psum, self.ref_top1)
        )

    def compare(self, logits: torch.Tensor) -> dict:
        """Sums over the quick tokens, as `compare` returns them, from the variant's logits (B, T-1, V)."""
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # (B, T-1)
        targets = self.ids[:, 1:]
        # An elementwise product and sum: einsum's batched-matmul path lost ~2e-3 nats here on CPU.
        p_dot_z = (self.ref_logp.float().exp() * logits).sum(-1)
        kl = self.ref_negent - p_dot_z + lse * self.ref_psum
        nll = lse - logits.gather(-1, targets[..., None]).squeeze(-1)
        agree = (logits.argmax(-1) == self.ref_top1).float()
        return {"kl": kl.sum().item(), "agree": agree.sum().item(), "nll": nll.sum().item(), "n": targets.numel()}


_cache_lock = threading.Lock()


def quick_cache(lm: LoadedModel) -> QuickCache:
    """Build (once per loaded model, thread-safe) the quick set's cached trace and reference."""
    with _cache_lock:
        qc = getattr(lm, "_quick_cache", None)
        if qc is None:
            ids = data.quick_ids(lm.tokenizer).to(lm.device)
            trace = trace_blocks(lm.model, lm.adapter, ids)
            logits = lm.adapter.head(lm.model, trace.output)
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).mean().item()
            lp16 = logp.half()
            lp = lp16.float()
            qc = QuickCache(ids=ids, trace=trace, ref_logp=lp16, ref_negent=(lp.exp() * lp).sum(-1),
                            ref_psum=lp.exp().sum(-1), ref_top1=logp.argmax(-1), ref_nll=nll)
            if qc.nbytes() > QUICK_CACHE_BUDGET_BYTES:
                raise MemoryError(f"quick cache needs {qc.nbytes() / 2**20:.0f} MiB, over its budget")
            lm._quick_cache = qc
        return qc


@torch.no_grad()
def run_from(lm: LoadedModel, variant: Variant, trace: BlockTrace, start: int) -> torch.Tensor:
    """Hidden state after the variant's last block, starting at original block `start` from the trace."""
    h = trace.inputs[start]
    for i, module in block_modules(lm.model, lm.adapter, variant):
        if i >= start:
            h = run_block(module, h, trace.calls[i])
    return h


def compare(ref_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over tokens: KL(ref || var) in nats, top-1 agreements, variant NLL; and the token count."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref = ref_logp.float()
    kl = (ref.exp() * (ref - logp)).sum(-1)
    agree = (ref.argmax(-1) == logp.argmax(-1)).float()
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    return {"kl": kl.sum().item(), "agree": agree.sum().item(), "nll": nll.sum().item(), "n": targets.numel()}


def size_of(lm: LoadedModel, variant: Variant) -> dict:
    """Parameters and bytes of the variant. A replacement module may declare `workbench_nbytes`."""
    model = lm.model
    blocks = lm.adapter.blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = [p for p in _unique_params(model) if id(p) not in in_blocks]
    params = sum(p.numel() for p in outside)
    nbytes = sum(p.numel() * p.element_size() for p in outside)
    for _, m in block_modules(model, lm.adapter, variant):
        n = sum(p.numel() for p in m.parameters())
        params += n
        nbytes += getattr(m, "workbench_nbytes", None) or sum(p.numel() * p.element_size() for p in m.parameters())
    return {"parameters": int(params), "bytes": int(nbytes)}


def _unique_params(model):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


@torch.no_grad()
def quick_eval(lm: LoadedModel, variant: Variant) -> dict:
    """KL, top-1 agreement and (noisy) perplexity on the quick set, from the first changed block on."""
    t0 = time.perf_counter()
    qc = quick_cache(lm)
    targets = qc.ids[:, 1:]
    if variant.is_identity():
        s = {"kl": 0.0, "agree": float(targets.numel()), "nll": qc.ref_nll * targets.numel(), "n": targets.numel()}
    else:
        h = run_from(lm, variant, qc.trace, variant.first_change())
        s = qc.compare(lm.adapter.head(lm.model, h)[:, :-1])
    out = _summarise(s)
    out.update(size_of(lm, variant))
    out["tokens"] = int(s["n"])
    out["seconds"] = time.perf_counter() - t0
    out["tier"] = "quick"
    return out


def _summarise(s: dict) -> dict:
    n = max(s["n"], 1)
    return {"kl": s["kl"] / n, "top1": s["agree"] / n, "ppl": math.exp(s["nll"] / n), "nll": s["nll"] / n}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 4, device=None) -> tuple[float, int]:
    """Perplexity of `model` alone on the token windows `ids` (B, T), batch by batch, and the number of
    tokens scored: full_eval's NLL without the side-by-side original (for benchmarks' extra rows)."""
    nll, n = 0.0, 0
    for b0 in range(0, ids.shape[0], batch_size):
        batch = ids[b0 : b0 + batch_size].to(device if device is not None else ids.device)
        logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        nll -= logp.gather(-1, batch[:, 1:, None]).sum().item()
        n += batch[:, 1:].numel()
    return math.exp(nll / max(n, 1)), n


@torch.no_grad()
def full_eval(
    lm: LoadedModel,
    variant: Variant,
    source: str = data.DEFAULT_SOURCE,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress=None,
    cancel: threading.Event | None = None,
) -> dict:
    """Perplexity of the variant on the evaluation split; with a non-identity variant, KL and top-1
    agreement against the original on the same tokens (both run side by side, batch by batch)."""
    ids = data.evaluation_ids(lm.tokenizer, source, seq_len, max_tokens)
    vmodel = view_model(lm.model, lm.adapter, variant)
    totals = {"kl": 0.0, "agree": 0.0, "nll": 0.0, "n": 0}
    ref_nll = 0.0
    t0 = time.perf_counter()
    for b0 in range(0, ids.shape[0], batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation cancelled")
        batch = ids[b0 : b0 + batch_size].to(lm.device)
        targets = batch[:, 1:]
        ref = F.log_softmax(lm.model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        ref_nll += -ref.gather(-1, targets[..., None]).sum().item()
        logits = ref if variant.is_identity() else vmodel(input_ids=batch, use_cache=False).logits[:, :-1]
        s = compare(ref, logits, targets)
        for k in totals:
            totals[k] += s[k]
        if progress is not None:
            progress(min(1.0, (b0 + batch.shape[0]) / ids.shape[0]), f"evaluated {totals['n']} tokens")
    out = _summarise(totals)
    out["ppl_original"] = math.exp(ref_nll / max(totals["n"], 1))
    out.update(size_of(lm, variant))
    out.update({"tokens": int(totals["n"]), "seq_len": seq_len, "source": source, "tier": "full"})
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def generate(lm: LoadedModel, variant: Variant, prompt: str, max_new_tokens: int = 48, streamer=None, chat: bool = True) -> dict:
    """Greedy generation with a KV cache (chat template where the model has one); tokens/s measured."""
    model = view_model(lm.model, lm.adapter, variant)
    tok = lm.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(lm.device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1] :]
    return {
        "text": tok.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "seconds": dt,
        "tokens_per_s": new.numel() / dt if dt > 0 else float("nan"),
    }
