"""Export a variant as one GGUF file (llama.cpp, Ollama, LM Studio), written with the `gguf` package.

What goes in (our code; the conventions learnt from llama.cpp's `convert_hf_to_gguf.py`):
- the architecture's tensor names from the package's `TensorNameMap`, for the blocks the variant keeps
  (renumbered 0..n-1), `block_count` = n, and every per-layer metadata array at the new length (Gemma 3's
  sliding-window pattern: one entry per kept block, in order; llama.cpp and transformers' reader ignore
  it for their fixed 5:1 pattern, so the card names the blocks a pruning moved off that);
- hyperparameters (context, widths, heads, rope base, norm epsilon, head dims, Gemma 2 soft-capping,
  sliding window);
- llama.cpp's conventions where they differ from transformers': the Llama-family (llama, mistral) q/k
  row permutation (rotary halves interleaved; a row permutation, so quantized codes move with their rows),
  Gemma's norm weights stored as 1 + w;
- the tokenizer: vocabulary with token types, merges, special token ids, add-BOS/EOS flags, chat template.
  Byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen) as llama.cpp's "gpt2" model;
  SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma) as its "llama" model, with scores
  that reproduce the merge order, <0xNN> byte tokens typed BYTE and the space-prefix flag; others are
  refused with a reason.

Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1. The block linears take the requested type;
norms and biases stay F32 (llama.cpp wants them so); embeddings and the output head take F16 in a
quantized file (F32/F16/BF16 files keep them in the file's type). A linear quantized in-app with a
GGUF-exact scheme (`quantize` with `gguf`) of the requested type (or with no type requested) is written
from its own codes: the file decodes to the in-app weights bit for bit. Any other quantized linear is
dequantized and re-quantized by the gguf package's quantizer, and the model card says so.

Memory: the writer streams. The header lists every tensor's shape, type and byte count first (computed,
not converted); then each tensor is converted, written and dropped before the next, so the extra memory is
about one tensor (an F32 tensor of an F32 model is written from the model's own buffer), not the file.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import bos_id
from .errors import ExportError
from .export_common import model_card, model_sources, step_card_notes, write_side_files
from .export_files import ties_embeddings
from .loading import LoadedModel
from .ops.gptq import GGUF_GROUP, GGUF_SCHEMES, gguf_offset
from .safe_folder import atomic_folder
from .variant import Variant, view_model

log = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
FLOAT_TYPES = ("F32", "F16", "BF16")
# model_type -> (gguf arch name, Llama-family q/k permutation, Gemma norms 1 + w)
ARCHS = {
    "llama": ("llama", True, False),
    "mistral": ("llama", True, False),  # llama.cpp runs Mistral as the llama architecture
    "qwen2": ("qwen2", False, False),
    "qwen3": ("qwen3", False, False),
    "gemma2": ("gemma2", False, True),
    "gemma3_text": ("gemma3", False, True),
    "gemma3": ("gemma3", False, True),
}
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}


def _qtype(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name)


def float_type_of(dtype: torch.dtype) -> str:
    return {torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype, "F32")


# ---- packing our own codes into GGUF blocks -------------------------------------------------------------
def pack_codes(rec, rows: torch.Tensor | None = None) -> np.ndarray:
    """The GGUF blocks (out, in/32 * block bytes) uint8 of a linear's codes quantized with a GGUF-exact
    scheme. `rows`: a row permutation to apply first (the Llama q/k one). Layouts as ggml's block_q*:
    d (f16) [, m (f16)] [, qh: the 5th bits, little-endian uint32] , qs: low nibbles = weights 0..15,
    high nibbles = weights 16..31 (Q8_0: 32 signed bytes q - 128)."""
    name = rec.gguf
    codes, scale, zero = rec.codes, rec.scale, rec.zero
    if rows is not None:
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
    out, cols = codes.shape
    nb = cols // GGUF_GROUP
    q = codes.to(torch.int32).reshape(out * nb, GGUF_GROUP).numpy().astype(np.uint8)  # (blocks, 32)
    d = scale.reshape(-1).to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)
    parts = [d]
    if name in ("Q4_1", "Q5_1"):
        m = gguf_offset(scale, zero).reshape(-1).to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)
        parts.append(m)
    if name == "Q8_0":
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if name in ("Q5_0", "Q5_1"):
            hi = (q >> 4) & 1
            parts.append(np.packbits(hi, axis=-1, bitorder="little").reshape(-1, 4))
        parts.append((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4))
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape[1] == GGUF_SCHEMES[name][2]
    return blocks.reshape(out, nb * blocks.shape[1])


def qk_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permute (rotary halves -> interleaved pairs) for `n_head` heads."""
    idx = torch.arange(n_rows)
    hd = n_rows // n_head
    return idx.reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(n_rows)


