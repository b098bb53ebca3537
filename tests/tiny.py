"""Tiny random models built from configs (no download), one per decoder family the workbench supports."""

from __future__ import annotations

import torch

VOCAB = 256


def tiny_config(family: str, layers: int = 4):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8, **ids)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, sliding_window=64)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=64)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**common, **ids)
    if family == "smollm3":
        return tf.SmolLM3Config(**common, **ids)
    if family == "olmo2":
        return tf.Olmo2Config(**common, **ids)
    if family == "granite":  # logits divided by logits_scaling, scaled residuals and embeddings
        return tf.GraniteConfig(**common, **ids, logits_scaling=4.0, residual_multiplier=0.5,
                                embedding_multiplier=2.0, attention_multiplier=0.3)
    if family == "gpt-neox":  # query_key_value interleaved per head
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=256, **ids)
    if family.startswith("falcon"):  # three fused layouts
        layout = {"falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
                  "falcon-mq": dict(new_decoder_architecture=False, multi_query=True),
                  "falcon-mha": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False)}[family]
        return tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                               ffn_hidden_size=64, max_position_embeddings=256, alibi=False, **layout, **ids)
    if family == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, decoder_sparse_step=1, **ids)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256)
    if family == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32)
    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=256)
    raise ValueError(family)


def tiny_model(family: str, layers: int = 4, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, layers)
    cls = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(cfg)
    # Random init is near-identity in residual nets; scale up so blocks matter and tests can fail.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(8.0)
    return model.eval()


CAUSAL_FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "opt"]
# Every dense decoder family tested end to end in tests/test_families.py
DENSE_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "smollm3", "olmo2", "granite",
                  "gpt2", "opt", "gpt-neox", "falcon", "falcon-mq", "falcon-mha"]
MOE_FAMILIES = ["mixtral", "qwen3_moe"]


def tiny_bpe_tokenizer(merges: tuple = ()):
    """A real byte-level BPE tokenizer (GPT-2 style): the 256 byte symbols (VOCAB tokens) plus one token per
    merge ("h e" adds "he"), the symbol of byte 0 standing as the special end-of-text token; with a chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_sym = {}
    # GPT-2's bytes_to_unicode order: printable bytes map to themselves, the rest to 256 + n
    n = 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            byte_sym[b] = chr(b)
        else:
            byte_sym[b] = chr(256 + n)
            n += 1
    assert set(byte_sym.values()) == set(alphabet)
    vocab = {byte_sym[b]: b for b in range(256)}
    pairs = [tuple(m.split(" ")) for m in merges]
    for a, b in pairs:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": byte_sym[0]})
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    return fast


SPM_TEXTS = ("Hello world", "hello  world\nHello, wörld! 123 4567", " leading space and\ttab", "naïve café 日本",
             "world hello\n\nhello")


def tiny_spm_tokenizer(style: str = "llama"):
    """A SentencePiece-style BPE tokenizer with byte fallback, built with the tokenizers library the way a
    SentencePiece model converts: pieces spelled with \u2581 for a space, 256 <0xNN> byte tokens for what no
    piece covers, and as merges every split of each piece into two vocabulary pieces, in the pieces'
    priority order. style "llama" (Llama 2 / Mistral: <unk> <s> </s>, a \u2581 prepended to the text) or
    "gemma" (<pad> <eos> <bos> <unk>, no prefix, spaces replaced)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] if style == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    chars = list("\u2581abcdefghijklmnopqrstuvwxyzHW0123456789,.!é")
    pieces = ["he", "ll", "\u2581h", "llo", "hello", "\u2581hello", "or", "wor", "ld", "world", "\u2581w",
              "\u2581world", "12", "123", "\u2581\u2581", "an", "\u2581a", "\u2581c", "af", "caf"]
    vocab = {t: i for i, t in enumerate(specials + bytes_ + chars + pieces)}
    merges = [(p[:k], p[k:]) for p in pieces for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    unk = "<unk>"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    bos, eos = ("<s>", "</s>") if style == "llama" else ("<bos>", "<eos>")
    tail = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(tail + [decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence(tail)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    kw = {"pad_token": "<pad>"} if style == "gemma" else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   add_bos_token=True, **kw)
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    return fast
