"""Tiny random models built from configs (no download), one per adapter family."""

from __future__ import annotations

import torch

VOCAB = 256


def tiny_config(family: str, layers: int = 4):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, sliding_window=64)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=64)
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
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(8.0)
    return model.eval()


CAUSAL_FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "opt"]


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
