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
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import data
from .errors import Cancelled
from .block_stream import BlockTrace, run_block, run_span, trace_blocks
from .loading import LoadedModel
from .plan import LOGIT_CHUNK_BYTES  # defined beside the memory plan that counts it (no import cycle)
from .variant import DROP, Variant, block_modules, view_model

QUICK_CACHE_BUDGET_BYTES = 512 * 2**20  # stated budget for one model's quick-set cache


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about LOGIT_CHUNK_BYTES."""
    return max(1, LOGIT_CHUNK_BYTES // (4 * max(1, int(vocab))))


def _vocab(lm_or_model, adapter=None) -> int:
    model = getattr(lm_or_model, "model", lm_or_model)
    adapter = adapter or lm_or_model.adapter
    head = adapter.lm_head(model)
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def final_hidden(model, adapter, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, d) hidden states after the final norm: the base model's output, without the LM head."""
    base = getattr(model, "base_model", model)
    return base(input_ids=ids, use_cache=False).last_hidden_state


def stream_sums(logits_fn, vocab: int, targets: torch.Tensor, ref_hidden: torch.Tensor,
                var_hidden: torch.Tensor | None = None) -> dict:
    """Sums over tokens, computed chunk by chunk of tokens (fp32 throughout): the reference's NLL and,
    with a variant, KL(ref || var), top-1 agreement and the variant's NLL.

    logits_fn: (n, d) hidden -> (n, V) fp32 logits; ref_hidden / var_hidden (B, T, d) predict
    targets (B, T); out: {"ref_nll", "kl", "agree", "nll", "n"}.
    """
    d = ref_hidden.shape[-1]
    ref_rows = ref_hidden.reshape(-1, d)
    var_rows = var_hidden.reshape(-1, d) if var_hidden is not None else None
    tgt = targets.reshape(-1)
    step = chunk_tokens(vocab)
    out = {"ref_nll": 0.0, "kl": 0.0, "agree": 0.0, "nll": 0.0, "n": int(tgt.numel())}
    for a in range(0, tgt.numel(), step):
        t = tgt[a : a + step, None]
        ref = F.log_softmax(logits_fn(ref_rows[a : a + step]).float(), dim=-1)  # (n, V)
        out["ref_nll"] -= ref.gather(-1, t).sum().item()
        if var_rows is None:
            continue
        s = logit_sums(ref, logits_fn(var_rows[a : a + step]), t[:, 0])
        for k in ("kl", "agree", "nll"):
            out[k] += s[k]
    if var_rows is None:
        out.update(kl=0.0, agree=float(out["n"]), nll=out["ref_nll"])
    return out


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

    def sums_from_hidden(self, lm: LoadedModel, hidden: torch.Tensor) -> dict:
        """`logit_sums` from the variant's last hidden state (B, T, d), a chunk of tokens at a time."""
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        step = chunk_tokens(_vocab(lm))
        flat = {k: getattr(self, k).reshape(h.shape[0], *getattr(self, k).shape[2:])
                for k in ("ref_logp", "ref_negent", "ref_psum", "ref_top1")}
        tgt = self.ids[:, 1:].reshape(-1)
        tot = {"kl": 0.0, "agree": 0.0, "nll": 0.0, "n": int(tgt.numel())}
        for a in range(0, h.shape[0], step):
            part = {k: v[a : a + step] for k, v in flat.items()}
            s = self._sums(lm.adapter.head(lm.model, h[a : a + step]), tgt[a : a + step], **part)
            for k in ("kl", "agree", "nll"):
                tot[k] += s[k]
        return tot

    def sums(self, lm: LoadedModel, variant: Variant, start: int | None = None, memo: "RunMemo | None" = None) -> dict:
        """Sums over the cached tokens ({"kl", "agree", "nll", "n"}) of `variant`, run from original block
        `start` (default: its first change) on; the identity variant is the reference itself. With a
        `memo` of the last variant run here, the run starts where the two variants first differ, if that
        is later (a click that adds or removes one block of a selection), and the memo then holds this one."""
        targets = self.ids[:, 1:]
        if variant.is_identity():
            n = targets.numel()
            return {"kl": 0.0, "agree": float(n), "nll": self.ref_nll * n, "n": n}
        if memo is not None and start is None:
            return self.sums_from_hidden(lm, memo.run(lm, variant, self.trace))
        start = variant.first_change() if start is None else start
        return self.sums_from_hidden(lm, run_from(lm, variant, self.trace, start))

    def evaluate(self, lm: LoadedModel, variant: Variant, start: int | None = None) -> dict:
        """{"ppl", "kl", "top1", "nll"} of `variant` on the cached tokens (see `sums`)."""
        if variant.is_identity():  # exactly the reference's own figures
            return {"ppl": math.exp(self.ref_nll), "kl": 0.0, "top1": 1.0, "nll": self.ref_nll}
        return _summarise(self.sums(lm, variant, start))

    @staticmethod
    def _sums(logits, targets, ref_logp, ref_negent, ref_psum, ref_top1) -> dict:
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # (B, T-1)
        # An elementwise product and sum: einsum's batched-matmul path lost ~2e-3 nats here on CPU.
        p_dot_z = ref_logp.float().exp_().mul_(logits).sum(-1)  # in place: one (n, V) fp32 temporary
        kl = ref_negent - p_dot_z + lse * ref_psum
        nll = lse - logits.gather(-1, targets[..., None]).squeeze(-1)
        agree = (logits.argmax(-1) == ref_top1).float()
        return {"kl": kl.sum().item(), "agree": agree.sum().item(), "nll": nll.sum().item(), "n": targets.numel()}


