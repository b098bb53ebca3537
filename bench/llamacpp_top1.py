"""Greedy top-1 of a GGUF file under llama.cpp itself (llama-cpp-python), for bench/export.py and the slow
test in tests/test_export.py. Run with the Python of the cached llama-cpp-python venv (see LLAMACPP_VENV):

    python bench/llamacpp_top1.py MODEL.gguf IDS.json OUT.json

IDS.json: a list of token-id rows; OUT.json gets, per row, the argmax token at every position (the
prediction for the next token), computed from the logits of one evaluation of the row.
"""

import json
import sys


def main(model_path: str, ids_path: str, out_path: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    rows = json.load(open(ids_path))
    n_ctx = max(len(r) for r in rows) + 8
    llm = Llama(model_path=model_path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    out = []
    for row in rows:
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: len(row)])  # (T, vocab)
        out.append(logits.argmax(-1).tolist())
    json.dump({"top1": out, "n_vocab": llm.n_vocab()}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
