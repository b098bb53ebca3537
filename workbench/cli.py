"""Headless CLI: the same engine as the app. The command names, flags and JSON shapes are a contract.

    workbench [app] [--model M] [--host 127.0.0.1] [--port N] [--auth-file FILE | --no-auth]
                    [--session-idle 2h] [--memory-budget 2G]
    workbench info --model M [--json]
    workbench eval --model M [--recipe R] [--text FILE] [--seq-len N] [--max-tokens N] [--json]
    workbench compress --model M --recipe R --out DIR [--overwrite] [--format dense|compressed-tensors|gguf]
                       [--gguf-type Q4_0|...] [--emit llm-compressor|llama-quantize]
    workbench analyze <name> ...

`--json` prints one JSON document on stdout (schema_version, the inputs used, units); progress and logs
go to stderr. Bad input: one `error: ...` line on stderr and exit 2, never a traceback; an environment
failure (disk full, permission denied while writing) is one `error: ...` line and exit 3.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time

from workbench import commands
from workbench import validate as V
from workbench.commands.common import (  # noqa: F401  (re-exported: the commands' plumbing used to live here)
    SCHEMA_VERSION,
    StderrProgress,
    add_load_args,
    add_model_args,
    document,
    load_options,
    one_line,
    open_session,
    stderr_progress,
)

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT = 3  # the machine refused (disk full, permission denied): one `error:` line, nothing half-written

log = logging.getLogger("workbench")


def _print_human(doc: dict) -> None:
    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(obj, list) and len(obj) > 12:
            print(f"{prefix[:-1]}: [{len(obj)} items] {json.dumps(obj[:12])[:-1]}, ...]")
        else:
            print(f"{prefix[:-1]}: {obj:.6g}" if isinstance(obj, float) else f"{prefix[:-1]}: {obj}")

    walk("", doc["result"])


# ---- commands ------------------------------------------------------------------------------------
def cmd_info(args) -> dict:
    from workbench.engine.loading import load_model

    lm = load_model(args.model or "default", progress=stderr_progress, **load_options(args))
    return document("info", args, lm, None, None, lm.info(), {"parameters": "count", "bytes": "bytes"})


def cmd_eval(args) -> dict:
    from workbench.engine import evaluate as ev

    lm, variant, recipe, calib = open_session(args)
    source = calib.source
    seq_len = args.seq_len or 256
    result = ev.full_eval(lm, variant, source=source, seq_len=seq_len, max_tokens=args.max_tokens, progress=stderr_progress)
    if variant.is_identity():
        for k in ("kl", "top1"):
            result.pop(k, None)
    result["blocks_kept"] = len(variant.kept())
    result["num_blocks"] = variant.num_blocks
    units = {"ppl": "perplexity (exp mean NLL, nats)", "ppl_original": "perplexity", "kl": "nats per token",
             "top1": "fraction of tokens", "nll": "nats per token", "tokens": "count", "parameters": "count",
             "bytes": "bytes", "seconds": "s"}
    return document("eval", args, lm, recipe, calib, result, units)


def cmd_compress(args) -> dict:
    from workbench.engine import evaluate as ev
    from workbench.engine.errors import ExportError
    from workbench.engine.emit import emit
    from workbench.engine.export import export_any
    from workbench.engine.recipe import variant_recipe
    from workbench.engine.safe_folder import check_target

    if args.gguf_type and args.format not in (None, "gguf"):
        raise ExportError("--gguf-type applies to --format gguf only")
    if args.gguf_type and args.format is None:
        args.format = "gguf"
    # the output folder's rules before the model loads and the recipe runs (the export checks again, then
    # also against the loaded model's resolved source)
    check_target(args.out, overwrite=args.overwrite, protect=(args.model,) if args.model else ())
    lm, variant, recipe, calib = open_session(args)
    t0 = time.perf_counter()
    quick = ev.quick_eval(lm, variant)
    metrics = {f"quick_{k}": v for k, v in quick.items() if k in ("kl", "top1", "ppl", "tokens")}
    metrics.update({"parameters": quick["parameters"], "bytes": quick["bytes"]})
    resolved = variant_recipe(lm, variant, calib)
    extra = {}
    for kind in args.emit or []:
        name, text = emit(kind, resolved, variant.num_blocks, variant.dropped())
        extra[name] = text
    out, fmt = export_any(lm, variant, args.out, resolved, fmt=args.format, gguf_type=args.gguf_type, metrics=metrics,
                          overwrite=args.overwrite, progress=stderr_progress, extra_files=extra)
    result = {"out": str(out), "format": fmt, "emitted": sorted(extra), "blocks_kept": len(variant.kept()), "dropped": variant.dropped(),
              "replaced": variant.replaced(), "metrics": metrics, "reports": variant.reports,
              "seconds": time.perf_counter() - t0}
    return document("compress", args, lm, recipe, calib, result, {"bytes": "bytes", "quick_kl": "nats per token", "seconds": "s"})


def cmd_app(args) -> int:
    from workbench.app import launch

    opts = load_options(args)
    launch(model=args.model, host=args.host, port=args.port, device=opts.pop("device"),
           allow_pickle=opts.pop("allow_pickle"), load=opts, auth_file=args.auth_file, no_auth=args.no_auth,
           session_idle=args.session_idle, memory_budget=args.memory_budget)
    return 0


# ---- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = V.Parser(prog="workbench", description="Compression Workbench")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("app", help="launch the local web app")
    p.add_argument("--model", type=V.model, default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=V.port, default=7860)
    add_load_args(p)
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="require a login: user:password lines (Gradio's authentication); needed with a --host "
                        "other than loopback unless --no-auth")
    p.add_argument("--no-auth", action="store_true", help="serve a non-loopback --host without a login (anyone who "
                                                         "can reach the machine can use the app)")
    p.add_argument("--session-idle", type=V.duration, default=V.duration("2h"), metavar="TIME",
                   help="forget a browser session idle this long (2h; 90m, 600s, off); a running job finishes first")
    p.add_argument("--memory-budget", type=V.size, default=V.size("2G"), metavar="SIZE",
                   help="memory for variants and cached results across sessions (2G; 512M, off); over it, cached "
                        "results go first, then old variants' blocks (rebuilt from their recipe when needed)")
    p.set_defaults(func=cmd_app, returns_code=True)

    p = sub.add_parser("info", help="architecture, blocks, parameters, device")
    add_model_args(p, recipe=False, calibration=False)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity (and KL / top-1 vs the original with a recipe)")
    add_model_args(p)
    p.add_argument("--max-tokens", type=V.positive_int, default=None, help="evaluate at most this many tokens")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress", help="apply a recipe and export a checkpoint")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--format", choices=["dense", "compressed-tensors", "gguf"], default=None,
                   help="default: compressed-tensors when the recipe quantizes, else dense. dense: safetensors in "
                        "the model's dtype (transformers, vLLM); compressed-tensors: packed quantized weights "
                        "(transformers + compressed-tensors, vLLM); gguf: one .gguf file (llama.cpp, Ollama)")
    p.add_argument("--gguf-type", default=None, type=str.upper,
                   choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"],
                   help="GGUF tensor type of the block weights (default: the quantized blocks' own GGUF scheme, "
                        "else the model's float dtype); implies --format gguf")
    p.add_argument("--emit", action="append", choices=["llm-compressor", "llama-quantize"], default=None,
                   help="also write, into the export folder, an llm-compressor recipe (YAML) reproducing the quantize "
                        "steps, or the llama-quantize command reproducing a prune + per-block quantize plan "
                        "(repeatable)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("analyze", help="block influence and the other analyses")
    asub = p.add_subparsers(dest="analysis")
    for name in commands.ANALYZE:
        importlib.import_module(f"{commands.__name__}.{name}").add_parser(asub)
    p.set_defaults(func=lambda a: p.error("choose an analysis"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    if not argv or argv[0].startswith("--model") or argv[0] in ("--host", "--port", "--auth-file", "--no-auth", "--session-idle", "--memory-budget"):
        argv = ["app", *argv]  # bare `workbench` launches the app
    args = parser.parse_args(argv)
    from workbench.engine.errors import WorkbenchError, WriteFailure

    try:
        out = args.func(args)
        if getattr(args, "returns_code", False):
            return int(out or 0)
        if getattr(args, "json", False):
            json.dump(out, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            _print_human(out)
        return 0
    except WriteFailure as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except WorkbenchError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: still one line unless --debug
        if args.debug:
            raise
        print(f"internal error: {type(e).__name__}: {one_line(e)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
