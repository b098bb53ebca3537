"""Memory plan: before loading, decide where the weights live and where each block computes.

From the checkpoint's size in the load dtype and the free memory of every local device (or what
`--max-memory` allows), one of:
- whole: the model on one device (a GPU when one holds it, else the CPU);
- split: the blocks over several local GPUs in contiguous ranges (embeddings with the first, head
  with the last);
- offload: the weights that do not fit where they compute stay in CPU RAM or, past the RAM budget,
  memory-mapped from the safetensors files ("disk"); accelerate's hooks move each block to the compute
  device for its turn (sequential onloading), and the engine's block walks keep block inputs on the
  compute device between blocks.
A model is refused only when even the offload plan cannot fit: the parts that stay resident
(embeddings, head, norms) plus one block at a time plus the jobs' working set.

The plan is a transformers/accelerate device map (`from_pretrained(device_map=..., offload_folder=...)`),
as llm-compressor's sequential onloading and FuseGPT's own code load big models.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelLoadError

GiB = 2**30
# fp32 logits of at most this many bytes exist at once: memory stays bounded whatever the vocabulary
# (a 262k-vocabulary model's (4, 256, V) logits alone are 1 GiB, and log-softmax makes more of them).
LOGIT_CHUNK_BYTES = 32 * 2**20  # a chunk's logits, log-softmax and the reference's p: ~3x this at once;
# 64 MiB gave a bf16 0.4B Llama's quick compare 65 MiB more peak, 16 MiB cost the default model's head+KL ~15 %
# Tokens per stacked block call of the MI/ppl scans on CPU: 8192 held ~4x the activations and was no faster
# (default model's MI scan 24-29 s either way; a bf16 0.4B Llama's 8.1 s at 2048 vs 9.5 s; same values).
SCAN_TOKENS_PER_CALL = 2048
# Peak process memory of a load over the weights' bytes. 1.48 is the issue's measurement of an fp32 load
# (the old path); bench/scale.py measures the native-dtype path (see the README) and stays below it.
LOAD_OVERHEAD = 1.48
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'20GiB', '48GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ModelLoadError(f"cannot read the size '{text}': write it like 20GiB, 48GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_max_memory(text: str | dict | None) -> dict[str, int]:
    """'cuda:0=20GiB,cpu=48GiB' -> {"cuda:0": bytes, "cpu": bytes} (a dict passes through, sizes parsed)."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else (p.split("=", 1) for p in str(text).split(",") if p.strip())
    out = {}
    for item in items:
        if len(item) != 2:
            raise ModelLoadError(f"--max-memory takes device=size pairs like cuda:0=20GiB,cpu=48GiB, got '{text}'")
        dev, size = item
        dev = str(dev).strip()
        if dev != "cpu" and not re.fullmatch(r"cuda:\d+", dev):
            raise ModelLoadError(f"--max-memory names device '{dev}': use cpu or cuda:N")
        out[dev] = size if isinstance(size, int) else parse_size(size)
    return out


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass
class Plan:
    """Where each part of the model lives. `device_map` None means whole on `compute`."""

    kind: str  # "whole" | "split" | "offload"
    compute: str  # the device inputs go to (the first block's)
    weights_bytes: int
    block_devices: list[str]  # per block: "cpu", "cuda:N" or "disk"
    bytes_per_device: dict[str, int]
    budget: dict[str, int]
    working_set: dict[str, int]
    device_map: dict[str, str] | None = None
    offload_folder: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def offloaded(self) -> bool:
        return self.device_map is not None and any(d in ("cpu", "disk") for d in self.device_map.values()) \
            and self.kind == "offload"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "compute": self.compute, "weights_bytes": self.weights_bytes,
                "block_devices": self.block_devices, "bytes_per_device": self.bytes_per_device,
                "budget": self.budget, "working_set": self.working_set, "offload_folder": self.offload_folder,
                "notes": self.notes}

    def lines(self) -> list[str]:
        """The plan in words (Model panel, `info`)."""
        out = [f"plan: {self.kind}, compute on {self.compute}; weights {gib(self.weights_bytes)}"]
        runs = []  # contiguous runs of blocks on one device
        for i, d in enumerate(self.block_devices):
            if runs and runs[-1][2] == d:
                runs[-1][1] = i
            else:
                runs.append([i, i, d])
        out.append("blocks: " + ", ".join(f"{a}-{b} on {d}" if a != b else f"{a} on {d}" for a, b, d in runs))
        out.append("bytes per device: " + ", ".join(f"{d} {gib(n)}" for d, n in self.bytes_per_device.items())
                   + " (budget: " + ", ".join(f"{d} {gib(n)}" for d, n in self.budget.items()) + ")")
        out.append("working set per job: " + ", ".join(f"{k} {gib(v)}" for k, v in self.working_set.items()))
        return out + self.notes


