"""The block stream: every analysis and operation runs the decoder's blocks through this one module.

- trace (`trace_blocks`): one forward that records, for every block, the hidden state entering it and the
  other arguments the model passed it (attention mask, rotary embeddings, positions). With those, any
  block can be re-run on its own (`run_block`), and a variant can be evaluated from its first changed
  block onward without re-running the blocks before it (`run_span`).
- stop after block k (`run_stack`): the decoder stack without the LM head, ended by an exception raised
  from a forward hook once block k has run; its output is returned. The one such forward in the engine.
- per-linear statistics (`InputStatistic`, `HessianStats`, `SquaredNorms`, `point_hooks`): forward hooks
  on named modules, registered and always removed by `owned_hooks` (IST-DASLab/gptq's `add_batch`,
  Wanda's feature norms, the outlier moments of a module's input or output).
- sequential calibration (`Stream`): the hidden state entering each kept block of a variant being built,
  carried forward through its compressed blocks, in calibration chunks, cancellable, with progress;
  written once and used by quantize and fuse (IST-DASLab/gptq's order: compress a block, re-run it, feed
  its output to the next).
- isolated views (`isolated_view`, `view_blocks`) and prompts (`prompt_ids`, `token_labels`): generic
  helpers of the prompt-level analyses (attention, outliers, attributions).
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .adapters.base import rebind_hooked_forward
from .errors import Cancelled, WorkbenchError
from .variant import DROP, Variant, block_modules, current_block, view_model

DEFAULT_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Compression keeps what matters, "
    "and attention shows which words a model reads."
)


# ---- owned hooks ----------------------------------------------------------------------------------
@contextlib.contextmanager
def owned_hooks(*handles_or_fns):
    """Own a set of hook handles and remove them in `finally`, whatever happens inside."""
    handles = list(handles_or_fns)
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


hooks = owned_hooks  # the name the engine used before the block stream


def check_cancel(cancel, message: str = "cancelled") -> None:
    """Raise Cancelled when `cancel` (a threading.Event or a callable) says so; None never cancels."""
    if cancel is None:
        return
    if cancel.is_set() if hasattr(cancel, "is_set") else cancel():
        raise Cancelled(message)


# ---- the trace ------------------------------------------------------------------------------------
@dataclass
class BlockCall:
    """Everything but the hidden state that the model passed to one block."""

    args: tuple
    kwargs: dict


@dataclass
class BlockTrace:
    """Inputs of every block for one batch of token ids, plus the last block's output.

    inputs[i]: (B, T, d) hidden state entering original block i; output: (B, T, d) leaving the last.
    """

    input_ids: torch.Tensor
    inputs: list[torch.Tensor]
    calls: list[BlockCall]
    output: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.inputs, self.output))


class _Stop(Exception):
    """Raised from a forward hook to end a forward once the block we need has run."""


def _hidden_of(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _is_cache(obj) -> bool:
    return type(obj).__name__.endswith("Cache")


def _base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without LM head where the model has one (saves the head's matmul)."""
    return getattr(model, "base_model", model)


