"""Shared fixtures: tiny random models for every family (no download) and the real default model once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class ByteTokenizer:
    """A dependency-free stand-in tokenizer for tiny models: one token per byte (vocab 256)."""

    pad_token_id = 0
    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids if int(i) != 0).decode("utf-8", errors="replace")

    def save_pretrained(self, path):
        Path(path, "byte_tokenizer.txt").write_text("bytes\n")


@pytest.fixture
def tiny_lm():
    """Factory: tiny_lm('llama', layers=4) -> LoadedModel wrapping a tiny random model."""
    from workbench.engine.loading import wrap_model

    def make(family: str = "llama", layers: int = 4, seed: int = 0):
        return wrap_model(tiny_model(family, layers, seed), ByteTokenizer(), spec=f"tiny-{family}", device="cpu")

    return make


TINY_SPEC = "tiny-llama"


@pytest.fixture
def tiny_store(tiny_lm):
    """Factory: tiny_store(layers=4, calibration=None) -> (store, session id): an app store whose default
    model is a tiny random Llama (registered as TINY_SPEC), one session attached to it and, if given,
    its calibration set to (samples, seq_len)."""
    from workbench.store import Store

    def make(layers: int = 4, calibration: tuple[int, int] | None = None):
        store = Store(default_model=TINY_SPEC, device="cpu")
        store.register_model(tiny_lm("llama", layers=layers), TINY_SPEC)
        sid = store.new_session()
        store.attach(sid)
        if calibration is not None:
            store.set_calibration(sid, *calibration)
        return store, sid

    return make


@pytest.fixture
def store_sid(tiny_store):
    """A tiny store and its attached session (four blocks, the default calibration)."""
    return tiny_store()


@pytest.fixture
def store(store_sid):
    return store_sid[0]


@pytest.fixture
def sid(store_sid):
    return store_sid[1]


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from workbench.engine.errors import ModelLoadError
    from workbench.engine.loading import load_model

    try:
        return load_model("default", device="cpu")
    except ModelLoadError as e:  # not installed: the README's set-up installs it
        pytest.skip(f"default model unavailable: {e}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