@dataclass
class RunMemo:
    """The hidden states of the last variant run on a QuickCache's tokens: `states[i]` enters original
    block index i (None: the trace's own, the variant being the original's up to there), `output` leaves
    the last block; `blocks[i]` says what stood at index i (None: the original block, DROP, or the
    replacement module). The next variant runs only from the first index where the two differ, or from
    its own first change if that is later; the states below are the same tensors the same blocks made."""

    states: list = field(default_factory=list)
    output: torch.Tensor | None = None
    runs: list = field(default_factory=list, repr=False)  # original indices run from, newest last

    def __post_init__(self):  # not a field: the result cache counts the states, not the blocks' weights
        self.blocks: list = []

    def start_for(self, variant: Variant) -> int:
        """The first index to run for `variant` (num_blocks: nothing to run, the memo's output stands)."""
        fc = variant.first_change()
        n = variant.num_blocks
        if len(self.blocks) != n or self.output is None:
            return fc
        same = next((i for i in range(n) if not _same_block(self.blocks[i], variant.overrides.get(i))), n)
        return max(fc, same)

    @torch.no_grad()
    def run(self, lm: LoadedModel, variant: Variant, trace: BlockTrace) -> torch.Tensor:
        """The hidden state after `variant`'s last kept block; the memo then holds `variant`'s states."""
        n = variant.num_blocks
        start = self.start_for(variant)
        self.runs = (self.runs + [start])[-16:]
        if start >= n:
            return self.output
        if start == variant.first_change():  # below it the variant is the original: the trace's states
            states, h = [None] * start, trace.inputs[start]
        else:  # below `start` the two variants are the same blocks: the memo's states stand
            states = self.states[:start]
            h = self.states[start] if self.states[start] is not None else trace.inputs[start]
        modules = dict(block_modules(lm.model, lm.adapter, variant))
        for i in range(start, n):
            states.append(None if h is trace.inputs[i] else h)
            if i in modules:
                h = run_block(modules[i], h, trace.calls[i])
        self.states, self.output = states, h
        self.blocks = [_block_ref(variant.overrides.get(i)) for i in range(n)]
        return h


def _block_ref(o):
    """What stood at an index, without keeping a replacement module alive (a released variant's block)."""
    return o if o is None or o is DROP else weakref.ref(o)


def _same_block(ref, o) -> bool:
    if ref is None or ref is DROP:
        return ref is o
    return o is not None and o is not DROP and ref() is o