def run_stack(model: nn.Module, ids: torch.Tensor, stop_after: nn.Module | None = None, attention_mask=None):
    """Run the decoder stack (no LM head, no KV cache) on `ids`; with `stop_after` (a block), end the
    forward as soon as it has run and return its output hidden state (B, T, d); else return None.

    Not under no_grad: attributions take gradients through it."""
    got: dict = {}
    handles = []
    if stop_after is not None:

        def stop(module, args, out):
            got["h"] = _hidden_of(out)
            raise _Stop

        handles.append(stop_after.register_forward_hook(stop))
    with owned_hooks(*handles):
        try:
            _base_model(model)(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
    return got.get("h")


@torch.no_grad()
def trace_blocks(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, attention_mask=None,
                 upto: int | None = None) -> BlockTrace:
    """One forward pass recording each block's input and call arguments (no KV cache, no LM head). With
    `upto`, the pass ends after block `upto`: later blocks' inputs stay None and `output` is that block's
    (for work on the blocks up to it: GPTQ of the first two blocks of a 28-block model ran all 28)."""
    blocks = adapter.blocks(model)
    n = len(blocks)
    last = n - 1 if upto is None else min(int(upto), n - 1)
    inputs: list = [None] * n
    calls: list = [None] * n

    def make_pre(i):
        def pre(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
            rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            rest_kwargs["use_cache"] = False
            for key in ("cache", "past_key_values", "layer_past"):
                if key in rest_kwargs:
                    rest_kwargs[key] = None
            rest_args = tuple(None if _is_cache(a) else a for a in args[1:])
            calls[i] = BlockCall(rest_args, rest_kwargs)

        return pre

    handles = [blk.register_forward_pre_hook(make_pre(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    with owned_hooks(*handles):
        out = run_stack(model, input_ids, stop_after=blocks[last], attention_mask=attention_mask)
    return BlockTrace(input_ids=input_ids, inputs=inputs, calls=calls, output=out)


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Re-run one block on `hidden` with the arguments the model gave it when traced."""
    return _hidden_of(block(hidden, *call.args, **call.kwargs))


def map_call(call: BlockCall, fn) -> BlockCall:
    """Apply `fn` to every tensor in a block's call arguments (inside tuples and dicts too)."""

    def walk(v):
        if isinstance(v, torch.Tensor):
            return fn(v)
        if isinstance(v, tuple):
            return tuple(walk(x) for x in v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return BlockCall(tuple(walk(a) for a in call.args), {k: walk(v) for k, v in call.kwargs.items()})


def slice_call(call: BlockCall, rows: slice, n_rows: int) -> BlockCall:
    """The call arguments for rows `rows` of a batch of `n_rows`: only per-sample tensors (at least 2-D
    with n_rows in dim 0) are cut; (1, T) positions and (T,) vectors broadcast as they are."""
    if rows == slice(None) or n_rows == 1:
        return call
    return map_call(call, lambda v: v[rows] if v.dim() >= 2 and v.shape[0] == n_rows else v)


def run_chunked(block: nn.Module, hidden: torch.Tensor, call: BlockCall, batch: int | None = None,
                on_batch=None) -> torch.Tensor:
    """Run one block over a batch in chunks of `batch` samples (None: all at once), calling `on_batch()`
    before each chunk (statistics that must tell one forward from the next)."""
    n = hidden.shape[0]
    if batch is None or batch >= n:
        if on_batch is not None:
            on_batch()
        return run_block(block, hidden, call)
    outs = []
    for b0 in range(0, n, batch):
        rows = slice(b0, b0 + batch)
        if on_batch is not None:
            on_batch()
        outs.append(run_block(block, hidden[rows], slice_call(call, rows, n)))
    return torch.cat(outs, dim=0)


@torch.no_grad()
def run_span(model: nn.Module, adapter: Adapter, variant: Variant, trace: BlockTrace, start: int,
             stop: int | None = None, hidden: torch.Tensor | None = None, cancel=None) -> torch.Tensor:
    """The hidden state after the variant's kept blocks from original block `start` through `stop`
    (inclusive; None: the last), fed `hidden` (default: the trace's input of `start`)."""
    h = trace.inputs[start] if hidden is None else hidden
    for i, module in block_modules(model, adapter, variant):
        if i < start:
            continue
        if stop is not None and i > stop:
            break
        check_cancel(cancel)
        h = run_block(module, h, trace.calls[i])
    return h


# ---- per-linear statistics ------------------------------------------------------------------------
class InputStatistic:
    """Forward pre-hooks on named modules that accumulate a statistic of each module's input.

    Subclasses define `add(name, x)`. `start_batch()` marks the start of a forward (see HessianStats)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules

    def start_batch(self) -> None:
        pass

    def add(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _hook(self, name):
        def pre(module, args):
            self.add(name, args[0])

        return pre

    def handles(self):
        return [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]

    @contextlib.contextmanager
    def watching(self):
        """The hooks, registered for the duration and always removed; held inputs released at the end."""
        try:
            with owned_hooks(*self.handles()):
                yield self
        finally:
            self.start_batch()


def point_hooks(points: dict, add) -> list:
    """Hooks handing each point's activation to `add(key, tensor)`; `points` {key: (module, "in" | "out")}:
    "in" reads the module's first input (a pre-hook), "out" the hidden state it returns (outlier moments).
    Register them inside `owned_hooks(*...)` so they are always removed."""

    def reader(key, where):
        if where == "in":
            def pre(module, args):
                add(key, args[0])

            return pre

        def post(module, args, out):
            add(key, _hidden_of(out))

        return post

    handles = []
    for key, (module, where) in points.items():
        hook = reader(key, where)
        handles.append(module.register_forward_pre_hook(hook) if where == "in" else module.register_forward_hook(hook))
    return handles


class HessianStats(InputStatistic):
    """sum(x x^T) and the token count of each linear's input (GPTQ's H = X X^T / N).

    Linears that read the very same input tensor in a forward (q/k/v, gate/up) share one accumulator:
    the tensors seen in the current forward are held (so their storage cannot be reused and mistaken
    for another input) and looked up by storage pointer, shape and stride.
    """

    def __init__(self, linears: dict[str, nn.Module]):
        super().__init__(linears)
        self.linears = linears
        self.sums: dict[str, torch.Tensor] = {}  # accumulator name -> (in, in) float32
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # linear name -> accumulator name
        self._seen: dict[tuple, tuple] = {}

    def start_batch(self) -> None:
        self._seen = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        hit = self._seen.get(key)
        if hit is not None and hit[1] is x:
            self.owner.setdefault(name, hit[0])
            return
        self._seen[key] = (name, x)
        self.owner.setdefault(name, name)
        x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if name not in self.sums:
            self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
            self.counts[name] = 0
        self.sums[name].addmm_(x2.T, x2)
        self.counts[name] += x2.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        acc = self.owner[name]
        return self.sums[acc] / max(self.counts[acc], 1)

    def shared_groups(self) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for n in self.linears:
            groups.setdefault(self.owner.get(n, n), []).append(n)
        return list(groups.values())


class SquaredNorms(InputStatistic):
    """sum over tokens of x_j^2 for every input feature j of each module (Wanda's ||X_j||_2 squared)."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__(modules)
        self.sq: dict[str, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        s = x.pow(2).reshape(-1, x.shape[-1]).sum(0)  # (in,)
        self.sq[name] = s if name not in self.sq else self.sq[name] + s


# ---- sequential calibration -----------------------------------------------------------------------
class Stream:
    """The hidden state entering each kept block of the variant being built, on traced calibration ids.

    `input_of(variant, i)` runs the variant's blocks from the latest state still valid (the trace itself
    below the variant's first change) up to block i; after a step replaces blocks from j on, call
    `changed_from(j)`: the states after j are forgotten, the input of j stands. Blocks run in chunks of
    `batch` samples (None: the whole batch at once), the cancel flag is checked before every block.
    `each(...)` walks the blocks a step compresses, one at a time, and reports progress(done / n, words).
    """

    def __init__(self, lm, trace: BlockTrace, batch: int | None = None, cancel=None, progress=None):
        self.lm, self.trace = lm, trace
        self.batch = batch
        self.cancel = cancel
        self.progress = progress
        self.inputs: dict[int, torch.Tensor] = {}  # original index -> (N, T, d); valid up to `valid`
        self.valid = -1

    def say(self, frac: float, msg: str) -> None:
        if self.progress is not None:
            self.progress(frac, msg)

    def check(self) -> None:
        check_cancel(self.cancel)

    def each(self, blocks, variant_of, words):
        """Yield (i, input of block i) for the chosen blocks in order, the input taken from
        `variant_of()` (the variant being built, read again each time: a sequential step has changed
        it meanwhile); before each block, progress(k / n, words(i)) and a cancellation check. The caller
        calls `changed_from(i)` once it has replaced block i, if later blocks must see the change."""
        blocks = sorted(set(int(b) for b in blocks))
        for k, i in enumerate(blocks):
            self.check()
            h = self.input_of(variant_of(), i)
            self.say(k / len(blocks), words(i))
            yield i, h

    def run(self, block: nn.Module, i: int, hidden: torch.Tensor, on_batch=None) -> torch.Tensor:
        """Block `block` standing at original index i, on `hidden`, with the trace's call arguments."""
        self.check()
        return run_chunked(block, hidden, self.trace.calls[i], self.batch, on_batch)

    def collect(self, stat: InputStatistic, block: nn.Module, i: int, hidden: torch.Tensor) -> InputStatistic:
        """Run `block` once over `hidden` with `stat`'s hooks on (always removed). -> `stat`."""
        with stat.watching():
            self.run(block, i, hidden, on_batch=stat.start_batch)
        return stat

    @torch.no_grad()
    def input_of(self, variant: Variant, first: int) -> torch.Tensor:
        lm, kept = self.lm, variant.kept()
        if first not in kept:
            raise AssertionError(f"block {first} is not kept")
        known = [i for i in kept if i <= min(first, self.valid) and i in self.inputs]
        if known:
            start, h = known[-1], self.inputs[known[-1]]
        else:
            start = max((i for i in kept if i <= first and self._traced(variant, i) is not None), default=None)
            if start is None:  # cannot happen: the first kept block reads the embeddings, traced as inputs[0]
                raise AssertionError(f"no traced state before block {first}")
            h = self.trace.inputs[self._traced(variant, start)]
        for i in kept[kept.index(start):]:
            self.inputs[i] = h
            if i == first:
                self.valid = max(self.valid, first)
                return h
            h = self.run(current_block(lm.model, lm.adapter, variant, i), i, h)
        raise AssertionError(f"block {first} is not kept")

    @staticmethod
    def _traced(variant: Variant, i: int) -> int | None:
        """The trace index whose input equals the variant's input of kept block i, or None: j where
        blocks j .. i-1 are all dropped and every block before j is the original's."""
        j = i
        while j > 0 and variant.overrides.get(j - 1) is DROP:
            j -= 1
        fc = variant.first_change()
        return j if fc is None or j <= fc else None

    def changed_from(self, first: int) -> None:
        """Blocks from `first` on changed: forget the states after it (the input of `first` stands)."""
        self.inputs = {i: h for i, h in self.inputs.items() if i <= first}
        self.valid = min(self.valid, first)


# ---- isolated views and prompts -------------------------------------------------------------------
def isolated_view(lm, variant: Variant, attn_implementation: str | None = "eager") -> nn.Module:
    """A runnable model for `variant` whose every module object is a private shallow copy.

    Tensors are shared with the original (no memory cost beyond a few hundred small objects); each copy
    has empty hook tables, so hooks registered on the view never fire on the original; every config a
    module holds is replaced by a copy carrying `attn_implementation` (None keeps the model's own).
    """
    model = view_model(lm.model, lm.adapter, variant)
    configs: dict[int, object] = {}
    return _clone_tree(model, configs, attn_implementation)


def _clone_tree(module: nn.Module, configs: dict, impl: str | None) -> nn.Module:
    clone = rebind_hooked_forward(copy.copy(module), module)  # an offloaded model's hooks: the copy's own
    d = clone.__dict__
    d["_modules"] = OrderedDict((n, None if c is None else _clone_tree(c, configs, impl)) for n, c in module._modules.items())
    d["_parameters"] = dict(module._parameters)
    d["_buffers"] = dict(module._buffers)
    for key, value in list(d.items()):
        if "hooks" in key and isinstance(value, dict):
            d[key] = type(value)()
    # transformers installs its output-recording hooks once per model and marks it; our copy has none.
    d.pop("_output_capturing_hooks_installed", None)
    cfg = d.get("config")
    if impl is not None and cfg is not None and hasattr(cfg, "_attn_implementation"):
        if id(cfg) not in configs:
            new = copy.deepcopy(cfg)
            new._attn_implementation = impl
            configs[id(cfg)] = new
        d["config"] = configs[id(cfg)]
    return clone


def view_blocks(lm, view: nn.Module, variant: Variant) -> list[tuple[int, nn.Module]]:
    """(original index, block module of the view) for each block the variant keeps."""
    blocks = lm.adapter.blocks(view)
    kept = variant.kept()
    assert len(blocks) == len(kept), "a view has one block per kept original block"
    return list(zip(kept, blocks))


def forward_base(lm, view: nn.Module, ids: torch.Tensor, stop_after: nn.Module | None = None) -> None:
    """Run the view's decoder stack (no LM head) on `ids`; optionally stop once `stop_after` has run."""
    run_stack(view, ids, stop_after=stop_after)


def prompt_ids(lm, prompt: str | None, max_tokens: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """(1, T) token ids of a prompt (the default one if empty), cropped to its last `max_tokens`."""
    text = prompt if prompt and prompt.strip() else DEFAULT_PROMPT
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    notes = []
    if ids.shape[1] == 0:
        raise WorkbenchError("the prompt has no tokens")
    if max_tokens is not None and ids.shape[1] > max_tokens:
        notes.append(f"prompt cropped from {ids.shape[1]} to its last {max_tokens} tokens")
        ids = ids[:, -max_tokens:]
    return ids.to(lm.device), notes


def token_labels(tokenizer, ids) -> list[str]:
    """Readable per-token strings (one decode per id; spaces shown as they are)."""
    out = []
    for i in ids:
        try:
            s = tokenizer.decode([int(i)])
        except Exception:  # a tokenizer that cannot decode a lone id: show the id
            s = f"<{int(i)}>"
        out.append(s if s.strip() else repr(s)[1:-1] or "∅")
    return out
