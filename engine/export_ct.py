"""Export a quantized variant in the compressed-tensors format (`quant_method: compressed-tensors`,
`format: pack-quantized`), written by the `compressed-tensors` library itself (no hand packing).

Every linear the `quantize` step touched carries its integer codes, scales and zero points
(`workbench_quant`); this module attaches them to a private copy of the variant's model as
compressed-tensors quantization parameters, lets the library pack the codes into int32 words and writes
its config. `transformers` loads the folder when `compressed-tensors` is installed. Blocks not quantized
(and embeddings, norms, LM head) stay dense and are listed in the config's `ignore`.

Mapping onto compressed-tensors' grid: it stores signed codes q - 2^(bits-1) and zero points
z - 2^(bits-1) (symmetric schemes: zero point 0), which dequantize to the same s (q - z).
`act_order` 'weight'/'static' exports as actorder 'weight' (the layout is the plain grouped one);
'group' needs a g_idx that compressed-tensors 0.20 no longer supports: such variants export dense only.
The library's own quantize step re-derives the codes from the dequantized weights, so the codes written
are checked against ours before anything is saved.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError
from .export_common import model_card, model_sources, save_model_files, write_side_files
from .safe_folder import atomic_folder
from .loading import LoadedModel
from .variant import Variant, view_model

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
LOAD_SYM = ("symmetric scheme(s): `AutoModelForCausalLM.from_pretrained('<this folder>')` loads it as it is "
            "(the weights are dequantized on the first forward pass).")
LOAD_ASYM = ("asymmetric scheme(s): `AutoModelForCausalLM.from_pretrained('<this folder>')` loads it as it is; "
             "the config's `quantization_config` carries `\"dequantize\": true`, so transformers dequantizes the "
             "packed weights while loading. Why: transformers 5.24 + compressed-tensors 0.20 build the compressed "
             "model with unpacked zero-point shapes (the library's meta-device compress path does not pack them) "
             "and then refuse the packed zero points the same library wrote. The stored tensors are the standard "
             "pack-quantized layout; delete that key once a fixed compressed-tensors is installed.")


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module for every module carrying a `workbench_quant` record."""
    return {n: m for n, m in model.named_modules() if getattr(m, "workbench_quant", None) is not None}


def check_exportable(lm: LoadedModel, variant: Variant) -> None:
    """Raise ExportError when the variant cannot be written as compressed-tensors."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ExportError("the compressed-tensors export needs the `compressed-tensors` package") from e
    if getattr(lm.adapter, "is_moe", False):
        raise ExportError(
            f"the compressed-tensors export does not write mixture-of-experts models ({lm.adapter.family}: its "
            "experts are 3-D tensors, which the format packs per expert linear); use the dense export"
        )
    mods = quantized_linears(view_model(lm.model, lm.adapter, variant))
    if not mods:
        raise ExportError("this variant has no quantized blocks: use the dense export")
    keys = {_key(m.workbench_quant) for m in mods.values()}
    if len(keys) > 1 and any(not m.workbench_quant.sym for m in mods.values()):
        raise ExportError(
            "asymmetric quantization with more than one scheme (mixed precision) cannot be reloaded: asymmetric "
            "exports load through transformers' dequantize-on-load path (transformers 5.24 + compressed-tensors 0.20 "
            "cannot build packed asymmetric layers), and that path decodes every layer with one scheme; use "
            "symmetric schemes for mixed precision, one asymmetric scheme, or the dense export"
        )
    for name, m in mods.items():
        rec = m.workbench_quant
        if not isinstance(m, nn.Linear):
            raise ExportError(
                f"{name} is a {type(m).__name__}, not nn.Linear: compressed-tensors packs only nn.Linear weights "
                "(GPT-2's Conv1D included); use the dense export"
            )
        if getattr(rec, "gguf", None) and not rec.sym:
            raise ExportError(
                f"{name} uses the GGUF scheme {rec.gguf}, which decodes d*q + m with m rounded to float16: "
                "compressed-tensors' zero points cannot store that exactly; use the gguf or the dense export"
            )
        if rec.act_order == "group":
            raise ExportError(
                f"{name} was quantized with act_order 'group', whose g_idx compressed-tensors 0.20 no longer "
                "exports; use act_order 'weight' (same layout as no act order) or the dense export"
            )


def _scheme(rec, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = dict(num_bits=rec.bits, type="int", symmetric=rec.sym)
    if rec.group_size == -1:
        args.update(strategy="channel")
    else:
        args.update(strategy="group", group_size=rec.group_size)
    if rec.act_order in ("weight", "static"):
        args.update(actorder="weight")
    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**args), format=FORMAT)


def _key(rec) -> tuple:
    return (rec.bits, rec.group_size, rec.sym, rec.act_order in ("weight", "static"))


def attach_ct_params(model: nn.Module) -> dict:
    """Give each quantized linear of `model` (a private copy) its compressed-tensors scheme and
    parameters. Returns {linear name: expected signed codes (out, in) int8} for the check after packing."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    mods = quantized_linears(model)
    groups: dict[tuple, list[str]] = {}
    for name, m in mods.items():
        groups.setdefault(_key(m.workbench_quant), []).append(name)
    schemes = {k: _scheme(mods[names[0]].workbench_quant, names) for k, names in groups.items()}
    expected = {}
    for name, m in mods.items():
        rec = m.workbench_quant
        scheme = schemes[_key(rec)]
        initialize_module_for_quantization(m, scheme, force_zero_point=not rec.sym)
        half = 2 ** (rec.bits - 1)
        dev, dt = m.weight.device, m.weight.dtype
        with torch.no_grad():
            m.weight_scale.data = rec.scale.to(device=dev, dtype=m.weight_scale.dtype).reshape(m.weight_scale.shape)
            if not rec.sym:
                m.weight_zero_point.data = (rec.zero.to(dev) - half).to(m.weight_zero_point.dtype).reshape(
                    m.weight_zero_point.shape
                )
            # the weight the library re-quantizes: our grid applied to our codes, exactly
            s = rec.scale.to(dev)[:, rec.g_idx.long().to(dev)].float()
            z = rec.zero.to(dev)[:, rec.g_idx.long().to(dev)].float()
            m.weight.data = (s * (rec.codes.to(dev).float() - z)).to(dt)
        m.quantization_status = QuantizationStatus.FROZEN
        expected[name] = (rec.codes.to(torch.int16) - half).to(torch.int8)
    return expected


