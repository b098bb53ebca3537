"""Adapters. `adapter_for(model)` reads a decoder's layout (structural.py) or raises UnsupportedArchitecture."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitecture
from .base import Adapter, get_path, is_conv1d, linear_in_out, linear_weight, set_linear_weight
from .structural import DecoderAdapter, structural_adapter


def _bert() -> Adapter:
    return Adapter(
        family="bert",
        blocks_path="encoder.layer",
        embed_paths=("embeddings",),
        final_norm_path=None,
        lm_head_path=None,
        linear_paths={
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "up": "intermediate.dense",
            "down": "output.dense",
        },
        norm_paths={"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"},
        attn_path="attention",
        mlp_path="",
        causal=False,
    )


# Families tested end to end with a tiny random model (tests/test_families.py); others are tried by structure.
TESTED = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3", "olmo2", "granite",
    "gpt2", "opt", "gpt-neox", "falcon", "mixtral", "qwen3_moe", "bert",
)
SUPPORTED = TESTED


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`: read from its structure (BERT by its own table), or a typed error that
    names what could not be found."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "bert":
        adapter = _bert()
        # A BERT checkpoint loaded as BertModel has no `bert.` prefix; with a head it does.
        if get_path(model, adapter.blocks_path) is None and hasattr(model, "bert"):
            adapter.blocks_path = "bert." + adapter.blocks_path
            adapter.embed_paths = ("bert.embeddings",)
        blocks = get_path(model, adapter.blocks_path)
        if blocks is None or len(blocks) == 0:
            raise UnsupportedArchitecture(f"{model_type}: no blocks found at '{adapter.blocks_path}'")
        missing = [n for n, p in adapter.linear_paths.items() if get_path(blocks[0], p) is None]
        if missing:
            raise UnsupportedArchitecture(f"{model_type}: block 0 lacks the linears {missing}")
        return adapter
    return structural_adapter(model)


__all__ = [
    "Adapter",
    "DecoderAdapter",
    "TESTED",
    "SUPPORTED",
    "adapter_for",
    "get_path",
    "is_conv1d",
    "linear_in_out",
    "linear_weight",
    "set_linear_weight",
]
