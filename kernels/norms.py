"""Fused row-wise norms of the linear mixers in Triton: forward and backward, and the pure-torch definitions.

    l2norm(x)                       y = x * rsqrt(sum(x^2) + eps)                          over the last dim
    gated_rmsnorm(x, weight, gate)  y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate)   over the last dim

Both compute in fp32 and return x's dtype. The torch versions (`torch_l2norm`, `torch_gated_rmsnorm`) are the
definitions: the same expressions as `delta_rule.naive.l2norm` and `modules.gated_norm.GatedRMSNorm`, kept here so
that the delta-rule kernels can import this module without a cycle. Inputs are read through an [M, R, D] view with
strides (s_m, s_r, 1), so a head-split slice of a larger projection (`proj[..., :H * D].view(B, T, H, D)`) is read in
place; anything that has no such view is copied first. The L2 norm's backward reads its saved output and the fp32
rstd [M, R]; the gated norm's recomputes the normalised row from the saved input and rstd, and reduces the weight
gradient deterministically (per-program fp32 partial sums, then one torch sum).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from linear_moe.kernels.common import sm_count, use_triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# tests set this to poison every torch.empty buffer with NaN, so an unwritten element cannot pass unnoticed
DEBUG_POISON = os.environ.get("LINEAR_MOE_POISON", "0") == "1"

L2NORM_EPS = 1e-6
"""The L2 norm's default eps (added to the sum of squares), also used where the norm is fused into the conv."""

# Launch settings. tile: elements of one [BM, BD] tile (rows per tile BM = max(1, tile // BD)); warps: num_warps;
# bwd_programs_per_sm: programs per SM in the gated backward (each loops over row tiles, so the weight-gradient
# partial buffer stays small; on CPU, `sm_count` counts one SM). Tests shrink these to force loops.
LAUNCH: dict[str, int] = {"tile": 2048, "warps": 4, "bwd_programs_per_sm": 8}

MAX_D = 1024
"""Largest last dim of the Triton path (one row lives in one tile)."""


def _empty(*shape, dtype, device):
    x = torch.empty(*shape, dtype=dtype, device=device)
    if DEBUG_POISON:
        x.fill_(float("nan"))
    return x