@torch.no_grad()
def reference_cache(lm: LoadedModel, ids: torch.Tensor) -> QuickCache:
    """Trace the original once on `ids` (B, T) and cache its side of every comparison: the engine's one
    traced evaluator (the quick set, the sparsity sweep's evaluation subset)."""
    trace = trace_blocks(lm.model, lm.adapter, ids)
    h = trace.output[:, :-1]  # (B, T-1, d)
    B, T1 = h.shape[:2]
    rows = h.reshape(B * T1, -1)
    tgt = ids[:, 1:].reshape(-1)
    step = chunk_tokens(_vocab(lm))
    lp16, negent, psum, top1, nll = [], [], [], [], 0.0
    for a in range(0, rows.shape[0], step):  # chunks of tokens: bounded whatever the vocabulary
        logp = F.log_softmax(lm.adapter.head(lm.model, rows[a : a + step]), dim=-1)  # (n, V)
        nll -= logp.gather(-1, tgt[a : a + step, None]).sum().item()
        lp = logp.half()
        top1.append(logp.argmax(-1))
        del logp  # the (n, V) fp32 temporaries are made one at a time, in place where they can be
        lpf = lp.float()
        lp16.append(lp)
        p = lpf.exp()
        psum.append(p.sum(-1))
        negent.append(p.mul_(lpf).sum(-1))
        del p, lpf
    shape = (B, T1)
    return QuickCache(ids=ids, trace=trace, ref_logp=torch.cat(lp16).reshape(B, T1, -1),
                      ref_negent=torch.cat(negent).reshape(shape), ref_psum=torch.cat(psum).reshape(shape),
                      ref_top1=torch.cat(top1).reshape(shape), ref_nll=nll / max(1, tgt.numel()))


def quick_cache(lm: LoadedModel) -> QuickCache:
    """Build the quick set's trace and the original's reference (a Workspace keeps one per model, pinned in
    its shared result cache; a caller evaluating many variants alone keeps the one it built)."""
    qc = reference_cache(lm, data.quick_ids(lm.tokenizer).to(lm.device))
    if qc.nbytes() > QUICK_CACHE_BUDGET_BYTES:
        raise MemoryError(f"quick cache needs {qc.nbytes() / 2**20:.0f} MiB, over its budget")
    return qc


@torch.no_grad()
def run_from(lm: LoadedModel, variant: Variant, trace: BlockTrace, start: int) -> torch.Tensor:
    """Hidden state after the variant's last block, starting at original block `start` from the trace."""
    return run_span(lm.model, lm.adapter, variant, trace, start)


def logit_sums(ref_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
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
def quick_eval(lm: LoadedModel, variant: Variant, reference: QuickCache | None = None,
               memo: RunMemo | None = None) -> dict:
    """KL, top-1 agreement and (noisy) perplexity on the quick set, from the first changed block on.
    `reference`: the quick_cache(lm) to compare against (built here when not given); `memo`: the states
    of the last variant evaluated with it (see RunMemo), updated."""
    t0 = time.perf_counter()
    qc = reference or quick_cache(lm)
    s = qc.sums(lm, variant, memo=memo)
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
    from .adapters import adapter_for
    from .loading import unpack_compressed

    unpack_compressed(model)  # a compressed-tensors reload dequantizes on its first whole-model forward
    adapter = adapter_for(model)
    vocab = _vocab(model, adapter)
    nll, n = 0.0, 0
    for b0 in range(0, ids.shape[0], batch_size):
        batch = ids[b0 : b0 + batch_size].to(device if device is not None else ids.device)
        h = final_hidden(model, adapter, batch)[:, :-1]
        s = stream_sums(lambda x: adapter.logits(model, x), vocab, batch[:, 1:], h)
        nll += s["ref_nll"]
        n += s["n"]
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
    vocab = _vocab(lm)
    totals = {"kl": 0.0, "agree": 0.0, "nll": 0.0, "n": 0}
    ref_nll = 0.0
    t0 = time.perf_counter()
    for b0 in range(0, ids.shape[0], batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation cancelled")
        batch = ids[b0 : b0 + batch_size].to(lm.device)
        ref_h = final_hidden(lm.model, lm.adapter, batch)[:, :-1]
        var_h = None if variant.is_identity() else final_hidden(vmodel, lm.adapter, batch)[:, :-1]
        # The view shares the original's LM head, so one head serves both sides.
        s = stream_sums(lambda x: lm.adapter.logits(lm.model, x), vocab, batch[:, 1:], ref_h, var_h)
        ref_nll += s["ref_nll"]
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
