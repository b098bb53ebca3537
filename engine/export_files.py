"""The files of an export: dense weights streamed into safetensors shards, modes, bytes on disk.

Dense weights are written tensor by tensor in the order of the state dict (so block by block) into
shards of at most `max_shard_bytes` (5 GB by default, as `save_pretrained`), each shard written as soon
as it is full: at most one shard's tensors are held for writing, never a second copy of the model.
Tensors keep their own dtype (the model's load dtype: bf16 in, bf16 out). One shard is written as
`model.safetensors`; more as `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`,
the layout transformers reads.

Tied embeddings: a tensor met twice (lm_head sharing the embedding) is written once when the config
says the embeddings are tied, so the reload ties lm_head back to it; when the config does not say so,
it is written under both names (a reload must find both).

Modes: a temporary folder (mkdtemp) is created 0700; exports get the modes a plain `open`/`mkdir`
would have given under the user's umask (0644 files / 0755 folders under umask 022), so another user
or a serving container can read them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

DEFAULT_SHARD_BYTES = 5 * 10**9
INDEX_NAME = "model.safetensors.index.json"


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Collects named tensors and writes a safetensors shard whenever the next tensor would overflow.

    `add(name, tensor)` in order; `close()` names the shards, writes the index (if more than one)
    and returns the file names written."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_shard_bytes = int(max_shard_bytes)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nb = tensor_nbytes(tensor)
        if self._pending and self._pending_bytes + nb > self.max_shard_bytes:
            self._flush()
        # contiguous: a view (e.g. a transposed weight) is laid out on its own; plain weights are not copied
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nb
        self.total_bytes += nb

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.folder / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        self._flush()
        n = len(self._shards)
        if n == 0:
            return []
        if n == 1:
            os.replace(self._shards[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for k, (path, tensors) in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_NAME]


def ties_embeddings(model: nn.Module) -> bool:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))


def dense_tensors(model: nn.Module):
    """(name, tensor) of the model's state dict in order, each storage once when embeddings are tied
    (lm_head then reloads tied); a tensor met twice without ties is yielded as its own copy."""
    tied = ties_embeddings(model)
    seen: set[tuple] = set()
    from .plan import state_value

    for name, t in model.state_dict().items():
        t = state_value(model, name, t)  # an offloaded tensor: read from its memory map, one at a time
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            if tied:
                continue
            t = t.clone()
        seen.add(key)
        yield name, t


def dense_weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors the dense export writes (the payload of its safetensors files)."""
    return sum(tensor_nbytes(t) for _, t in dense_tensors(model))


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's floating-point weights are in."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def write_dense_weights(model: nn.Module, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Stream the model's weights into safetensors shards in `folder`; then its config (dtype set to the
    weights' own) and generation config. Returns the weight file names."""
    writer = ShardWriter(folder, max_shard_bytes)
    for name, t in dense_tensors(model):
        writer.add(name, t)
    files = writer.close()
    config = copy.deepcopy(model.config)  # never edit the loaded model's own config
    config.dtype = str(weights_dtype(model)).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except ValueError:  # an inconsistent generation config of the source: the model loads without it
            pass
    return files


# ---- modes and sizes ---------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def set_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes of a plain mkdir/open under the umask."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(Path(root, f), 0o666 & ~mask)


def files_bytes(folder: Path) -> dict[str, int]:
    """{relative path: bytes on disk} of every file under `folder`."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = p.stat().st_size
    return out