def _as_rows(x: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """x [..., D] as an [M, R, D] view with unit last-dim stride, trying each R in `rows`; a contiguous copy if none
    of them gives a view (e.g. a strided last dim)."""
    D = x.shape[-1]
    if x.stride(-1) == 1 or D == 1:
        for R in rows:
            try:
                return x.view(-1, R, D)
            except RuntimeError:
                pass
    return x.contiguous().view(-1, rows[-1], D)


def _bm(D: int) -> tuple[int, int]:
    BD = triton.next_power_of_2(D)
    return max(1, LAUNCH["tile"] // BD), BD


def _check_float(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype={t.dtype} must be one of float32, float16, bfloat16")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_triton_dim(D: int) -> None:
    if D > MAX_D:
        raise ValueError(f"last dim D={D} is above the Triton path's limit of {MAX_D}; use backend='torch'")


@triton.jit
def _rows(base, i_m, i_r, M, s_m, s_r, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask of a [BM, BD] tile: rows i_m * BM ... of slot i_r in an [M, R, D] view, strides (s_m, s_r, 1)."""
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    p = base + (o_m[:, None].to(tl.int64) * s_m + i_r.to(tl.int64) * s_r) + o_d[None, :]
    return p, (o_m[:, None] < M) & (o_d[None, :] < D)


@triton.jit
def l2norm_fwd_kernel(
    x, y, rstd, M, R, sx_m, sx_r, eps,
    D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    i_m, i_r = tl.program_id(0), tl.program_id(1)
    p_x, m_x = _rows(x, i_m, i_r, M, sx_m, sx_r, D, BM, BD)
    p_y, _ = _rows(y, i_m, i_r, M, R * D, D, D, BM, BD)
    b_x = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) + eps)
    tl.store(p_y, (b_x * b_r[:, None]).to(p_y.dtype.element_ty), mask=m_x)
    o_m = i_m * BM + tl.arange(0, BM)
    tl.store(rstd + o_m.to(tl.int64) * R + i_r, b_r, mask=o_m < M)


@triton.jit
def l2norm_bwd_kernel(
    y, rstd, dy, dx, M, R,
    D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    """dx = (dy - y * sum(dy * y)) * rstd from the saved output y; y, dy and dx are contiguous [M, R, D]."""
    i_m, i_r = tl.program_id(0), tl.program_id(1)
    p_y, m_y = _rows(y, i_m, i_r, M, R * D, D, D, BM, BD)
    p_dy, _ = _rows(dy, i_m, i_r, M, R * D, D, D, BM, BD)
    p_dx, _ = _rows(dx, i_m, i_r, M, R * D, D, D, BM, BD)
    o_m = i_m * BM + tl.arange(0, BM)
    b_r = tl.load(rstd + o_m.to(tl.int64) * R + i_r, mask=o_m < M, other=0.0)
    b_y = tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
    b_dy = tl.load(p_dy, mask=m_y, other=0.0).to(tl.float32)
    b_dx = (b_dy - b_y * tl.sum(b_dy * b_y, 1)[:, None]) * b_r[:, None]
    tl.store(p_dx, b_dx.to(p_dx.dtype.element_ty), mask=m_y)


@triton.jit
def gated_rmsnorm_fwd_kernel(
    x, w, g, y, rstd, M, R, sx_m, sx_r, sw_r, sg_m, sg_r, eps,
    D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """One [BM, BD] tile of rows of slot i_r; the weight row is i_r's (sw_r = D) or the shared one (sw_r = 0)."""
    i_m, i_r = tl.program_id(0), tl.program_id(1)
    p_x, m_x = _rows(x, i_m, i_r, M, sx_m, sx_r, D, BM, BD)
    p_y, _ = _rows(y, i_m, i_r, M, R * D, D, D, BM, BD)
    o_d = tl.arange(0, BD)
    b_w = tl.load(w + i_r * sw_r + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    b_x = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) / D + eps)
    b_y = b_x * b_r[:, None] * b_w[None, :]
    if HAS_GATE:
        p_g, _ = _rows(g, i_m, i_r, M, sg_m, sg_r, D, BM, BD)
        b_g = tl.load(p_g, mask=m_x, other=0.0).to(tl.float32)
        b_y = b_y * (b_g * tl.sigmoid(b_g))
    tl.store(p_y, b_y.to(p_y.dtype.element_ty), mask=m_x)
    o_m = i_m * BM + tl.arange(0, BM)
    tl.store(rstd + o_m.to(tl.int64) * R + i_r, b_r, mask=o_m < M)


@triton.jit
def gated_rmsnorm_bwd_kernel(
    x, w, g, rstd, dy, dx, dg, dw, M, R, sx_m, sx_r, sw_r, sg_m, sg_r, NP,
    D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """Program (i_p, i_r) takes the row tiles i_p, i_p + NP, ... of slot i_r and writes its weight-gradient partial
    sum to dw[i_p, i_r] (fp32 [NP, R, D]). With n = x * rstd, s = silu(g), dn = dy * w * s:
        dx = (dn - n * mean(dn * n)) * rstd,   dw = sum_rows(dy * n * s),   dg = dy * n * w * silu'(g)."""
    i_p, i_r = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(w + i_r * sw_r + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BD], dtype=tl.float32)
    for i_m in range(i_p, tl.cdiv(M, BM), NP):
        p_x, m_x = _rows(x, i_m, i_r, M, sx_m, sx_r, D, BM, BD)
        p_dy, _ = _rows(dy, i_m, i_r, M, R * D, D, D, BM, BD)
        p_dx, _ = _rows(dx, i_m, i_r, M, R * D, D, D, BM, BD)
        o_m = i_m * BM + tl.arange(0, BM)
        b_r = tl.load(rstd + o_m.to(tl.int64) * R + i_r, mask=o_m < M, other=0.0)
        b_x = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)
        b_dy = tl.load(p_dy, mask=m_x, other=0.0).to(tl.float32)
        b_n = b_x * b_r[:, None]
        if HAS_GATE:
            p_g, _ = _rows(g, i_m, i_r, M, sg_m, sg_r, D, BM, BD)
            p_dg, _ = _rows(dg, i_m, i_r, M, R * D, D, D, BM, BD)
            b_g = tl.load(p_g, mask=m_x, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_g)
            b_s = b_g * b_sig
            b_dg = b_dy * (b_n * b_w[None, :]) * (b_sig * (1.0 + b_g * (1.0 - b_sig)))
            tl.store(p_dg, b_dg.to(p_dg.dtype.element_ty), mask=m_x)
            b_dys = b_dy * b_s
        else:
            b_dys = b_dy
        b_dw += tl.sum(b_dys * b_n, 0)
        b_dn = b_dys * b_w[None, :]
        b_dx = (b_dn - b_n * (tl.sum(b_dn * b_n, 1) / D)[:, None]) * b_r[:, None]
        tl.store(p_dx, b_dx.to(p_dx.dtype.element_ty), mask=m_x)
    tl.store(dw + (i_p.to(tl.int64) * R + i_r) * D + o_d, b_dw, mask=m_d)


def l2norm_fwd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, R, D] (unit last-dim stride) -> y (contiguous, x's dtype), rstd fp32 [M, R]."""
    M, R, D = x.shape
    BM, BD = _bm(D)
    y = _empty(M, R, D, dtype=x.dtype, device=x.device)
    rstd = _empty(M, R, dtype=torch.float32, device=x.device)
    l2norm_fwd_kernel[(triton.cdiv(M, BM), R)](
        x, y, rstd, M, R, x.stride(0), x.stride(1), eps, D=D, BM=BM, BD=BD, num_warps=LAUNCH["warps"],
    )
    return y, rstd


def l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The forward's output y and dy, contiguous [M, R, D] -> dx contiguous [M, R, D] in y's dtype."""
    M, R, D = y.shape
    BM, BD = _bm(D)
    dx = _empty(M, R, D, dtype=y.dtype, device=y.device)
    l2norm_bwd_kernel[(triton.cdiv(M, BM), R)](
        y, rstd, dy, dx, M, R, D=D, BM=BM, BD=BD, num_warps=LAUNCH["warps"],
    )
    return dx


def gated_rmsnorm_fwd(x, weight, gate, eps):
    """x, gate [M, R, D] views; weight [R, D] or [D] contiguous -> y contiguous [M, R, D], rstd fp32 [M, R]."""
    M, R, D = x.shape
    BM, BD = _bm(D)
    y = _empty(M, R, D, dtype=x.dtype, device=x.device)
    rstd = _empty(M, R, dtype=torch.float32, device=x.device)
    sg = (gate.stride(0), gate.stride(1)) if gate is not None else (0, 0)
    gated_rmsnorm_fwd_kernel[(triton.cdiv(M, BM), R)](
        x, weight, gate, y, rstd, M, R, x.stride(0), x.stride(1), D if weight.dim() == 2 else 0, *sg, eps,
        D=D, BM=BM, BD=BD, HAS_GATE=gate is not None, num_warps=LAUNCH["warps"],
    )
    return y, rstd


def gated_rmsnorm_bwd(x, weight, gate, rstd, dy):
    """dy contiguous [M, R, D] -> dx [M, R, D] (x's dtype), dweight (weight's shape and dtype), dgate or None."""
    M, R, D = x.shape
    BM, BD = _bm(D)
    NP = max(1, min(triton.cdiv(M, BM), triton.cdiv(LAUNCH["bwd_programs_per_sm"] * sm_count(x.device), R)))
    dx = _empty(M, R, D, dtype=x.dtype, device=x.device)
    dg = _empty(M, R, D, dtype=gate.dtype, device=x.device) if gate is not None else None
    dw = _empty(NP, R, D, dtype=torch.float32, device=x.device)
    sg = (gate.stride(0), gate.stride(1)) if gate is not None else (0, 0)
    gated_rmsnorm_bwd_kernel[(NP, R)](
        x, weight, gate, rstd, dy, dx, dg, dw, M, R, x.stride(0), x.stride(1), D if weight.dim() == 2 else 0,
        *sg, NP, D=D, BM=BM, BD=BD, HAS_GATE=gate is not None, num_warps=LAUNCH["warps"],
    )
    dw = dw.sum(0) if weight.dim() == 2 else dw.sum((0, 1))
    return dx, dw.to(weight.dtype), dg


class L2NormFunction(torch.autograd.Function):
    """Saves its output (which the recurrence keeps anyway), not its input: the input is usually a view of the conv's
    whole output, which this way is freed after the forward (as fla's L2 norm does; the backward's y is the stored
    16-bit one)."""

    @staticmethod
    def forward(ctx, x, eps):
        y, rstd = l2norm_fwd(x, eps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        return l2norm_bwd(y, rstd, dy.contiguous()), None


class GatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gate, eps):
        y, rstd = gated_rmsnorm_fwd(x, weight, gate, eps)
        ctx.save_for_backward(x, weight, gate, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate, rstd = ctx.saved_tensors
        dx, dw, dg = gated_rmsnorm_bwd(x, weight, gate, rstd, dy.contiguous())
        return dx, dw, dg, None


def torch_l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """L2-normalise the last dim in fp32 (differentiable), back in x's dtype; the definition (the kernels'
    `use_qk_l2norm` and MoM's q, k)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def torch_gated_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate) over the last dim in fp32, back in x's dtype; the definition (GatedRMSNorm's
    CPU path)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if gate is not None:
        y = y * F.silu(gate.float())
    return y.to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS, *, backend: str | None = None) -> torch.Tensor:
    """y = x * rsqrt(sum(x^2) + eps) over the last dim, in fp32, returned contiguous in x's dtype; differentiable.

    Args:
        x: [..., D] fp32/fp16/bf16, any leading dims; may be a strided view (unit last-dim stride is read in place).
        eps: added to the sum of squares (not to the norm).
        backend: None (Triton on CUDA, torch on CPU), "triton" or "torch".
    """
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., D] with D >= 1, got shape {tuple(x.shape)}")
    _check_float("x", x, x.device)
    if not use_triton(x, backend) or x.numel() == 0:
        return torch_l2norm(x, eps)
    _check_triton_dim(x.shape[-1])
    # one row stride if the leading dims collapse, else (rows, last leading dim) as for a head-split projection
    x3 = _as_rows(x, (1,) if x.dim() < 2 else (1, x.shape[-2]))
    return L2NormFunction.apply(x3, float(eps)).view(x.shape)