# ---- the plan: what each tensor becomes ----------------------------------------------------------------
def _config_text(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_exportable(lm: LoadedModel, variant: Variant, tensor_type: str | None = None) -> None:
    if tensor_type is not None and tensor_type not in TYPES:
        raise ExportError(f"GGUF tensor type {tensor_type!r} is not one of {', '.join(TYPES)}")
    mt = lm.model.config.model_type
    if mt not in ARCHS:
        raise ExportError(f"the GGUF export supports {', '.join(sorted(set(ARCHS)))} models, not {mt!r}")
    rope = getattr(_config_text(lm.model), "rope_parameters", None) or {}
    kinds = {v.get("rope_type", "default") for v in rope.values() if isinstance(v, dict)} or \
        {rope.get("rope_type", "default")}
    if kinds - {"default"}:
        raise ExportError(f"rope scaling {sorted(kinds - {'default'})} is not written by the GGUF export yet")


def _linear_records(model: nn.Module) -> dict[str, object]:
    """'<module path>.weight' -> QuantRecord of every quantized linear of the (view) model."""
    return {f"{n}.weight": m.workbench_quant for n, m in model.named_modules()
            if getattr(m, "workbench_quant", None) is not None}


def default_tensor_type(lm: LoadedModel, variant: Variant) -> str:
    """The file's block type when none is asked: the quantized blocks' own GGUF scheme (the most common
    one), else the weights' float type."""
    model = view_model(lm.model, lm.adapter, variant)
    recs = [r for r in _linear_records(model).values() if getattr(r, "gguf", None)]
    if recs:
        names = [r.gguf for r in recs]
        return max(set(names), key=names.count)
    from .export_files import weights_dtype

    return float_type_of(weights_dtype(model))


def _plan(model, name: str, t: torch.Tensor, tensor_type: str, recs: dict, explicit: bool, float_type: str):
    """-> (type name, how: 'codes' | 'float' | 'requantize') for one state-dict tensor. With no type asked,
    linears quantized with a GGUF scheme keep their codes and every other linear stays in the weights'
    float type (so the file holds the in-app weights exactly)."""
    rec = recs.get(name)
    is_block_linear = t.dim() == 2 and ".layers." in name
    if t.dim() < 2:
        return "F32", "float"
    if not is_block_linear:  # embeddings, output head
        return ("F16" if tensor_type not in FLOAT_TYPES else tensor_type), "float"
    if rec is not None and getattr(rec, "gguf", None) and (not explicit or rec.gguf == tensor_type):
        return rec.gguf, "codes"
    if not explicit:
        return float_type, "float"
    if tensor_type in FLOAT_TYPES:
        return tensor_type, "float"
    if t.shape[-1] % GGUF_GROUP:
        return "F16", "float"  # a row width GGUF blocks cannot tile
    return tensor_type, "requantize"


def tensor_bytes(shape, type_name: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[_qtype(type_name)]
    n = int(np.prod(shape))
    return n // block * size


# ---- metadata -------------------------------------------------------------------------------------------
def _rope_bases(cfg) -> tuple[float, float | None]:
    rp = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in rp:  # Gemma 3: one rope per attention kind
        full = rp["full_attention"].get("rope_theta", 1e6)
        local = rp.get("sliding_attention", {}).get("rope_theta")
        return float(full), (float(local) if local else None)
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return float(theta), None


def _write_hparams(w, model, arch: str, n_blocks: int, file_type: str) -> None:
    cfg = _config_text(model)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(n_blocks))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    base, local = _rope_bases(cfg)
    w.add_rope_freq_base(base)
    if local is not None:
        w.add_rope_freq_base_swa(local)
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    if arch == "llama":
        w.add_rope_dimension_count(int(head_dim))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_file_type(_FILE_TYPE[file_type])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping or 0.0))
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping or 0.0))
    if arch in ("gemma2", "gemma3") and getattr(cfg, "sliding_window", None):
        w.add_sliding_window(int(cfg.sliding_window))
    if arch == "gemma3":
        kinds = list(getattr(cfg, "layer_types", None) or [])
        if len(kinds) != n_blocks:
            raise ExportError(f"internal: {len(kinds)} layer types for {n_blocks} blocks")
        w.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])  # one per kept block


