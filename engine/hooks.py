"""Hooks that are always removed, and the block trace every fast analysis starts from.

`trace_blocks` runs the model once and records, for every block, the hidden state entering it and
the other arguments the model passed it (attention mask, rotary embeddings, positions). With those, any
block can be re-run on its own and a variant can be evaluated from its first changed block onward
without re-running the blocks before it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter


@contextlib.contextmanager
def hooks(*handles_or_fns):
    """Own a set of hook handles and remove them in `finally`, whatever happens inside."""
    handles = list(handles_or_fns)
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


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
    pass


def _hidden_of(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def trace_blocks(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, attention_mask=None) -> BlockTrace:
    """One forward pass recording each block's input and call arguments (no KV cache, no LM head)."""
    blocks = adapter.blocks(model)
    n = len(blocks)
    inputs: list = [None] * n
    calls: list = [None] * n
    last: dict = {}

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

    def post_last(module, args, out):
        last["out"] = _hidden_of(out)
        raise _Stop  # the LM head is not needed: stop the forward here

    handles = [blk.register_forward_pre_hook(make_pre(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    handles.append(blocks[n - 1].register_forward_hook(post_last))
    with hooks(*handles):
        try:
            base = _base_model(model, adapter)
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
    return BlockTrace(input_ids=input_ids, inputs=inputs, calls=calls, output=last["out"])


def _is_cache(obj) -> bool:
    return type(obj).__name__.endswith("Cache")


def _base_model(model: nn.Module, adapter: Adapter) -> nn.Module:
    """The decoder stack without LM head where the model has one (saves the head's matmul)."""
    return getattr(model, "base_model", model)


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
