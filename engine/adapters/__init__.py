"""Per-architecture adapters. `adapter_for(model)` picks one or raises UnsupportedArchitecture."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitecture
from .base import Adapter, get_path, is_conv1d, linear_in_out, linear_weight, set_linear_weight

_LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _llama_like(family: str, norms: dict[str, str]) -> Adapter:
    return Adapter(
        family=family,
        blocks_path="model.layers",
        embed_paths=("model.embed_tokens",),
        final_norm_path="model.norm",
        lm_head_path="lm_head",
        linear_paths=dict(_LLAMA_LINEARS),
        norm_paths=norms,
        attn_path="self_attn",
        mlp_path="mlp",
    )


_PRE_POST = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {
    "attn_norm": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}


def _gpt2() -> Adapter:
    return Adapter(
        family="gpt2",
        blocks_path="transformer.h",
        embed_paths=("transformer.wte", "transformer.wpe"),
        final_norm_path="transformer.ln_f",
        lm_head_path="lm_head",
        linear_paths={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        norm_paths={"attn_norm": "ln_1", "mlp_norm": "ln_2"},
        attn_path="attn",
        mlp_path="mlp",
    )


class _OPTAdapter(Adapter):
    def head(self, model, hidden):
        norm = self.final_norm(model)
        if norm is not None:
            hidden = norm(hidden)
        project_out = get_path(model, "model.decoder.project_out")
        if project_out is not None:
            hidden = project_out(hidden)
        return self.lm_head(model)(hidden).float()


def _opt() -> Adapter:
    return _OPTAdapter(
        family="opt",
        blocks_path="model.decoder.layers",
        embed_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm_path="model.decoder.final_layer_norm",
        lm_head_path="lm_head",
        linear_paths={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
        norm_paths={"attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"},
        attn_path="self_attn",
        mlp_path="",
    )


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


# model_type -> adapter factory. Gemma 3 text models come as gemma3_text.
_FACTORIES = {
    "llama": lambda: _llama_like("llama", _PRE_POST),
    "mistral": lambda: _llama_like("mistral", _PRE_POST),
    "qwen2": lambda: _llama_like("qwen2", _PRE_POST),
    "gemma2": lambda: _llama_like("gemma2", _GEMMA_NORMS),
    "gemma3_text": lambda: _llama_like("gemma3", _GEMMA_NORMS),
    "gpt2": _gpt2,
    "opt": _opt,
    "bert": _bert,
}

SUPPORTED = tuple(sorted(_FACTORIES))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, checked against the modules it promises, or a typed error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    factory = _FACTORIES.get(model_type)
    if factory is None:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    adapter = factory()
    # A BERT checkpoint loaded as BertModel has no `bert.` prefix; with a head it does.
    if adapter.family == "bert" and get_path(model, adapter.blocks_path) is None and hasattr(model, "bert"):
        adapter.blocks_path = "bert." + adapter.blocks_path
        adapter.embed_paths = ("bert.embeddings",)
    blocks = get_path(model, adapter.blocks_path)
    if blocks is None or len(blocks) == 0:
        raise UnsupportedArchitecture(f"{model_type}: no blocks found at '{adapter.blocks_path}'")
    missing = [n for n, p in adapter.linear_paths.items() if get_path(blocks[0], p) is None]
    if missing:
        raise UnsupportedArchitecture(f"{model_type}: block 0 lacks the linears {missing}")
    return adapter


__all__ = [
    "Adapter",
    "SUPPORTED",
    "adapter_for",
    "get_path",
    "is_conv1d",
    "linear_in_out",
    "linear_weight",
    "set_linear_weight",
]
