"""The linear that receives a pruned block's weights (FuseGPT, arXiv 2411.14507, "FuseLinear").

Pure torch: tensors in, tensors out. One neighbour's linear becomes

    W_eff = W + C ⊙ W_add (+ B A)          b_eff = b + c_b ⊙ b_add

with W, b (the neighbour's own) and W_add, b_add (the same-named linear of the pruned block) frozen,
and the coefficient C learnable in one of three shapes:

- "lowrank": C = P Q with P (out, r) = 0 and Q (r, in) random, so step 0 is exactly plain removal;
- "vector":  C = c (out, 1) = 0, one scale per output row;
- "full":    C (out, in) = 0.

An optional LoRA term B A (B = 0) adapts W itself. `merged()` folds everything into plain (out, in)
weight and bias tensors: the fused model has no extra parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

COEF_MODES = ("lowrank", "vector", "full")


class FuseLinear(nn.Module):
    """A drop-in for a linear-like module computing y = x W_eff^T + b_eff.

    `weight`/`weight_add` are (out, in) whatever the orientation of the module they came from (GPT-2's
    Conv1D stores (in, out); the caller passes `adapters.linear_weight(...)`).
    Parameters named `coef_*` are the fusion coefficients (trained at the higher rate); `lora_*` are the
    optional LoRA factors (trained at the lower rate, as in the official code).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_add: torch.Tensor,
        bias_add: torch.Tensor | None,
        mode: str = "lowrank",
        rank: int = 8,
        lora_rank: int = 0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if mode not in COEF_MODES:
            raise ValueError(f"unknown coefficient mode {mode!r} (known: {COEF_MODES})")
        if weight.shape != weight_add.shape:
            raise ValueError(f"injected weight {tuple(weight_add.shape)} does not match {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        dev = weight.device
        # Frozen tensors are buffers of our own (fp32 for exact merges), never the model's tensors.
        self.register_buffer("weight_base", weight.detach().float().clone())
        self.register_buffer("weight_add", weight_add.detach().float().clone())
        has_bias = bias is not None
        self.register_buffer("bias_base", bias.detach().float().clone() if has_bias else None)
        self.register_buffer(
            "bias_add", bias_add.detach().float().clone() if has_bias and bias_add is not None else None
        )
        self.mode = mode
        if mode == "lowrank":
            r = max(1, min(int(rank), out_f, in_f))
            self.coef_p = nn.Parameter(torch.zeros(out_f, r, device=dev))  # (out, r) = 0: starts at removal
            q = torch.empty(r, in_f)
            _kaiming_(q, generator)
            self.coef_q = nn.Parameter(q.to(dev))  # (r, in)
        elif mode == "vector":
            self.coef_v = nn.Parameter(torch.zeros(out_f, 1, device=dev))  # (out, 1)
        else:
            self.coef_full = nn.Parameter(torch.zeros(out_f, in_f, device=dev))  # (out, in)
        self.coef_bias = nn.Parameter(torch.zeros(out_f, device=dev)) if self.bias_add is not None else None
        if lora_rank > 0:
            r = max(1, min(int(lora_rank), out_f, in_f))
            a = torch.empty(r, in_f)
            _kaiming_(a, generator)
            self.lora_a = nn.Parameter(a.to(dev))  # (r, in)
            self.lora_b = nn.Parameter(torch.zeros(out_f, r, device=dev))  # (out, r) = 0
        else:
            self.lora_a = self.lora_b = None

    # ---- the effective tensors ----------------------------------------------------------------------
    def coefficient(self) -> torch.Tensor:
        """C, broadcastable to (out, in)."""
        if self.mode == "lowrank":
            return self.coef_p @ self.coef_q  # (out, in)
        if self.mode == "vector":
            return self.coef_v  # (out, 1)
        return self.coef_full

    def effective_weight(self) -> torch.Tensor:
        w = self.weight_base + self.coefficient() * self.weight_add  # (out, in)
        if self.lora_a is not None:
            w = w + self.lora_b @ self.lora_a
        return w

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias_base is None:
            return None
        if self.coef_bias is None:
            return self.bias_base
        return self.bias_base + self.coef_bias * self.bias_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        b = self.effective_bias()
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, w, b)  # autocast picks the compute dtype
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_eff (out, in), b_eff or None) as plain fp32 tensors, detached."""
        b = self.effective_bias()
        return self.effective_weight().detach().clone(), None if b is None else b.detach().clone()

    def coef_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith("coef_")]

    def other_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("coef_")]

    def extra_repr(self) -> str:
        out_f, in_f = self.weight_base.shape
        lora = 0 if self.lora_a is None else self.lora_a.shape[0]
        return f"in={in_f}, out={out_f}, mode={self.mode}, bias={self.bias_base is not None}, lora={lora}"


def _kaiming_(t: torch.Tensor, generator: torch.Generator | None) -> None:
    """Kaiming-uniform (a = sqrt(5), as nn.Linear) drawn from `generator` for reproducible replays."""
    fan_in = t.shape[1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=generator)
