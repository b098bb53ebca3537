"""Calibration and evaluation text, with disjoint splits.

The offline default corpus is the Lee news corpus (Australian Broadcasting Corporation news articles,
Lee, Pincombe & Welsh 2005) as shipped inside the `gensim` package's test data, which the set-up
installs with `--no-deps` (we read the files, we never import gensim):
- calibration: `lee_background.cor` (300 articles);
- evaluation: `lee.cor` (50 other articles), held out.
A person's own text file is split at a paragraph boundary: the first 80 % calibrates, the rest evaluates.
`hf:<dataset id>[:<file>]` reads a text file from a hub dataset repository when online.

Windows (`windows`, the one builder every job uses: quick set, full evaluation, scans, GPTQ Hessians,
Wanda statistics, fusion data) follow the model's own convention: where its tokenizer adds a BOS token by
default (Gemma, Llama 3), every window starts with BOS followed by seq_len - 1 text tokens, so the model
sees its inputs as it does in use; BOS is only ever context, never a scored target. Where the tokenizer
adds none (SmolLM2, GPT-2) a window is seq_len text tokens, as before.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import DataError

DEFAULT_SOURCE = "default"
QUICK_SAMPLES = 2
QUICK_SEQ_LEN = 128


@dataclass(frozen=True)
class Calibration:
    """Which text calibrates, and how much of it: `samples` windows of `seq_len` tokens, from `seed`.

    `bos`: start each window with the tokenizer's BOS where it adds one by default (recipes of version 1
    were made without, and replay with bos false)."""

    source: str = DEFAULT_SOURCE
    samples: int = 8
    seq_len: int = 128
    seed: int = 0
    bos: bool = True

    def __post_init__(self):
        for name in ("samples", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"calibration.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.seed, int):
            raise DataError(f"calibration.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.bos, bool):
            raise DataError(f"calibration.bos must be true or false, got {self.bos!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        d = dict(d or {})
        unknown = set(d) - {"source", "samples", "seq_len", "seed", "bos"}
        if unknown:
            raise DataError(f"unknown calibration field(s): {sorted(unknown)}")
        return cls(**d)


def _lee_folder() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the default corpus is not installed: run `pip install --no-deps gensim` "
            "(the README's set-up command does), or pass your own --text FILE"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not (folder / "lee_background.cor").is_file():
        raise DataError(f"the Lee corpus files are missing from {folder}")
    return folder


def _articles(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


@lru_cache(maxsize=8)
def split_texts(source: str = DEFAULT_SOURCE) -> tuple[str, str]:
    """(calibration text, evaluation text) for a source; the two never share an article/paragraph."""
    if source == DEFAULT_SOURCE:
        folder = _lee_folder()
        calib = _articles(folder / "lee_background.cor")
        held = set(calib)
        evals = [a for a in _articles(folder / "lee.cor") if a not in held]
        return "\n\n".join(calib), "\n\n".join(evals)
    if source.startswith("hf:"):
        return _split_paragraphs(_hub_text(source[3:]), source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    return _split_paragraphs(text, str(path))


def _split_paragraphs(text: str, where: str) -> tuple[str, str]:
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if len(paras) < 2:  # one block of text: split on lines instead
        paras = [p.strip() for p in text.splitlines() if p.strip()]
    if len(paras) < 2:
        raise DataError(f"{where} is too short to split into calibration and evaluation text")
    cut = max(1, int(len(paras) * 0.8))
    return "\n\n".join(paras[:cut]), "\n\n".join(paras[cut:])


def _hub_text(ref: str) -> str:
    repo, _, filename = ref.partition(":")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        if not filename:
            files = [f for f in list_repo_files(repo, repo_type="dataset") if f.endswith((".txt", ".md"))]
            if not files:
                raise DataError(f"hub dataset {repo} has no .txt file; name one as hf:{repo}:FILE")
            filename = files[0]
        local = hf_hub_download(repo, filename, repo_type="dataset")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not fetch hub dataset '{ref}' (offline?): {type(e).__name__}: {e}") from e
    return Path(local).read_text(encoding="utf-8", errors="replace")


def _token_stream(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids.long()


@lru_cache(maxsize=16)
def _cached_stream(tokenizer, source: str, part: int) -> torch.Tensor:
    return _token_stream(tokenizer, split_texts(source)[part])


@lru_cache(maxsize=16)
def bos_id(tokenizer) -> int | None:
    """The BOS token id where the tokenizer adds it by default (Gemma, Llama 3), else None (SmolLM2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
        special = tokenizer("Hello")["input_ids"]
    except Exception:  # a tokenizer that cannot say: take it as adding nothing
        return None
    if special and special[0] == bos and (not plain or plain[0] != bos):
        return int(bos)
    return None


def windows(stream: torch.Tensor, starts: list[int], seq_len: int, bos: int | None) -> torch.Tensor:
    """(len(starts), seq_len) windows of a token stream; with a BOS id each is BOS + seq_len - 1 tokens."""
    body = seq_len - (bos is not None)
    rows = [stream[s : s + body] for s in starts]
    if bos is not None:
        rows = [torch.cat([torch.tensor([bos], dtype=stream.dtype), r]) for r in rows]
    return torch.stack(rows)


def _bos_for(tokenizer, use: bool) -> int | None:
    return bos_id(tokenizer) if use else None


def calibration_ids(tokenizer, calib: Calibration) -> torch.Tensor:
    """(samples, seq_len) random windows of the calibration split, reproducible from the seed."""
    stream = _cached_stream(tokenizer, calib.source, 0)
    if stream.numel() < calib.seq_len + 1:
        raise DataError(f"calibration text has {stream.numel()} tokens, fewer than seq_len={calib.seq_len}")
    bos = _bos_for(tokenizer, calib.bos)
    body = calib.seq_len - (bos is not None)
    g = torch.Generator().manual_seed(calib.seed)
    starts = torch.randint(0, stream.numel() - body, (calib.samples,), generator=g)
    return windows(stream, starts.tolist(), calib.seq_len, bos)


def calibration_ids_on(lm, calib: Calibration) -> torch.Tensor:
    """`calibration_ids` for a loaded model, on the device its forwards start on."""
    return calibration_ids(lm.tokenizer, calib).to(lm.device)


def evaluation_ids(tokenizer, source: str = DEFAULT_SOURCE, seq_len: int = 256, max_tokens: int | None = None,
                   bos: bool = True) -> torch.Tensor:
    """(n, seq_len) contiguous, non-overlapping chunks of the evaluation split (up to max_tokens of text),
    each opened by BOS where the tokenizer adds one (then each chunk holds seq_len - 1 text tokens)."""
    if seq_len < 2:
        raise DataError("seq_len must be at least 2")
    stream = _cached_stream(tokenizer, source, 1)
    bos_tok = _bos_for(tokenizer, bos)
    body = seq_len - (bos_tok is not None)
    if max_tokens is not None:
        stream = stream[: max(max_tokens, body)]
    n = stream.numel() // body
    if n == 0:
        raise DataError(f"evaluation text has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    return windows(stream, [i * body for i in range(n)], seq_len, bos_tok)


def quick_ids(tokenizer, source: str = DEFAULT_SOURCE) -> torch.Tensor:
    """The fixed quick set: the first QUICK_SAMPLES windows of QUICK_SEQ_LEN tokens of the evaluation split."""
    return evaluation_ids(tokenizer, source, QUICK_SEQ_LEN, QUICK_SAMPLES * QUICK_SEQ_LEN)[:QUICK_SAMPLES]
