"""Weight quantization solvers: round-to-nearest (RTN) and GPTQ. Pure tensors in, tensors out.

GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323) quantizes a linear layer's weight W (out, in) column by
column, minimising the layer objective ||W X - Q X||^2 over calibration inputs X. With the Hessian
H = X X^T / N and its inverse's upper Cholesky factor U, each quantized column's error is spread over
the columns not yet quantized:  err = (w_i - q_i) / U_ii;  W[:, i:] -= err U[i, i:]  (the OBS update in
its Cholesky form), applied lazily in blocks of columns as in the official code (IST-DASLab/gptq).

The quantization grid is the integer grid of that code and of compressed-tensors: per output row and
group of `group_size` input columns, a scale s and an integer zero point z (from the group's min-max
range, or with `observer="mse"` from the shrunk range that best fits the group) with
    q = clamp(round(w / s) + z, 0, 2^bits - 1),   w_hat = s (q - z).
Symmetric grids fix z = 2^(bits-1) (compressed-tensors stores this as zero point 0 on a signed grid).

GGUF-exact schemes (`gguf`: Q4_0, Q5_0, Q8_0, Q4_1, Q5_1; llama.cpp's block formats, group 32): the
same grid with each scale rounded to float16 while solving (GGUF stores d in float16), so the
dequantized weights are exactly what a GGUF reader decodes from the same codes. Q4_0 / Q5_0 / Q8_0 are
symmetric: w_hat = d (q - 2^(bits-1)). Q4_1 / Q5_1 are asymmetric and decode w_hat = d q + m with
m = float16(-d z) (two float32 operations, as ggml's reference dequantizer), and codes are rounded on
that grid: q = clamp(round((w - m) / d), 0, 2^bits - 1).

Activation order (`act_order`, compressed-tensors' meanings):
- None: columns in their natural order; a group's scale is set when its first column is reached (from
  the weights as updated so far).
- "weight" (alias "static"): columns processed by decreasing H_ii, but the groups stay the natural
  contiguous column ranges, their scales fixed from the weights before the solve ("static groups").
  The result has the plain grouped layout: nothing extra is needed at inference.
- "group": columns processed by decreasing H_ii and grouped in that order; `g_idx` maps each column
  to its group. Needs g_idx at inference (compressed-tensors 0.20 no longer exports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACT_ORDERS = (None, "weight", "static", "group")
# GGUF block formats we solve for exactly: name -> (bits, symmetric, bytes per block of 32 weights)
GGUF_SCHEMES = {"Q4_0": (4, True, 18), "Q5_0": (5, True, 22), "Q8_0": (8, True, 34),
                "Q4_1": (4, False, 20), "Q5_1": (5, False, 24)}
GGUF_GROUP = 32
OBSERVERS = ("minmax", "mse")
# The "mse" observer: shrink the min-max range by p = 1 - i / MSE_GRID for i < MSE_MAXSHRINK * MSE_GRID
# (1.00, 0.99, ..., 0.81) and keep, per row, the p whose grid minimises sum |w_hat - w|^MSE_NORM
# (the range search of IST-DASLab/gptq's optional `mse` quantizer and of compressed-tensors' mse observer).
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.2, 2.4


@dataclass(frozen=True)
class Scheme:
    """A weight quantization scheme: bits, group size (-1: one group per row), symmetry, act order."""

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    act_order: str | None = None
    damp: float = 0.01  # dampening, as a fraction of the mean of diag(H)
    block_size: int = 128  # columns per lazy-update block
    observer: str = "minmax"  # how a group's scale and zero point are chosen: min-max range or mse search
    shrink: float = 0.0  # Hessian shrinkage toward its diagonal, alpha in [0, 1] (see prepare_hessian)
    gguf: str | None = None  # a GGUF-exact scheme (Q4_0, ...): fp16 scales, GGUF's decode (see the module doc)

    def __post_init__(self):
        if self.gguf is not None:
            if self.gguf not in GGUF_SCHEMES:
                raise ValueError(f"gguf must be one of {', '.join(GGUF_SCHEMES)}, got {self.gguf!r}")
            bits, sym, _ = GGUF_SCHEMES[self.gguf]
            if (self.bits, self.sym, self.group_size) != (bits, sym, GGUF_GROUP):
                raise ValueError(f"{self.gguf} is {bits}-bit, {'symmetric' if sym else 'asymmetric'}, group 32")
            if self.act_order == "group":
                raise ValueError(f"{self.gguf} has no g_idx: act_order must be none or weight")
        elif self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits!r}")
        if not (self.group_size == -1 or (isinstance(self.group_size, int) and self.group_size > 0)):
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size!r}")
        if self.act_order not in ACT_ORDERS:
            raise ValueError(f"act_order must be one of {ACT_ORDERS}, got {self.act_order!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not 0 <= self.shrink <= 1:
            raise ValueError(f"shrink must be in [0, 1], got {self.shrink!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def offset(self) -> bool:
        """Decoded as d q + m (GGUF's asymmetric formats) rather than s (q - z)."""
        return self.gguf is not None and not self.sym

    def groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else columns // self.group_size

    def check_width(self, columns: int) -> None:
        """Raise ValueError when the group size does not tile `columns` input columns exactly."""
        if self.group_size != -1 and columns % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the input width {columns}")


@dataclass
class QuantResult:
    """One quantized weight.

    weight: (out, in) dequantized, in the input's dtype; codes: (out, in) uint8 in [0, 2^bits - 1], in
    the natural column order; scale: (out, groups) float32; zero: (out, groups) int16 in [0, 2^bits - 1];
    g_idx: (in,) int32, the group of each column; perm: (in,) processing order or None;
    error: the objective tr((W - W_hat) H (W - W_hat)^T) when a Hessian was given, else None.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    scheme: Scheme
    error: float | None = None


# ---- the grid ---------------------------------------------------------------------------------------
def grid_params(x: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype | None = None,
                observer: str = "minmax"):
    """Scale and integer zero point per row of x (rows, k) -> (rows,), (rows,).

    "minmax": the grid spans the row's range. "mse": the range shrunk by the factor (1.00 down to 0.81)
    whose grid gives the row the smallest sum |w_hat - w|^2.4 (the min-max grid is the first candidate,
    so the search never does worse on that measure). The range always contains 0 (as in IST-DASLab/gptq
    and compressed-tensors), so z lies in [0, 2^bits - 1]. The scale is rounded to `scale_dtype` (the
    dtype it will be stored in), so the dequantized weights here equal what a reader of the stored scale
    computes.
    """
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if observer == "minmax":
        return _range_params(xmin, xmax, bits, sym, scale_dtype, x.dtype)
    if observer != "mse":
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    maxq = 2**bits - 1
    best = None
    buf = torch.empty_like(x)
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1.0 - i / MSE_GRID
        scale, zero = _range_params(xmin * p, xmax * p, bits, sym, scale_dtype, x.dtype)
        s, z = scale[:, None], zero[:, None]
        # |s (clamp(round(x / s) + z, 0, maxq) - z) - x|^norm, in place (the search's whole cost)
        torch.div(x, s, out=buf)
        buf.round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s).sub_(x).abs_().pow_(MSE_NORM)
        err = buf.sum(1)
        if best is None:
            best, best_scale, best_zero = err, scale, zero
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _range_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, scale_dtype, dtype):
    """The grid of the range [xmin, xmax] (per row, xmin <= 0 <= xmax) -> scale, zero point."""
    maxq = 2**bits - 1
    if sym:
        amax = torch.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any scale will do
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if scale_dtype is not None:
        if scale_dtype == torch.float16:  # GGUF's d: never rounded to 0 (2^-24 is float16's least)
            scale = scale.clamp(min=2.0**-24)
        scale = scale.to(scale_dtype).to(dtype)
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def gguf_offset(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """GGUF's m of the asymmetric formats: float16(-d z), as float32."""
    return (-(scale.float() * zero.float())).to(torch.float16).float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                   offset: bool = False) -> torch.Tensor:
    """Integer codes (as floats) of w on the grid; w, scale, zero broadcast together. `offset`: the grid
    d q + m of GGUF's asymmetric formats."""
    if offset:
        return torch.clamp(torch.round((w - gguf_offset(scale, zero)) / scale), 0, maxq)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: bool = False) -> torch.Tensor:
    """w_hat of codes on the grid (broadcasting): s (q - z), or d q + m (`offset`, two float32 roundings
    as in ggml's dequantizer)."""
    if offset:
        return torch.add(torch.mul(scale, codes), gguf_offset(scale, zero))
    return scale * (codes - zero)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor,
               offset: bool = False) -> torch.Tensor:
    """codes (out, in), scale/zero (out, groups), g_idx (in,) -> w_hat (out, in) float32."""
    s = scale[:, g_idx.long()].float()  # (out, in)
    z = zero[:, g_idx.long()].float()
    return decode(codes.float(), s, z, offset)