def gemma3_pattern_notes(kinds: list[str]) -> list[str]:
    """llama.cpp runs Gemma 3 with a fixed pattern (blocks 5, 11, 17, ... global, the others sliding with
    rope base 10000) and does not read the per-layer pattern we write; transformers' GGUF reader rebuilds
    the same default. A pruned variant whose kept blocks break that pattern runs differently there: say
    which blocks, in the file's numbering."""
    wrong = [j for j, k in enumerate(kinds) if (k == "sliding_attention") != (j % 6 < 5)]
    if not wrong:
        return []
    return [f"Gemma 3 after pruning: the file's blocks {wrong} do not follow llama.cpp's fixed pattern (every 6th "
            "block global, the others sliding with rope base 10000). llama.cpp (and transformers' GGUF reader) "
            "ignore the per-layer pattern written here and run those blocks with the other attention kind and "
            "rope base, so their outputs differ from the app's; pruning that keeps the pattern (e.g. from the "
            "end, or whole runs of 6) avoids it"]


def _pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (its regex), from the tokenizer.json structure."""
    pre = tok_json.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    text = json.dumps(pre)
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # llama.cpp's name (it refuses "gpt2")
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "\\\\p{N}" in text and "Split" in kinds:
        return "qwen2"
    return "default"


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _tokenizer_kind(tj: dict) -> str:
    """'gpt2' (byte-level BPE: SmolLM, Llama 3, Qwen) or 'llama' (SentencePiece-style BPE with byte fallback:
    Llama 2, Mistral, Gemma); anything else is refused with what it is."""
    model = tj.get("model", {})
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(tj.get("pre_tokenizer")):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ExportError("the GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen) and "
                      "SentencePiece-style BPE tokenizers with byte fallback (Llama 2, Mistral, Gemma); this one "
                      f"is {model.get('type')} (byte_fallback {bool(model.get('byte_fallback'))}) with another "
                      "pre-tokenizer")


def _adds_space_prefix(tj: dict) -> bool:
    """Whether the tokenizer puts a \u2581 before the text (Llama 2 / Mistral do, Gemma does not): a Prepend
    normalizer, or a Metaspace pre-tokenizer that prepends."""
    def walk(node, key):
        if not isinstance(node, dict):
            return []
        kids = node.get(key) or []
        return [node] + [n for k in kids for n in walk(k, key)]

    for n in walk(tj.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for n in walk(tj.get("pre_tokenizer"), "pretokenizers"):
        if n.get("type") == "Metaspace":
            scheme = n.get("prepend_scheme", "always" if n.get("add_prefix_space", True) else "never")
            return scheme in ("first", "always")
    return False


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def spm_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose joined piece has the
    highest score; a BPE's merges apply in rank order. So score = -(rank of the first merge that makes the
    piece) reproduces the merge order (for a BPE converted from SentencePiece, whose merges are every split
    of each piece, sorted by the piece's score). Pieces no merge makes (single characters, bytes, specials)
    score below every merge."""
    first: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(a + b, rank)
    floor = -float(len(merges) + 1)
    return [-float(first[t]) if t in first else floor for t in tokens]


def _vocab_lists(tokenizer, tj: dict, n_vocab: int, kind: str):
    """(tokens, types) for ids 0..n_vocab-1: ids the tokenizer lacks become UNUSED [PADn] padding."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    unk = getattr(tokenizer, "unk_token_id", None) if kind == "llama" else None
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        if i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(t):
            types.append(gguf.TokenType.BYTE)  # byte fallback: llama.cpp looks these up by their text
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS, as it does (its post-processor), not as an attribute says: a
    Gemma tokenizer read from a cached folder adds BOS with `add_bos_token` False."""
    eos = getattr(tokenizer, "eos_token_id", None)
    try:
        plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
        special = tokenizer("Hello")["input_ids"]
    except Exception:  # a tokenizer that cannot say: take it as adding nothing
        return False, False
    adds_eos = eos is not None and bool(special) and special[-1] == eos and (not plain or plain[-1] != eos)
    return bos_id(tokenizer) is not None, adds_eos