def gated_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate) over the last dim, in fp32, returned contiguous in x's
    dtype; differentiable in x, weight and gate (the weight gradient is reduced deterministically).

    Args:
        x: [..., H, D] fp32/fp16/bf16 (with a [D] weight, any [..., D]); may be a strided view.
        weight: [H, D] (one row per head, `HeadwiseGatedRMSNorm`) or [D] (shared, `GatedRMSNorm`); any float dtype,
            its gradient comes back in that dtype.
        gate: None (plain RMSNorm times weight) or x's shape, any float dtype; may be a strided view.
        eps: added to the mean of squares.
        backend: None (Triton on CUDA, torch on CPU), "triton" or "torch".
    """
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., H, D] with D >= 1, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dim() == 2:
        if x.dim() < 2 or tuple(weight.shape) != (x.shape[-2], D):
            raise ValueError(f"weight {tuple(weight.shape)} must be [H, D] or [D] for x [..., H, D] {tuple(x.shape)}")
    elif tuple(weight.shape) != (D,):
        raise ValueError(f"weight {tuple(weight.shape)} must be [H, D] or [D] for x [..., H, D] {tuple(x.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate {tuple(gate.shape)} must have x's shape {tuple(x.shape)}")
    for name, t in (("x", x), ("weight", weight), ("gate", gate)):
        if t is not None:
            _check_float(name, t, x.device)
    if not use_triton(x, backend) or x.numel() == 0:
        return torch_gated_rmsnorm(x, weight, gate, eps)
    _check_triton_dim(D)
    if weight.dim() == 2:
        rows = (x.shape[-2],)
    else:
        rows = (1,) if x.dim() < 2 else (1, x.shape[-2])
    x3 = _as_rows(x, rows)
    # the gate gets x's row split, so one (m, r) index addresses the same row of both
    g3 = _as_rows(gate, (x3.shape[1],)) if gate is not None else None
    y = GatedRMSNormFunction.apply(x3, weight.contiguous(), g3, float(eps))
    return y.view(x.shape)
