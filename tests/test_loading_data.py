"""Loading guards and the calibration/evaluation data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import ByteTokenizer
from workbench.engine import data, loading
from workbench.engine.errors import DataError, ModelLoadError


def test_default_corpus_splits_are_disjoint_real_prose():
    calib, evals = data.split_texts("default")
    ca = set(calib.split("\n\n"))
    ea = set(evals.split("\n\n"))
    assert len(ca) >= 250 and len(ea) >= 40 and not (ca & ea)
    assert len(evals.split()) > 3000  # a few thousand words of held-out news text


def test_user_text_file_split_and_windows(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"Paragraph {i} " + "word " * 50 for i in range(10)))
    calib, evals = data.split_texts(str(f))
    assert calib.count("Paragraph") == 8 and evals.count("Paragraph") == 2
    tok = ByteTokenizer()
    c = data.Calibration(source=str(f), samples=3, seq_len=16, seed=5)
    a, b = data.calibration_ids(tok, c), data.calibration_ids(tok, c)
    assert a.shape == (3, 16) and torch.equal(a, b)
    e = data.evaluation_ids(tok, str(f), seq_len=32)
    assert e.shape[1] == 32 and e.shape[0] == len(evals.encode()) // 32
    with pytest.raises(DataError, match="no such text file"):
        data.split_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="positive integer"):
        data.Calibration(samples=-1)
