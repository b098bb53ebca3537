"""Self-checks for a GPU machine, with their own tiny models and tokenizers (nothing downloaded):
run by `bench/gpu_check.py` and by the tests marked `gpu`. They were inside the library modules.
"""

from __future__ import annotations

import time

import torch

from workbench.engine.data import Calibration, calibration_ids
from workbench.engine.loading import wrap_model
from workbench.engine.masks import global_masks, group_ranks, layer_mask, nm_mask, row_mask
from workbench.engine.ops.fuse import FuseBlocks
from workbench.engine.recipe import OpContext
from workbench.engine.variant import original_variant, view_model


def gpu_self_check(device: str = "cuda") -> dict:
    """For the lead on a GPU machine: fuse one block of a tiny random Llama in fp32 and in bf16 autocast
    on `device`; both must lower the group loss by at least 10 % and give finite logits after the merge,
    with the merged weights on the device. -> {"ok", "fp32": (start, end), "bf16": (start, end), ...}."""
    import transformers as tf


    class _Bytes:  # the calibration text as bytes: no tokenizer download
        def __call__(self, text, add_special_tokens=True, return_tensors=None):
            ids = list(text.encode("utf-8"))
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(8.0)
    lm = wrap_model(model, _Bytes(), device=torch.device(device))
    ctx = OpContext(lm=lm, calibration=Calibration(samples=8, seq_len=64))
    out: dict = {"device": str(lm.device)}
    ok = True
    for dtype in ("fp32", "bf16"):
        step = FuseBlocks(blocks=[2], group=4, steps=30, samples=8, seq_len=64, batch=4, lr=3e-2, loss="mse",
                          patience=0, dtype=dtype)
        v, rep, _ = step.apply(ctx, original_variant(6))
        r = rep["per_block"][0]
        out[dtype] = (r["loss_start"], r["loss_end"])
        ok &= r["loss_end"] < 0.9 * r["loss_start"]
        ids = calibration_ids(lm.tokenizer, ctx.calibration).to(lm.device)
        with torch.no_grad():
            logits = view_model(lm.model, lm.adapter, v)(input_ids=ids, use_cache=False).logits
        ok &= bool(torch.isfinite(logits).all())
        on = next(v.overrides[1].parameters()).device
        out[f"{dtype}_weights_on"] = str(on)
        ok &= on.type == lm.device.type
    out["ok"] = bool(ok)
    out["seconds"] = time.perf_counter() - t0
    return out


def sparsity_self_check(device: str = "cuda") -> dict:
    """Masks and orderings computed on `device` equal the CPU ones (a quick check for a GPU run)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 9, (64, 96), generator=g).float()  # many ties
    d = s.to(device)
    checks = {
        "layer_mask": torch.equal(layer_mask(s, 0.37), layer_mask(d, 0.37).cpu()),
        "row_mask": torch.equal(row_mask(s, 0.61), row_mask(d, 0.61).cpu()),
        "nm_2_4": torch.equal(nm_mask(s, 2, 4), nm_mask(d, 2, 4).cpu()),
        "nm_4_8": torch.equal(nm_mask(s, 4, 8), nm_mask(d, 4, 8).cpu()),
        "ranks": torch.equal(group_ranks(s)[0], group_ranks(d)[0].cpu()),
        "global": all(torch.equal(a, b.cpu()) for a, b in zip(global_masks([s, s[:7] * 2], 0.5),
                                                              global_masks([d, d[:7] * 2], 0.5))),
    }
    return {"device": str(device), "ok": all(checks.values()), **checks}
