"""Token ids llama.cpp itself (llama-cpp-python, vocabulary only) gives some texts from a GGUF file, for the
slow tokenizer tests. Run with the Python of the cached llama-cpp-python venv (see LLAMACPP_VENV):

    python bench/llamacpp_tokenize.py MODEL.gguf TEXTS.json OUT.json

TEXTS.json: a list of strings; OUT.json gets {"ids": one list per text (BOS as the file's add-BOS flag
says), "n_vocab"}.
"""

import json
import sys


def main(model_path: str, texts_path: str, out_path: str) -> None:
    from llama_cpp import Llama

    texts = json.load(open(texts_path))
    llm = Llama(model_path=model_path, vocab_only=True, verbose=False)
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=False) for t in texts]
    json.dump({"ids": ids, "n_vocab": llm.n_vocab()}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