def objective(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer objective tr(D H D^T), D = W - W_hat: with H = X X^T / N, the mean over calibration
    tokens of the squared output error ||D x||^2 summed over output channels."""
    dt = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    d = weight.to(dt) - w_hat.to(dt)
    return float(((d @ hessian.to(dt)) * d).sum(dtype=torch.float64))


def _natural_g_idx(columns: int, scheme: Scheme, device) -> torch.Tensor:
    if scheme.group_size == -1:
        return torch.zeros(columns, dtype=torch.int32, device=device)
    return (torch.arange(columns, device=device) // scheme.group_size).to(torch.int32)


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _scale_dtype(w: torch.Tensor, scale_dtype, scheme: Scheme | None = None):
    if scheme is not None and scheme.gguf is not None:
        return torch.float16  # GGUF stores d (and m) in float16
    return scale_dtype if scale_dtype is not None else (w.dtype if w.is_floating_point() else torch.float32)


# ---- round to nearest -------------------------------------------------------------------------------
@torch.no_grad()
def rtn(weight: torch.Tensor, scheme: Scheme, hessian: torch.Tensor | None = None, scale_dtype=None) -> QuantResult:
    """Round-to-nearest on the min-max grid, group by group (no calibration data needed)."""
    rows, cols = weight.shape
    scheme.check_width(cols)
    W = weight.to(_compute_dtype(weight))
    g = cols if scheme.group_size == -1 else scheme.group_size
    ng = cols // g
    Wg = W.reshape(rows, ng, g)  # (out, groups, g)
    scale, zero = grid_params(Wg.reshape(rows * ng, g), scheme.bits, scheme.sym,
                              _scale_dtype(weight, scale_dtype, scheme), scheme.observer)
    scale, zero = scale.view(rows, ng), zero.view(rows, ng)
    codes = quantize_codes(Wg, scale[..., None], zero[..., None], scheme.maxq, scheme.offset).reshape(rows, cols)
    return _result(weight, codes, scale, zero, _natural_g_idx(cols, scheme, weight.device), None, scheme, hessian)


def _result(weight, codes, scale, zero, g_idx, perm, scheme, hessian) -> QuantResult:
    w_hat = dequantize(codes, scale, zero, g_idx, scheme.offset)
    w_hat = w_hat.to(_compute_dtype(weight)) if weight.dtype == torch.float64 else w_hat
    err = objective(weight, w_hat, hessian) if hessian is not None else None
    return QuantResult(
        weight=w_hat.to(weight.dtype),
        codes=codes.to(torch.uint8),
        scale=scale.float(),
        zero=zero.to(torch.int16),
        g_idx=g_idx.to(torch.int32),
        perm=perm,
        scheme=scheme,
        error=err,
    )


# ---- GPTQ -------------------------------------------------------------------------------------------
def prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor, damp: float, shrink: float = 0.0):
    """Dead columns (H_ii = 0: the input never fires) get H_ii = 1 and a zero weight column; the
    off-diagonal part is scaled by (1 - shrink), i.e. H <- (1 - shrink) H + shrink diag(H); then
    H += damp * mean(diag H) * I. Returns (W copy, dampened H copy, dead mask).

    The shrinkage is ours (not in the GPTQ paper or its reference code): H estimated from a small
    calibration set (the default 1,024 tokens against 576-1,536 input features) is noisy off its
    diagonal, and GPTQ then fits that noise; shrinking toward the diagonal (the covariance shrinkage
    of Ledoit & Wolf / Schafer & Strimmer, target diag) trades some of the fit for stability. shrink = 1
    leaves a diagonal H, under which GPTQ propagates no error: it is RTN."""
    dt = _compute_dtype(weight)
    W = weight.to(dt).clone()
    H = hessian.to(dt).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    idx = torch.arange(H.shape[0], device=H.device)
    if shrink:
        diag = torch.diag(H).clone()
        H.mul_(1.0 - shrink)
        H[idx, idx] = diag
    H[idx, idx] += damp * torch.mean(torch.diag(H))
    return W, H, dead


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1. A non-positive-definite H (too few tokens, no dampening) gets
    its dampening raised tenfold until it factors."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    extra = 0.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = max(extra * 10, 1e-6 * float(torch.mean(torch.diag(H))))
    raise torch.linalg.LinAlgError("the Hessian is not positive definite even after extra dampening")


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, scale_dtype=None, grid=None) -> QuantResult:
    """GPTQ on weight (out, in) with Hessian (in, in) = X X^T / N of the layer's calibration inputs.

    The objective (`error`) is measured against the given, undampened Hessian and the original weight.
    `grid`: (scale, zero) (out, groups) already computed for this very weight and scheme (RTN's, which
    the quantize step computes anyway): static groups take it instead of searching again, unless a
    dead column (zeroed here first) could change a group's range.
    """
    rows, cols = weight.shape
    scheme.check_width(cols)
    sdt = _scale_dtype(weight, scale_dtype, scheme)
    maxq = scheme.maxq
    off = scheme.offset
    W, H, dead = prepare_hessian(weight, hessian, scheme.damp, scheme.shrink)
    dev = W.device
    g = cols if scheme.group_size == -1 else scheme.group_size
    ng = cols // g
    act = {"static": "weight"}.get(scheme.act_order, scheme.act_order)
    static_groups = act == "weight" or scheme.group_size == -1

    scale = torch.zeros(rows, ng, dtype=W.dtype, device=dev)
    zero = torch.zeros(rows, ng, dtype=W.dtype, device=dev)
    if static_groups:  # groups fixed from the (dead-zeroed) weights before any update, all in one call
        if grid is not None and not bool(dead.any()):
            scale, zero = (t.to(device=dev, dtype=W.dtype).reshape(rows, ng).clone() for t in grid)
        else:
            s_, z_ = grid_params(W.reshape(rows * ng, g), scheme.bits, scheme.sym, sdt, scheme.observer)
            scale, zero = s_.view(rows, ng).clone(), z_.view(rows, ng).clone()

    perm = None
    if act is not None:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # Group of each processed position j: natural column perm[j]'s group (static), or j // g (group).
    col = perm if perm is not None else torch.arange(cols, device=dev)
    if act == "group":
        group_of_pos = torch.arange(cols, device=dev) // g
    else:
        group_of_pos = col // g if scheme.group_size != -1 else torch.zeros_like(col)
    group_of_pos_list = group_of_pos.tolist()

    U = _inverse_cholesky(H)
    Q = torch.zeros_like(W)  # codes, processing order
    # Lazy blocks are whole groups, so a group's first column always falls inside the current block.
    bs = max(scheme.block_size, g) if scheme.group_size != -1 else scheme.block_size
    if scheme.group_size != -1:
        bs = (bs // g) * g
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            k = group_of_pos_list[j]
            if not static_groups and j % g == 0:  # a new group begins: its grid from the current weights
                scale[:, k], zero[:, k] = grid_params(W1[:, i : i + g], scheme.bits, scheme.sym, sdt,
                                                      scheme.observer)
            w = W1[:, i]
            q = quantize_codes(w, scale[:, k], zero[:, k], maxq, off)
            Q[:, j] = q
            err = (w - decode(q, scale[:, k], zero[:, k], off)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # (out, 1) x (1, rest)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy update of every later column

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        g_idx = group_of_pos[inv].to(torch.int32)
    else:
        g_idx = _natural_g_idx(cols, scheme, dev)
    return _result(weight, Q, scale, zero, g_idx, perm, scheme, hessian)


def packed_nbytes(rows: int, cols: int, scheme: Scheme, scale_bytes: int = 2, with_g_idx: bool | None = None) -> int:
    """Bytes of a packed quantized weight: codes at `bits` per weight, one scale per row and group,
    zero points at `bits` each when asymmetric, g_idx (int32 per column) for act_order 'group'; a GGUF
    scheme: its blocks' bytes (d, m and the codes per 32 weights)."""
    if scheme.gguf is not None:
        return rows * cols // GGUF_GROUP * GGUF_SCHEMES[scheme.gguf][2]
    ng = scheme.groups(cols)
    n = math.ceil(rows * cols * scheme.bits / 8) + rows * ng * scale_bytes
    if not scheme.sym:
        n += math.ceil(rows * ng * scheme.bits / 8)
    if with_g_idx if with_g_idx is not None else scheme.act_order == "group":
        n += cols * 4
    return n
