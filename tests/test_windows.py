"""The one window builder: BOS where the tokenizer adds it by default, never scored; old recipes replay
with their old (BOS-less) windows."""

from __future__ import annotations

import pytest
import torch

from conftest import ByteTokenizer
from workbench.engine import data
from workbench.engine.data import Calibration, bos_id, calibration_ids, evaluation_ids
from workbench.engine.errors import RecipeError
from workbench.engine.recipe import RECIPE_VERSION, OpContext, Recipe

BOS = 1


class BosTokenizer(ByteTokenizer):
    """Byte tokens, and a BOS (id 1, a control byte no text here contains) added by default, as Gemma's does."""

    bos_token_id = BOS

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


class BosButNotAdded(ByteTokenizer):
    bos_token_id = BOS  # has one, never adds it (SmolLM2's GGUF tokenizer is like this)


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(f"Paragraph {i}: " + "words and more words, " * 6 for i in range(60)))
    return str(f)


def _stream(text):
    return torch.tensor(list(text.encode("utf-8")))


def test_bos_is_detected_only_where_the_tokenizer_adds_it():
    assert bos_id(BosTokenizer()) == BOS
    assert bos_id(ByteTokenizer()) is None and bos_id(BosButNotAdded()) is None


def test_evaluation_windows_open_with_bos_and_tile_the_text_in_order(corpus):
    held = _stream(data.split_texts(corpus)[1])
    ids = evaluation_ids(BosTokenizer(), corpus, seq_len=16)
    assert ids.shape[1] == 16 and (ids[:, 0] == BOS).all() and not (ids[:, 1:] == BOS).any()
    # the text parts, concatenated, are the evaluation stream from its start: no token lost or repeated
    body = ids[:, 1:].reshape(-1)
    assert torch.equal(body, held[: body.numel()]) and held.numel() - body.numel() < 15
    # a tokenizer without a default BOS keeps the old chunking: seq_len text tokens per window
    old = evaluation_ids(ByteTokenizer(), corpus, seq_len=16)
    assert torch.equal(old.reshape(-1), held[: old.numel()])
    assert torch.equal(evaluation_ids(BosTokenizer(), corpus, seq_len=16, bos=False), old)


def test_calibration_windows_are_bos_plus_a_contiguous_slice(corpus):
    calib_text = _stream(data.split_texts(corpus)[0])
    c = Calibration(source=corpus, samples=5, seq_len=24, seed=3)
    ids = calibration_ids(BosTokenizer(), c)
    assert ids.shape == (5, 24) and (ids[:, 0] == BOS).all()
    g = torch.Generator().manual_seed(3)  # by hand: the same seeded starts over a 23-token body
    starts = torch.randint(0, calib_text.numel() - 23, (5,), generator=g).tolist()
    for row, s in zip(ids, starts):
        assert torch.equal(row[1:], calib_text[s : s + 23])


def test_bos_position_is_never_scored(tiny_lm, corpus):
    from workbench.engine import evaluate as ev
    from workbench.engine.variant import original_variant

    lm = tiny_lm("llama", layers=2)
    lm.tokenizer = BosTokenizer()
    full = ev.full_eval(lm, original_variant(2), source=corpus, seq_len=32, max_tokens=300)
    ids = evaluation_ids(lm.tokenizer, corpus, 32, 300)
    assert full["tokens"] == ids.shape[0] * 31  # every text token of each window, never the BOS
    with torch.no_grad():  # by hand: the mean NLL of the text tokens given everything before them
        logp = torch.log_softmax(lm.model(input_ids=ids).logits.double(), -1)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert full["ppl"] == pytest.approx(float(torch.exp(torch.tensor(nll))), rel=1e-5)


def test_version_1_recipes_replay_their_old_windows(tiny_lm, corpus):
    lm = tiny_lm("llama", layers=2)
    lm.tokenizer = BosTokenizer()
    cal = {"source": corpus, "samples": 3, "seq_len": 20, "seed": 1}
    old = Recipe.from_dict({"recipe_version": 1, "calibration": cal, "steps": []})
    unversioned = Recipe.from_dict({"calibration": cal, "steps": []})
    new = Recipe.from_dict({"recipe_version": RECIPE_VERSION, "calibration": cal, "steps": []})
    assert old.calibration.bos is False and unversioned.calibration.bos is False and new.calibration.bos is True
    old_ids = OpContext(lm=lm, calibration=old.calibration).calib_ids()
    # version-1 windows by hand: seq_len text tokens from the seeded starts, no BOS
    text = _stream(data.split_texts(corpus)[0])
    starts = torch.randint(0, text.numel() - 20, (3,), generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.equal(old_ids, torch.stack([text[s : s + 20] for s in starts]))
    assert (OpContext(lm=lm, calibration=new.calibration).calib_ids()[:, 0] == BOS).all()
    # a written recipe says its version and its windows, and reads back the same
    again = Recipe.from_dict(old.to_dict())
    assert old.to_dict()["recipe_version"] == RECIPE_VERSION and again.calibration.bos is False
    with pytest.raises(RecipeError, match="newer"):
        Recipe.from_dict({"recipe_version": RECIPE_VERSION + 1})
    with pytest.raises(RecipeError, match="bos"):
        Recipe.from_dict({"recipe_version": 2, "calibration": {"bos": "yes"}})