# ---- sizes ------------------------------------------------------------------------------------------
def module_bytes(model: nn.Module, adapter, dtype: torch.dtype) -> tuple[dict[str, int], list[int]]:
    """(bytes of each non-block top-level part by module name, bytes of each block) in `dtype`, from a
    model built on the meta device (no memory). Tied tensors count once, with the first part naming them."""
    size = torch.empty((), dtype=dtype).element_size()
    seen: set[int] = set()

    def nbytes(m: nn.Module) -> int:
        n = 0
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            n += t.numel() * (size if t.is_floating_point() else t.element_size())
        return n

    blocks = adapter.blocks(model)
    block_bytes = [nbytes(b) for b in blocks]
    parts = {name: nbytes(m) for name, m in outside_blocks(model, adapter.blocks_path)}
    return parts, block_bytes


def outside_blocks(model: nn.Module, blocks_path: str) -> list[tuple[str, nn.Module]]:
    """(name, module) for the children of every module on the path to the block list, except that path:
    together with the blocks they cover the whole model (what a device map must name)."""
    parts = blocks_path.split(".")
    out, parent, prefix = [], model, ""
    for depth, part in enumerate(parts):
        for name, child in parent.named_children():
            if name != part:
                out.append((prefix + name, child))
        parent = getattr(parent, part)
        prefix += part + "."
    return out


def working_sets(config, dtype: torch.dtype) -> dict[str, int]:
    """Each job's working memory beyond the weights, estimated from the shapes (an upper bound of what it
    holds at once): the quick compare's trace (every block's input for 4 x 128 tokens) and fp32 logit
    chunks; the MI scan's trace over 4 x 64 tokens per kept block; GPTQ's fp32 Hessians of one block and
    its calibration activations (128 x 512 tokens, in and out); fusion's group of 7 blocks in fp32 with Adam."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
    n = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))
    ff = int(getattr(cfg, "intermediate_size", None) or 4 * d)
    e = torch.empty((), dtype=dtype).element_size()
    block = (4 * d * d + 3 * d * ff)  # parameters of one block, about
    return {
        "quick compare": n * 4 * 128 * d * e + 3 * LOGIT_CHUNK_BYTES,
        # the trace, and one stacked block call of SCAN_TOKENS_PER_CALL tokens (input, q/k/v/out, gate/up/act)
        "MI scan": 2 * n * 4 * 64 * d * e + SCAN_TOKENS_PER_CALL * (6 * d + 3 * ff) * e + 3 * LOGIT_CHUNK_BYTES,
        "GPTQ": 4 * (3 * d * d + ff * ff) + 2 * 128 * 512 * max(d, ff) * e,
        "fusion": 7 * block * 4 * 4,
    }


# ---- free memory -------------------------------------------------------------------------------------
def gpus_for(device: str) -> list[int]:
    """GPU indices the device choice uses: auto / cuda -> every local GPU, cuda:N -> that one, cpu -> none."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device in (None, "auto", "cuda"):
        if device == "cuda" and n == 0:
            raise ModelLoadError("device 'cuda' was asked for, but no CUDA GPU is available here")
        return list(range(n))
    if device == "cpu":
        return []
    m = re.fullmatch(r"cuda:(\d+)", str(device))
    if not m:
        raise ModelLoadError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N")
    i = int(m.group(1))
    if n == 0:
        raise ModelLoadError(f"device '{device}' was asked for, but no CUDA GPU is available here")
    if i >= n:
        raise ModelLoadError(f"device '{device}' does not exist: {n} GPU(s) here")
    return [i]


def free_memory(gpus: list[int]) -> dict[str, int]:
    import psutil

    out = {f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0]) for i in gpus}
    out["cpu"] = int(psutil.virtual_memory().available)
    return out