def _write_tokenizer(w, tokenizer, n_vocab: int) -> list[str]:
    """Vocabulary, types, merges (and scores for a SentencePiece-style one), special ids, add-BOS/EOS and
    space-prefix flags, chat template. -> notes for the card."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the GGUF export needs a fast (tokenizers) tokenizer: a byte-level BPE or a "
                          "SentencePiece-style BPE with byte fallback")
    tj = json.loads(backend.to_str())
    kind = _tokenizer_kind(tj)
    tokens, types = _vocab_lists(tokenizer, tj, n_vocab, kind)
    merges = _merge_pairs(tj["model"])
    notes = []
    w.add_tokenizer_model(kind)
    if kind == "gpt2":
        pre = _pre_tokenizer_name(tj)
        w.add_tokenizer_pre(pre)
        if pre == "default":
            notes.append("the tokenizer's pre-tokenizer is not one llama.cpp names; written as 'default' "
                         "(llama.cpp then splits text with its default regex)")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "llama":
        w.add_token_scores(spm_scores(tokens, merges))
        w.add_add_space_prefix(_adds_space_prefix(tj))
    # llama.cpp's SentencePiece tokenizer reads only the scores; the merges let transformers rebuild the
    # exact BPE (a merge is written "a b", so a piece holding a space would be ambiguous: then none are)
    if kind == "gpt2" or not any(" " in a or " " in b for a, b in merges):
        w.add_token_merges([f"{a} {b}" for a, b in merges])
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and 0 <= v < n_vocab:
            add(v)
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        w.add_chat_template(tmpl)
    return notes


# ---- writing --------------------------------------------------------------------------------------------
def gguf_plan(lm: LoadedModel, variant: Variant, tensor_type: str | None = None):
    """[(gguf name, hf name, tensor, type, how, row permutation)] of every tensor the file holds."""
    import gguf

    check_exportable(lm, variant, tensor_type)
    explicit = tensor_type is not None
    tensor_type = tensor_type or default_tensor_type(lm, variant)
    model = view_model(lm.model, lm.adapter, variant)
    arch, permute, _ = ARCHS[model.config.model_type]
    n_blocks = len(variant.kept())
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_blocks)
    cfg = _config_text(model)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    recs = _linear_records(model)
    from .export_files import weights_dtype

    float_type = float_type_of(weights_dtype(model))
    tied = ties_embeddings(model)
    seen = set()
    plan = []
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and tied:
            continue  # lm_head tied to the embedding: llama.cpp reuses token_embd
        seen.add(key)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"no GGUF tensor name for {name!r} in the {arch} architecture")
        typ, how = _plan(model, name, t, tensor_type, recs, explicit, float_type)
        rows = None
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            rows = qk_permutation(t.shape[0], n_head if "q_proj" in name else n_kv)
        plan.append((new, name, t, typ, how, rows))
    return plan, tensor_type, arch, model


def estimate_gguf_bytes(lm: LoadedModel, variant: Variant, tensor_type: str | None = None) -> int:
    """Bytes of the tensor data the GGUF file will hold (the header and vocabulary come on top)."""
    plan, *_ = gguf_plan(lm, variant, tensor_type)
    return sum(tensor_bytes(t.shape, typ) for _, _, t, typ, _, _ in plan)


def _tensor_info(shape, typ: str) -> tuple:
    """(shape, numpy dtype, bytes, raw GGML type) of a tensor as `_tensor_data` will give it: F32 / F16 as
    float arrays of the tensor's shape, every other type as uint8 blocks (rows, bytes per row), which the
    writer turns back into the logical shape."""
    shape = tuple(int(d) for d in shape)
    if typ in ("F32", "F16"):
        return shape, np.dtype(np.float32 if typ == "F32" else np.float16), tensor_bytes(shape, typ), None
    row = tensor_bytes(shape[-1:], typ)
    return (*shape[:-1], row), np.dtype(np.uint8), tensor_bytes(shape, typ), _qtype(typ)


def _tensor_data(name, t, typ, how, rows, recs, norm_plus_one) -> np.ndarray:
    import gguf

    t = t.detach().cpu()
    if how == "codes":
        return pack_codes(recs[name], rows)
    x = t.float() if (typ != "F32" or t.dtype != torch.float32) else t
    if rows is not None:
        x = x[rows]
    if norm_plus_one and name.endswith("norm.weight"):
        x = x + 1.0  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
    if typ == "F32":
        return x.contiguous().numpy()
    if typ == "F16":
        return x.to(torch.float16).contiguous().numpy()
    return gguf.quants.quantize(x.contiguous().numpy(), _qtype(typ))  # BF16 and the block types: uint8


def write_gguf(lm: LoadedModel, variant: Variant, path: Path, tensor_type: str | None = None) -> dict:
    """Write the variant's GGUF file at `path`. -> {"tensor_type", "types": {type: count},
    "requantized": [hf names], "from_codes": [hf names], "notes": [...]}."""
    import gguf

    plan, tensor_type, arch, model = gguf_plan(lm, variant, tensor_type)
    _, _, norm_plus_one = ARCHS[model.config.model_type]
    recs = _linear_records(model)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"{lm.name} ({variant.name})")
    _write_hparams(w, model, arch, len(variant.kept()), tensor_type)
    n_vocab = int(_config_text(model).vocab_size)
    notes = _write_tokenizer(w, lm.tokenizer, n_vocab)
    if arch == "gemma3":
        notes += gemma3_pattern_notes(list(getattr(_config_text(model), "layer_types", None) or []))
    types: dict[str, int] = {}
    requantized, from_codes = [], []
    # Pass 1: every tensor's name, shape, type and byte count go into the header, with no data converted.
    for new, name, t, typ, how, rows in plan:
        w.add_tensor_info(new, *_tensor_info(t.shape, typ))
        types[typ] = types.get(typ, 0) + 1
        if how == "requantize" and name in recs:
            requantized.append(name)
        if how == "codes":
            from_codes.append(name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # Pass 2: each tensor is converted (packed, quantized, permuted) and written, then dropped, so the extra
    # memory is about one tensor, not the model (the gguf writer's add_tensor would hold them all).
    for new, name, t, typ, how, rows in plan:
        data = _tensor_data(name, t, typ, how, rows, recs, norm_plus_one)
        w.write_tensor_data(data)
        del data
    w.close()
    if requantized:
        notes.append(f"{len(requantized)} quantized linears had a scheme other than GGUF {tensor_type}: they were "
                     "dequantized and re-quantized by the gguf package's quantizer, so the file's weights differ "
                     "from the in-app variant's (quantize with the GGUF scheme of the same name to export exact codes)")
    if from_codes:
        notes.append(f"{len(from_codes)} linears are written from the variant's own GGUF-exact codes: the file "
                     "decodes to the in-app weights bit for bit")
    return {"tensor_type": tensor_type, "types": types, "requantized": requantized, "from_codes": from_codes,
            "notes": notes}


def export_gguf(
    lm: LoadedModel,
    variant: Variant,
    out_dir: str | Path,
    recipe: dict,
    tensor_type: str | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
    notes: list[str] | None = None,
    progress=None,
    extra_files: dict | None = None,
) -> Path:
    """Write `out_dir/model.gguf` with the recipe, card and metrics beside it, atomically."""
    check_exportable(lm, variant, tensor_type)
    with atomic_folder(out_dir, overwrite, progress, protect=model_sources(lm)) as tmp:
        if progress:
            progress(0.1, "writing the GGUF file")
        t0 = time.perf_counter()
        try:
            info = write_gguf(lm, variant, tmp / GGUF_NAME, tensor_type)
        except OSError as e:
            raise ExportError(f"could not write the GGUF file: {e}") from e
        doc = dict(metrics or {})
        doc.update({"gguf_tensor_type": info["tensor_type"], "gguf_types": info["types"],
                    "gguf_write_seconds": time.perf_counter() - t0})
        weights = {GGUF_NAME: (tmp / GGUF_NAME).stat().st_size}
        card_notes = [f"GGUF block type {info['tensor_type']} (tensors per type: {info['types']}); norms in F32.",
                      *info["notes"], *(notes or []), *step_card_notes(variant)]
        card = model_card(lm, variant, recipe, doc, card_notes, "gguf", weights)
        write_side_files(tmp, recipe, card, doc, "gguf", extra_files)
    return Path(out_dir).expanduser().resolve()
