"""A 2-D map of blocks and of heads (UMAP, McInnes et al. 2018, arXiv 1802.03426; umap-learn).

Blocks are described by how they change the hidden states on calibration data: the mean and spread of
the relative update ||y - x|| / ||x||, the mean and spread of 1 - cos(x, y) (block influence), and the
cosine similarity of the block's mean update direction with every other kept block's. Heads are
described by attention-pattern statistics (mass on the first token, on delimiters, on itself, on the
previous token; normalised entropy; mean attention distance). Features are z-scored per column.

UMAP needs neighbours: below MIN_UMAP_POINTS (15) points its layout is unstable, so PCA is used instead
and the result says so. umap-learn compiles its numba kernels on first use (tens of seconds on a small
CPU); we switch on numba's on-disk cache for them so later processes load them in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings

import numpy as np
import torch

from ..errors import WorkbenchError
from ..loading import LoadedModel
from ..variant import Variant
from .outliers import calibration_pass

log = logging.getLogger(__name__)

MIN_UMAP_POINTS = 15
BLOCK_SCALARS = ("update_rel_mean", "update_rel_std", "bi_mean", "bi_std")
HEAD_FEATURES = ("first", "delim", "self", "prev", "entropy", "distance")


# ---- features ---------------------------------------------------------------------------------------
def block_features(io: dict, blocks: list[int]) -> tuple[np.ndarray, dict]:
    """(n, 4 + n) features of the kept blocks from their summed update statistics, and the scalars."""
    scal = {k: [] for k in BLOCK_SCALARS}
    dirs = []
    for i in blocks:
        s = io[i]
        n = float(s["n"])
        for key, name in (("rel", "update_rel"), ("bi", "bi")):
            m = float(s[key]) / n
            var = max(float(s[key + "2"]) / n - m * m, 0.0)
            scal[f"{name}_mean"].append(m)
            scal[f"{name}_std"].append(math.sqrt(var))
        dirs.append(s["u_sum"] / n)
    d = torch.stack(dirs).double()
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (d @ d.T).numpy()  # (n, n) similarity of mean update directions
    scal_m = np.array([scal[k] for k in BLOCK_SCALARS]).T  # (n, 4)
    return np.concatenate([zscore(scal_m), cos], axis=1), {**scal, "direction_cosine": cos.tolist()}


def head_features(heads: dict, blocks: list[int]) -> tuple[np.ndarray, list[tuple[int, int]], dict]:
    """(n_heads, 6) mean pattern statistics per (original block, head), z-scored, and the raw values."""
    rows, labels = [], []
    for i in blocks:
        s = heads[i]
        cnt = max(s["first_count"], 1)
        cols = [
            s["first_sum"] / cnt,
            s["delim_sum"] / s["delim_count"] if s["delim_count"] else torch.zeros_like(s["first_sum"]),
            s["self_sum"] / cnt,
            s["prev_sum"] / cnt,
            s["entropy_sum"] / cnt,
            s["distance_sum"] / cnt,
        ]
        m = torch.stack(cols, dim=1).cpu().numpy()  # (H, 6)
        for h in range(m.shape[0]):
            rows.append(m[h])
            labels.append((i, h))
    raw = np.stack(rows)
    return zscore(raw), labels, {name: raw[:, j].tolist() for j, name in enumerate(HEAD_FEATURES)}


def zscore(x: np.ndarray) -> np.ndarray:
    """Column-wise (x - mean) / std; constant columns become 0."""
    mu = x.mean(0, keepdims=True)
    sd = x.std(0, keepdims=True)
    return np.where(sd > 1e-12, (x - mu) / np.where(sd > 1e-12, sd, 1.0), 0.0)


# ---- 2-D embedding ----------------------------------------------------------------------------------
def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection on the first two principal components (zero-padded when fewer exist)."""
    c = x - x.mean(0, keepdims=True)
    if c.shape[0] < 2:
        return np.zeros((c.shape[0], 2))
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    out = u[:, :2] * s[:2]
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


