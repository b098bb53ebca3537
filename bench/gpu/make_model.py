"""Random-weight model with SmolLM2-135M's shape and its real tokenizer (the GGUF is too big to carry)."""
import shutil, sys, torch, transformers as tf
out = sys.argv[1]
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                     max_position_embeddings=8192, rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
m = tf.AutoModelForCausalLM.from_config(cfg)
m.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f".gpu/smol_tok/{f}", out)
print("model at", out)
