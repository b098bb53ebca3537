"""Soak: N gradio_client sessions at once applying recipes, comparing, exporting and undoing on a tiny
random model for a bounded time; every export is reloaded with plain transformers and checked against
the same recipe replayed in-process. Prints errors, exports checked, peak RSS minus the RSS after imports,
the store's own accounting against its budget, and the load average (the machine is shared).

    python bench/soak.py [--sessions 8] [--seconds 180] [--budget 2G] [--hidden 256] [--layers 8]

tests/test_safety.py runs `soak()` for ~20 s; the README holds this script's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import psutil

_PROC = psutil.Process()


class ByteTokenizer:
    """One token per byte (vocab 256): the tiny model needs no tokenizer files."""

    pad_token_id = 0
    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        import torch

        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        if not hasattr(ids, "__iter__") or getattr(ids, "ndim", 1) == 0:  # the streamer may pass one token
            ids = [ids]
        return bytes(int(i) for i in ids if int(i) != 0).decode("utf-8", errors="replace")

    def save_pretrained(self, path):
        Path(path, "byte_tokenizer.txt").write_text("bytes\n")


def tiny_lm(hidden: int, layers: int, seed: int = 0):
    import torch
    import transformers as tf

    from workbench.engine.loading import wrap_model

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.mul_(4.0)
    return wrap_model(model.eval(), ByteTokenizer(), spec="tiny-soak", device="cpu")


def _recipes(layers: int, rng: random.Random) -> dict:
    b = sorted(rng.sample(range(layers), 2))
    return {
        "prune": {"steps": [{"op": "prune_blocks", "blocks": [b[0]]}]},
        "rtn": {"steps": [{"op": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "blocks": b}]},
        "gptq+prune": {"calibration": {"samples": 2, "seq_len": 32},
                       "steps": [{"op": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "blocks": [b[1]]},
                                 {"op": "prune_blocks", "blocks": [b[0]]}]},
    }


def check_export(lm, folder: Path, hold=None) -> None:
    """The export reloads with plain transformers and gives the logits of its recipe replayed here."""
    import torch
    from transformers import AutoModelForCausalLM

    from workbench.engine.recipe import Recipe, apply_recipe
    from workbench.engine.variant import view_model

    import contextlib

    recipe = Recipe.from_file(folder / "recipe.json")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    # One at a time: the replay runs the shared model (hooks fire in every thread), and transformers'
    # from_pretrained is not thread-safe (it swaps process-wide state while loading, such as the weight
    # initialisers), so two loads at once in one process can build a wrong model.
    with hold or contextlib.nullcontext(), torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(folder)
        v = apply_recipe(lm, recipe)
        want = view_model(lm.model, lm.adapter, v)(input_ids=ids, use_cache=False).logits
        got = m(input_ids=ids, use_cache=False).logits
    if not torch.isfinite(got).all():
        raise AssertionError(f"{folder}: non-finite logits on reload")
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"{folder}: reloaded logits differ from the recipe replayed ({(got - want).abs().max():.3g})")
    if m.config.num_hidden_layers != len(v.kept()):
        raise AssertionError(f"{folder}: {m.config.num_hidden_layers} layers, want {len(v.kept())}")


def _client_loop(url, layers, stop_at, seed, out_root, lm, stats, lock, hold):
    from gradio_client import Client

    rng = random.Random(seed)
    for attempt in range(3):  # connecting can time out on a loaded machine; a failure is recorded, not lost
        try:
            c = Client(url, verbose=False)
            c.predict(api_name="/start_session")
            break
        except Exception as e:  # noqa: BLE001
            if attempt == 2:
                with lock:
                    stats["errors"].append(f"session {seed} connect: {type(e).__name__}: {str(e)[:300]}")
                return
            time.sleep(2)
    k = 0
    while k < 6 or time.monotonic() < stop_at:
        first = ["recipe", "export", "recipe", "undo", "export", "bad"]  # whatever the load, each session does these
        action = first[k] if k < len(first) else rng.choice(["recipe", "recipe", "generate", "export", "undo", "bad"])
        try:
            if action == "recipe":
                name, r = rng.choice(list(_recipes(layers, rng).items()))
                msg, _ = c.predict(json.dumps(r), None, api_name="/import_recipe")
                assert "Imported recipe" in msg, msg
            elif action == "generate":
                o, v, speed = c.predict("Hello there", 4, api_name="/generate")
                assert "tokens/s" in speed
            elif action == "undo":
                try:
                    c.predict(api_name="/undo")
                except Exception as e:  # nothing to undo is a message, not a failure
                    assert "nothing to undo" in str(e), e
            elif action == "bad":
                try:
                    c.predict('{"steps": ' + "[" * 3000 + "]" * 3000 + "}", None, api_name="/import_recipe")
                    raise AssertionError("a 3001-deep recipe was accepted")
                except AssertionError:
                    raise
                except Exception as e:
                    assert "nests 3001 levels" in str(e), e
            else:
                dest = Path(out_root) / f"s{seed}-{k}"
                msg = c.predict(str(dest), False, api_name="/export")
                assert "Exported" in msg, msg
                check_export(lm, dest, hold())
                shutil.rmtree(dest)
                with lock:
                    stats["exports"] += 1
            with lock:
                stats["actions"] += 1
            k += 1
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the soak goes on
            with lock:
                stats["errors"].append(f"session {seed} {action}: {type(e).__name__}: {str(e)[:300]}")
                if len(stats["errors"]) < 3:
                    stats["tracebacks"].append(traceback.format_exc())
            k += 1


def _current_bytes(store) -> int:
    """Bytes of the sessions' current variants' blocks: what the budget can never release."""
    from workbench import budget as B
    from workbench.store import RELEASED
    from workbench.engine.variant import DROP

    orig = store._original_storages()
    mods = [o for s in list(store._sessions.values()) if s.current is not None
            for o in s.current.overrides.values() if o is not DROP and o is not RELEASED]
    return sum(n for p, n in B.storages(mods).items() if p not in orig)


def soak(sessions: int = 8, seconds: float = 20, budget: int | None = 2 * 2**30, hidden: int = 64,
         layers: int = 6) -> dict:
    """Run the soak; -> figures (see the module doc)."""
    import gradio_client  # noqa: F401 - imported before the baseline is taken
    from transformers import AutoModelForCausalLM  # noqa: F401

    from workbench.app import build_app
    from workbench.store import Store

    rss0 = _PROC.memory_info().rss
    lm = tiny_lm(hidden, layers)
    store = Store(default_model="tiny-soak", device="cpu", memory_budget=budget, session_idle=None)
    store.register_model(lm, "tiny-soak")
    demo = build_app(store=store)
    demo.queue(default_concurrency_limit=4)
    for attempt in range(3):  # on a loaded machine gradio's own reachability check can time out
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
            break
        except ValueError:
            demo.close()
            if attempt == 2:
                raise
    url = f"http://127.0.0.1:{port}/"
    stats = {"actions": 0, "exports": 0, "errors": [], "tracebacks": []}
    peak = {"rss": 0, "store": 0}
    lock = threading.Lock()
    out_root = tempfile.mkdtemp(prefix="wb-soak-")
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            peak["rss"] = max(peak["rss"], _PROC.memory_info().rss)
            peak["store"] = max(peak["store"], store.memory_used()["total"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    stop_at = t0 + seconds
    checker = store.new_session()
    store.attach(checker)
    threads = [threading.Thread(target=_client_loop,
                                args=(url, layers, stop_at, i, out_root, lm, stats, lock, lambda: store.using(checker)))
               for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    store.enforce_budget()  # at rest (no session busy) the store keeps to its budget: checked by the caller
    try:  # the app still answers afterwards
        from gradio_client import Client

        Client(url, verbose=False).predict(api_name="/start_session")
        answering = True
    except Exception:  # noqa: BLE001
        answering = False
    demo.close()
    shutil.rmtree(out_root, ignore_errors=True)
    return {"sessions": sessions, "seconds": wall, "actions": stats["actions"], "exports_checked": stats["exports"],
            "errors": stats["errors"], "tracebacks": stats["tracebacks"], "answering_after": answering,
            "rss_growth": peak["rss"] - rss0, "store_peak": peak["store"], "budget": budget,
            "variants_released": sum(len(s.released) for s in store._sessions.values()),
            "store_end": store.memory_used()["total"], "current_blocks": _current_bytes(store),
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    from workbench.budget import parse_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--budget", default="2G")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args(argv)
    print(f"load average before: {os.getloadavg()}", flush=True)
    r = soak(a.sessions, a.seconds, parse_bytes(a.budget), a.hidden, a.layers)
    mib = 2**20
    print(f"{r['sessions']} sessions, {r['seconds']:.0f} s: {r['actions']} actions, {r['exports_checked']} exports "
          f"reloaded and checked, {len(r['errors'])} errors, answering afterwards: {r['answering_after']}")
    print(f"peak RSS - RSS after imports: {r['rss_growth'] / mib:.0f} MiB; store accounting peak "
          f"{r['store_peak'] / mib:.1f} MiB; budget {r['budget'] / mib:.0f} MiB; variants released at the end: "
          f"{r['variants_released']} (store at the end {r['store_end'] / mib:.1f} MiB, of which the sessions' current "
          f"variants, never released, {r['current_blocks'] / mib:.1f} MiB); load average after: {r['load_average']}")
    for e in r["errors"][:10]:
        print("  error:", e)
    for t in r["tracebacks"]:
        print(t)
    return 1 if r["errors"] or not r["answering_after"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