@functools.lru_cache(maxsize=1)
def _umap_module():
    """Import umap-learn and turn on numba's disk cache for its kernels (compiled once per machine)."""
    import umap
    import umap.layouts
    import umap.umap_
    import umap.utils

    try:
        from numba.core.registry import CPUDispatcher
    except ImportError:  # numba moved its registry: kernels compile in every process, still correct
        return umap
    for mod in (umap.umap_, umap.utils, umap.layouts):
        for name in dir(mod):
            fn = getattr(mod, name)
            if isinstance(fn, CPUDispatcher) and type(fn._cache).__name__ != "FunctionCache":
                try:
                    fn.enable_caching()
                except Exception as e:  # no writable cache location: compile in each process
                    log.debug("numba cache not enabled for %s: %s", name, e)
    return umap


@contextlib.contextmanager
def _restore_torch_threads(n: int):
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def embed_2d(features: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> dict:
    """{"xy": (n, 2) list, "method": "umap" | "pca", "reason": why PCA (or None)}."""
    n = features.shape[0]
    if n < MIN_UMAP_POINTS:
        return {
            "xy": pca_2d(features).tolist(),
            "method": "pca",
            "reason": f"only {n} points: UMAP is unstable below {MIN_UMAP_POINTS}, so PCA is shown",
        }
    umap = _umap_module()
    k = max(2, min(n_neighbors, n - 1))
    threads = torch.get_num_threads()  # numba's parallel kernels reset the OpenMP thread count torch uses
    with _restore_torch_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state, spectral init fallbacks
        try:
            xy = umap.UMAP(n_neighbors=k, min_dist=min_dist, random_state=seed, init="spectral").fit_transform(features)
        except (ValueError, np.linalg.LinAlgError):  # spectral init can fail on degenerate graphs
            xy = umap.UMAP(n_neighbors=k, min_dist=min_dist, random_state=seed, init="random").fit_transform(features)
    return {"xy": np.asarray(xy, dtype=float).tolist(), "method": "umap", "reason": None, "n_neighbors": k}


def warm_up() -> None:
    """Compile (or load from cache) umap-learn's kernels, e.g. in a background thread at app start."""
    embed_2d(np.random.default_rng(0).normal(size=(MIN_UMAP_POINTS + 5, 4)))


# ---- the analysis -----------------------------------------------------------------------------------
def analyze_map(
    lm: LoadedModel,
    variant: Variant,
    ids: torch.Tensor,
    seed: int = 0,
    progress=None,
    cancel=None,
) -> dict:
    """Maps of the variant's kept blocks and of all their heads, from one eager calibration pass.

    Blocks are coloured by block influence (mean 1 - cos) and heads by the first-token no-op score by
    default; all raw features travel with the result so a panel may colour by any of them."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise WorkbenchError("the map needs calibration ids of shape (samples, tokens >= 2)")
    sub = (lambda f, m: progress(0.8 * f, m)) if progress else None
    res = calibration_pass(lm, variant, ids, modules=False, attention=True, block_io=True, progress=sub, cancel=cancel)
    blocks = res["blocks"]
    bx, braw = block_features(res["io"], blocks)
    if progress:
        progress(0.82, f"embedding {len(blocks)} blocks")
    bmap = embed_2d(bx, seed)
    hx, labels, hraw = head_features(res["heads"], blocks)
    if progress:
        progress(0.9, f"embedding {len(labels)} heads")
    hmap = embed_2d(hx, seed)
    if progress:
        progress(1.0, "map ready")
    return {
        "variant": variant.name,
        "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "blocks": {
            "index": blocks,
            **bmap,
            "features": list(BLOCK_SCALARS) + ["direction_cosine[j]"],
            "values": braw,
            "color": {"name": "block influence (1 - cos)", "values": braw["bi_mean"]},
        },
        "heads": {
            "block": [b for b, _ in labels],
            "head": [h for _, h in labels],
            **hmap,
            "features": list(HEAD_FEATURES),
            "values": hraw,
            "color": {"name": "no-op score (first-token mass)", "values": hraw["first"]},
        },
    }
