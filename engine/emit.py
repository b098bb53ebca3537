"""Recipes for other tools, from a variant's resolved recipe: what they can reproduce of it, and what not.

- `llm_compressor_recipe`: an llm-compressor recipe (YAML) with one stage per `quantize` step: GPTQ as
  `GPTQModifier`, RTN as `QuantizationModifier`, the same bits / group size / symmetry / act order /
  dampening / observer, targeting the same blocks' linears. It reproduces the quantize steps on a model
  that already has the variant's block structure; it cannot drop or fuse blocks or sparsify, and it has
  no Hessian shrinkage, true-sequential stages (its pipelines differ) or GGUF float16 scales.
- `llama_quantize_args`: a `llama-quantize` command that reproduces a prune + per-block quantize plan
  with llama.cpp's own tools: `--prune-layers` for the dropped blocks and one `--tensor-type` override per
  quantize step (the nearest llama.cpp type). llama.cpp rounds to nearest (importance-weighted with an
  `--imatrix`): GPTQ's solve, fusion and sparsity are not reproduced.
"""

from __future__ import annotations

from .errors import ExportError

EMITTERS = ("llm-compressor", "llama-quantize")
FILES = {"llm-compressor": "llm-compressor-recipe.yaml", "llama-quantize": "llama-quantize.sh"}
_PROJ = r"(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$"


def _unreproduced(steps: list[dict], tool: str) -> list[str]:
    ops = {"fuse_blocks": "fusion (FuseGPT) of blocks", "sparsify": "sparsity masks"}
    if tool == "llm-compressor":
        ops["prune_blocks"] = "block removal"
    lines = [f"cannot reproduce step {k + 1}: {ops[s['op']]}" for k, s in enumerate(steps) if s.get("op") in ops]
    for k, s in enumerate(steps):
        if s.get("op") != "quantize":
            continue
        if s.get("hessian_shrink"):
            lines.append(f"step {k + 1}: Hessian shrinkage {s['hessian_shrink']} has no counterpart")
        if s.get("true_sequential") and tool == "llm-compressor":
            lines.append(f"step {k + 1}: true-sequential stages follow llm-compressor's own pipeline")
        if tool == "llama-quantize" and s.get("method") == "gptq":
            lines.append(f"step {k + 1}: GPTQ's error-compensating solve becomes llama.cpp's rounding")
    return lines


def _renumber(blocks: list[int], dropped: list[int]) -> list[int]:
    return [b - sum(1 for d in dropped if d < b) for b in blocks]


def llm_compressor_recipe(recipe: dict, num_blocks: int, dropped: list[int]) -> str:
    """YAML text of an llm-compressor recipe for the recipe's quantize steps; `dropped`: the variant's
    dropped blocks (removed or fused away), by which its block numbers are renumbered."""
    steps = recipe.get("steps", [])
    qsteps = [s for s in steps if s.get("op") == "quantize"]
    if not qsteps:
        raise ExportError("--emit llm-compressor: the recipe has no quantize step to reproduce")
    lines = ["# llm-compressor recipe written by the Compression Workbench (engine/emit.py).",
             "# Block numbers are those of the model after the variant's block removals"
             + (f" (original blocks {dropped} dropped): apply it to that model." if dropped else "."),
             *[f"# {n}" for n in _unreproduced(steps, "llm-compressor")]]
    for k, s in enumerate(qsteps):
        blocks = s.get("blocks") or [b for b in range(num_blocks) if b not in dropped]
        new = _renumber(sorted(blocks), dropped)
        target = rf"re:model\.layers\.({'|'.join(map(str, new))})\.{_PROJ}"
        mod = "GPTQModifier" if s.get("method") == "gptq" else "QuantizationModifier"
        lines += [f"quant_stage_{k}:", "  quant_modifiers:", f"    {mod}:", "      ignore: ['lm_head']"]
        if mod == "GPTQModifier":
            lines.append(f"      dampening_frac: {float(s.get('damp', 0.01))}")
        strategy = "channel" if s.get("group_size") == -1 else "group"
        lines += ["      config_groups:", "        group_0:", f"          targets: ['{target}']", "          weights:",
                  f"            num_bits: {int(s['bits'])}", "            type: int",
                  f"            symmetric: {'true' if s.get('sym') else 'false'}",
                  f"            strategy: {strategy}"]
        if strategy == "group":
            lines.append(f"            group_size: {int(s['group_size'])}")
        if s.get("method") == "gptq" and s.get("act_order"):
            lines.append(f"            actorder: {'group' if s['act_order'] == 'group' else 'weight'}")
        lines.append(f"            observer: {s.get('observer', 'minmax')}")
    return "\n".join(lines) + "\n"


def llama_type(step: dict) -> str:
    """The nearest llama.cpp type of a quantize step's scheme."""
    if step.get("gguf"):
        return step["gguf"].lower()
    bits, sym = int(step["bits"]), bool(step.get("sym"))
    return {8: "q8_0", 5: "q5_0" if sym else "q5_1", 4: "q4_0" if sym else "q4_1", 3: "q3_k", 2: "q2_k"}[bits]


def llama_quantize_args(recipe: dict, num_blocks: int, source: str = "model-f16.gguf",
                        target: str = "model-variant.gguf") -> str:
    """A shell script: the llama-quantize command of the recipe's prune + per-block quantize plan."""
    steps = recipe.get("steps", [])
    pruned = sorted({b for s in steps if s.get("op") == "prune_blocks" for b in s.get("blocks", [])})
    parts = ["llama-quantize"]
    if pruned:
        parts += ["--prune-layers", ",".join(map(str, pruned))]
    overrides: dict[int, str] = {}
    for s in steps:
        if s.get("op") == "quantize":
            for b in s.get("blocks") or [b for b in range(num_blocks) if b not in pruned]:
                overrides[b] = llama_type(s)  # a later step on the same block wins, as in the workbench
    by_type: dict[str, list[int]] = {}
    for b, t in sorted(overrides.items()):
        by_type.setdefault(t, []).append(b)
    for t, blocks in by_type.items():
        parts += ["--tensor-type", f"'blk\\.({'|'.join(map(str, blocks))})\\.={t}'"]
    parts += [source, target, "F16"]
    lines = ["#!/bin/sh",
             "# llama-quantize command written by the Compression Workbench (engine/emit.py).",
             f"# Input: the original model as an F16 GGUF ({source}); block numbers are the input's (original) ones.",
             "# Blocks without an override stay F16 (the last argument); embeddings and output are F16 too.",
             *[f"# {n}" for n in _unreproduced(steps, "llama-quantize")],
             " ".join(parts)]
    return "\n".join(lines) + "\n"


def emit(kind: str, recipe: dict, num_blocks: int, dropped: list[int]) -> tuple[str, str]:
    """-> (file name, text) for `--emit kind`."""
    if kind == "llm-compressor":
        return FILES[kind], llm_compressor_recipe(recipe, num_blocks, dropped)
    if kind == "llama-quantize":
        return FILES[kind], llama_quantize_args(recipe, num_blocks)
    raise ExportError(f"unknown --emit {kind!r} (choose {', '.join(EMITTERS)})")
