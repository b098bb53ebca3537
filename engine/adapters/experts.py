"""Mixture-of-experts blocks (Mixtral, Qwen3-MoE): each expert's slice of the 3-D expert tensors.

transformers 5 holds a block's experts as two parameters, `gate_up_proj` (E, 2I, H) and `down_proj`
(E, H, I), and calls them as `experts(hidden (N, H), top_k_index (N, k), top_k_weights (N, k))`. An
expert only sees the tokens the router sends it, so its GPTQ Hessian is built from those tokens alone
(gate_up from the routed hidden states, down from act(gate) * up of the same tokens through the
already quantized gate_up). An expert that too few calibration tokens reach gets RTN, and the report
says so. The router is never changed.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_ROUTED_TOKENS = 16  # fewer routed calibration tokens than this: RTN (a Hessian of rank < 16 is noise)


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens (rows of the flattened batch) the router sent to `expert`."""
    return (top_k_index == expert).any(dim=-1).nonzero().flatten()


class RoutedInputs:
    """A forward pre-hook on an experts module keeping, per expert, the hidden states routed to it."""

    def __init__(self, experts: nn.Module):
        self.experts = experts
        self.inputs: dict[int, list[torch.Tensor]] = {}

    def _pre(self, module, args):
        hidden, top_k_index = args[0], args[1]
        for e in range(module.gate_up_proj.shape[0]):
            idx = routed_tokens(top_k_index, e)
            if idx.numel():
                self.inputs.setdefault(e, []).append(hidden[idx].detach().float())

    def handle(self):
        return self.experts.register_forward_pre_hook(self._pre)

    def of(self, e: int) -> torch.Tensor:
        parts = self.inputs.get(e)
        return torch.cat(parts) if parts else torch.zeros(0, self.experts.gate_up_proj.shape[-1])


def expert_intermediate(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of expert e on its routed inputs x (n, H) -> (n, I), as the experts forward does."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def quantize_experts(experts: nn.Module, routed: RoutedInputs, solve, method: str) -> dict:
    """Quantize every expert's gate_up and down slices in place on `experts` (a copy's module).

    `solve(weight (out, in), hessian or None, method) -> (new weight, report entry)` is the dense
    driver's solver; with too few routed tokens the method falls back to RTN. -> per-expert report."""
    out = {}
    for e in range(experts.gate_up_proj.shape[0]):
        x = routed.of(e)
        n = int(x.shape[0])
        use = method if n >= MIN_ROUTED_TOKENS else "rtn"
        entry = {"routed_tokens": n, "method": use}
        if use != method:
            entry["note"] = f"expert {e}: {n} routed calibration tokens (< {MIN_ROUTED_TOKENS}): RTN instead of {method}"
        h_gu = x.T @ x / max(n, 1) if n else None
        w, entry["gate_up"] = solve(experts.gate_up_proj[e].detach(), h_gu, use)
        experts.gate_up_proj.data[e] = w.to(experts.gate_up_proj.dtype)
        z = expert_intermediate(experts, e, x) if n else None  # through the quantized gate_up
        h_d = z.T @ z / n if n else None
        w, entry["down"] = solve(experts.down_proj[e].detach(), h_d, use)
        experts.down_proj.data[e] = w.to(experts.down_proj.dtype)
        out[str(e)] = entry
    return out


def expert_slices(experts: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    """(tensor name, expert, (out, in) slice view) for every expert weight: what sparsify prunes."""
    return [(name, e, getattr(experts, name)[e]) for name in ("gate_up_proj", "down_proj")
            for e in range(getattr(experts, name).shape[0])]