def _check_packed(model: nn.Module, expected: dict) -> None:
    """Unpack what the library packed and compare with our codes (a mismatch is a bug: refuse)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    mods = dict(model.named_modules())
    for name, codes in expected.items():
        m = mods[name]
        bits = m.quantization_scheme.weights.num_bits
        got = unpack_from_int32(m.weight_packed.data, bits, torch.Size(codes.shape)).to(torch.int8).cpu()
        if not torch.equal(got, codes.cpu()):
            bad = int((got != codes.cpu()).sum())
            raise ExportError(f"internal: {bad} packed codes of {name} differ from the quantizer's; export refused")


def _ask_dequantize_on_load(config_path: Path) -> None:
    """Set `quantization_config.dequantize = true` (read by transformers' CompressedTensorsConfig; ignored
    by compressed-tensors' own config model), the one load route for packed asymmetric zero points."""
    cfg = json.loads(config_path.read_text())
    cfg["quantization_config"]["dequantize"] = True
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_compressed(
    lm: LoadedModel,
    variant: Variant,
    out_dir: str | Path,
    recipe: dict,
    metrics: dict | None = None,
    overwrite: bool = False,
    notes: list[str] | None = None,
    progress=None,
    extra_files: dict | None = None,
) -> Path:
    """Write the variant as a compressed-tensors (pack-quantized) checkpoint into `out_dir`, atomically."""
    check_exportable(lm, variant)
    from compressed_tensors.compressors import ModelCompressor

    with atomic_folder(out_dir, overwrite, progress, protect=model_sources(lm)) as tmp:
        if progress:
            progress(0.1, "copying the variant for packing")
        # A private copy: the library edits modules in place (new parameters, a new forward).
        model = copy.deepcopy(view_model(lm.model, lm.adapter, variant))
        expected = attach_ct_params(model)
        if progress:
            progress(0.3, "packing with compressed-tensors")
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
        compressor.compress_model(model)
        _check_packed(model, expected)
        if progress:
            progress(0.6, "writing weights")
        asym = any(not m.workbench_quant.sym for m in quantized_linears(model).values())

        def finish_config(folder):
            compressor.update_config(str(folder))
            if asym:
                _ask_dequantize_on_load(Path(folder) / "config.json")

        save_model_files(model, lm.tokenizer, tmp, after_weights=finish_config)
        card_notes = [
            "weights of the quantized blocks are stored in the compressed-tensors format (pack-quantized): "
            "loading needs the `compressed-tensors` package (`pip install compressed-tensors`, tested with 0.20) "
            "next to transformers (tested with 5.24).",
            LOAD_ASYM if asym else LOAD_SYM,
            "vLLM can serve pack-quantized 4- and 8-bit weights, but loading this export in vLLM was not tested here.",
            *(notes or []),
        ]
        weights = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.safetensors"))}
        card = model_card(lm, variant, recipe, metrics, card_notes, "compressed-tensors", weights)
        write_side_files(tmp, recipe, card, metrics, "compressed-tensors", extra_files)
    return Path(out_dir).expanduser().resolve()


def estimate_ct_bytes(lm: LoadedModel, variant: Variant) -> int:
    """Bytes of the tensors the compressed-tensors export writes (before writing anything): per quantized
    linear the codes bit-packed into int32 words along the input, the scales in the weights' dtype, the
    zero points bit-packed along the output (asymmetric), the int64 (2,) weight shape; everything else
    dense as in `export_files`."""
    from .export_files import dense_tensors, tensor_nbytes

    model = view_model(lm.model, lm.adapter, variant)
    mods = quantized_linears(model)
    total = 0
    for name, t in dense_tensors(model):
        mod = mods.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if mod is None:
            total += tensor_nbytes(t)
            continue
        rec = mod.workbench_quant
        out, cols = t.shape
        groups = rec.scale.shape[1]
        total += out * -(-cols * rec.bits // 32) * 4 + out * groups * t.element_size() + 2 * 8
        if not rec.sym:
            total += -(-out * rec.bits // 32) * groups * 4
    return total