# ---- the plan ----------------------------------------------------------------------------------------
def make_plan(parts: dict[str, int], block_bytes: list[int], blocks_path: str, working_set: dict[str, int],
              gpus: list[int], free: dict[str, int], max_memory: dict[str, int] | None = None,
              offload_folder: str | None = None, overhead: float = LOAD_OVERHEAD) -> Plan:
    """Decide the plan (pure: sizes and budgets in, plan out; see the module docstring)."""
    max_memory = max_memory or {}
    unknown = [d for d in max_memory if d != "cpu" and int(d.split(":")[1]) not in gpus]
    if unknown:
        raise ModelLoadError(f"--max-memory names {unknown[0]}, which this run does not use (GPUs used: "
                             f"{', '.join(f'cuda:{i}' for i in gpus) or 'none'})")
    devices = [f"cuda:{i}" for i in gpus] + ["cpu"]
    budget = {d: min(free.get(d, 0), max_memory.get(d, free.get(d, 0))) for d in devices}
    work = max(working_set.values()) if working_set else 0
    rest = sum(parts.values())
    total = rest + sum(block_bytes)
    nb = len(block_bytes)

    def plan(kind, compute, block_devices, notes=()):
        per = {}
        for d, b in zip(block_devices, block_bytes):
            per[d] = per.get(d, 0) + b
        head_dev = compute if kind != "split" else block_devices[-1]
        for name, b in parts.items():
            dev = compute if _is_input_side(name) or kind != "split" else head_dev
            per[dev] = per.get(dev, 0) + b
        dmap = None
        if kind != "whole":
            dmap = {name: (compute if _is_input_side(name) or kind != "split" else head_dev) for name in parts}
            dmap.update({f"{blocks_path}.{i}": d for i, d in enumerate(block_devices)})
        return Plan(kind=kind, compute=compute, weights_bytes=total, block_devices=list(block_devices),
                    bytes_per_device=per, budget=budget, working_set=working_set, device_map=dmap,
                    offload_folder=offload_folder, notes=list(notes))

    def fits(dev, nbytes, with_work=True):
        return nbytes * overhead + (work if with_work else 0) <= budget[dev]

    # (a) whole, on the first GPU that holds it, else on the CPU when only the CPU computes
    for d in devices[:-1]:
        if fits(d, total):
            return plan("whole", d, [d] * nb)
    if not gpus and fits("cpu", total):
        return plan("whole", "cpu", ["cpu"] * nb)
    # (b) split over several GPUs: contiguous ranges, first GPU also holds the embeddings (and norms),
    # the last the head; each GPU keeps room for the working set
    if len(gpus) > 1:
        assigned, g, used = [], 0, rest  # count the non-block parts against the first GPU (conservative)
        for b in block_bytes:
            while g < len(gpus) and not fits(devices[g], used + b):
                g, used = g + 1, 0
            if g == len(gpus):
                break
            assigned.append(devices[g])
            used += b
        if len(assigned) == nb:
            return plan("split", devices[0], assigned, [f"blocks split over {len(set(assigned))} GPUs"])
    # (c) offload: compute on the first GPU (or the CPU); resident parts and as many blocks as fit
    # there, then CPU RAM, then memory-mapped from disk
    compute = devices[0]
    resident = rest + max(block_bytes)  # what must be in memory at once on the compute device
    if not fits(compute, resident):
        need = resident * overhead + work
        flag = f"--max-memory {compute}={need / GiB:.1f}GiB" if compute == "cpu" else "--device cpu"
        raise ModelLoadError(
            f"the model cannot fit even offloaded: its embeddings, head and one block ({gib(resident)}) with the "
            f"load overhead ({overhead:.2f}x) and the largest job's working set ({gib(work)}) need {gib(need)}, "
            f"but {compute} allows {gib(budget[compute])}; {flag} would make it fit"
            + (" (if that much memory is free)" if compute == "cpu" else ""))
    block_devices, room = [], {d: budget[d] - work - rest * overhead * (d == compute) for d in devices}
    for b in block_bytes:
        dev = next((d for d in devices if room[d] >= b * overhead), "disk")
        if dev != "disk":
            room[dev] -= b * overhead
        block_devices.append(dev)
    on_disk = block_devices.count("disk")
    notes = [f"{on_disk} of {nb} blocks memory-mapped from the checkpoint (read from disk at their turn)"] if on_disk else []
    off = [d for d in block_devices if d != compute]
    if off and compute != "cpu":
        notes.append(f"{len(off)} blocks onloaded to {compute} at their turn")
    return plan("offload", compute, block_devices, notes)


def _is_input_side(name: str) -> bool:
    """Parts that run before the blocks (embeddings, rotary tables) go with the first block's device."""
    return any(k in name for k in ("embed", "wte", "wpe", "rotary", "pos"))


# ---- running under a plan -------------------------------------------------------------------------------
def has_hooks(module: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in module.modules())


@contextlib.contextmanager
def onloaded(module: nn.Module):
    """The module's offloaded weights materialised (on their hooks' execution device) for the duration:
    for code that reads weights directly rather than through the hooked forward."""
    if not has_hooks(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            stack.enter_context(align_module_device(m))
        yield module


def strip_hooks(module: nn.Module) -> nn.Module:
    """Remove accelerate's hooks from a (copied) module so it is a plain module with its own tensors."""
    if has_hooks(module):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(module, recurse=True)
        # accelerate leaves `forward` as an instance attribute bound to the module; a later shallow copy
        # (a view's rebound block) would call the original through it, so let the class method serve.
        for m in module.modules():
            f = m.__dict__.get("forward")
            if getattr(f, "__self__", None) is m and getattr(f, "__func__", None) is type(m).forward:
                del m.__dict__["forward"]
    return module


def param_value(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A module's own tensor `name`, also when it is offloaded: then the value its hook would load (for a
    safetensors checkpoint a view of the memory-mapped file, not a copy in RAM)."""
    t = getattr(module, name)
    if t is None or t.device.type != "meta":
        return t
    wm = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if wm is None:
        raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device with no offload map to read it from")
    return wm[name]


def linear_value(module: nn.Module) -> torch.Tensor:
    """linear_weight (out, in) of a linear-like module, offloaded or not."""
    from .adapters.base import is_conv1d

    w = param_value(module, "weight")
    return w.t() if is_conv1d(module) else w


def state_value(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """The value of state-dict entry `name` (tensor `t`) of `model`: `t` itself unless offloaded."""
    if t.device.type != "meta":
        return t
    prefix, _, leaf = name.rpartition(".")
    return param_value(model.get_submodule(prefix) if prefix else model, leaf)
