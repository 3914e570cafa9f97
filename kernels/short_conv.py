"""Causal depthwise short convolution with SiLU, segment-aware, in Triton: forward and backward.

    y[t, c] = act( sum_{j < W} w[c, W-1-j] * x[t-j, c] ),   x[t-j] counted only inside t's segment

Segments are the packed documents (and MoM's per-memory segments) of a `[1, T, C]` batch, given per token as the
position of its segment's first token; a dense `[B, T, C]` batch is one segment per row. The input may be a strided
`[B, T, U, D]` view (a few sections split out of a larger projection): it is read in place, not copied. One kernel
writes y; the backward recomputes the pre-activation, then one kernel gives dx and per-tile partial dw (summed on
the host side, deterministic). No host sync. `naive_short_conv` is the per-segment F.conv1d definition the tests
compare against; the module (linear_moe/modules/short_conv.py) keeps a pure-torch path for CPU, initial states and
decoding.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from linear_moe.kernels.common import use_triton

BT, BC = 64, 128


@triton.jit
def _x_ptrs(x, i_b, o_t, o_c, sxb, sxt, sxu, D: tl.constexpr):
    return x + i_b.to(tl.int64) * sxb + o_t.to(tl.int64)[:, None] * sxt + ((o_c // D) * sxu + o_c % D)[None, :]


@triton.jit
def _block(T, C, BT: tl.constexpr, BC: tl.constexpr):
    """This program's (token block, batch row) and its token and channel offsets with their masks."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    return i_t, i_b, o_t, o_c, o_t < T, o_c < C


@triton.jit
def _preact(x, w, seg, i_b, o_t, o_c, m_t, m_c, T, sxb, sxt, sxu,
            D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, USE_SEG: tl.constexpr):
    """[BT, BC] fp32 pre-activation at tokens o_t."""
    if USE_SEG:
        start = tl.load(seg + i_b * T + o_t, mask=m_t, other=0)
    else:
        start = tl.zeros([BT], dtype=tl.int32)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        src = o_t - j
        m = m_t & (src >= start)
        xv = tl.load(_x_ptrs(x, i_b, src, o_c, sxb, sxt, sxu, D), mask=m[:, None] & m_c[None, :], other=0.0)
        wj = tl.load(w + o_c * W + (W - 1 - j), mask=m_c, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wj[None, :]
    return acc


@triton.jit
def short_conv_fwd_kernel(x, w, seg, y, T, C, sxb, sxt, sxu,
                          D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                          USE_SEG: tl.constexpr, ACT: tl.constexpr):
    _, i_b, o_t, o_c, m_t, m_c = _block(T, C, BT, BC)
    acc = _preact(x, w, seg, i_b, o_t, o_c, m_t, m_c, T, sxb, sxt, sxu, D, W, BT, BC, USE_SEG)
    if ACT:
        acc = acc * tl.sigmoid(acc)
    p_y = y + (i_b.to(tl.int64) * T + o_t[:, None]) * C + o_c[None, :]
    tl.store(p_y, acc.to(y.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def short_conv_bwd_kernel_dact(x, w, seg, dy, da, T, C, sxb, sxt, sxu,
                               D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                               USE_SEG: tl.constexpr, ACT: tl.constexpr):
    """Gradient of the pre-activation, da = dy * act'(pre), fp32."""
    _, i_b, o_t, o_c, m_t, m_c = _block(T, C, BT, BC)
    off = (i_b.to(tl.int64) * T + o_t[:, None]) * C + o_c[None, :]
    m = m_t[:, None] & m_c[None, :]
    b_dy = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
    if ACT:
        acc = _preact(x, w, seg, i_b, o_t, o_c, m_t, m_c, T, sxb, sxt, sxu, D, W, BT, BC, USE_SEG)
        sig = tl.sigmoid(acc)
        b_dy = b_dy * sig * (1 + acc * (1 - sig))
    tl.store(da + off, b_dy, mask=m)


@triton.jit
def short_conv_bwd_kernel_dx(x, w, seg, da, dx, dw, T, C, NTB, sxb, sxt, sxu,
                             D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                             USE_SEG: tl.constexpr):
    """dx[s] = sum_j w[W-1-j] da[s+j] over targets s+j in s's segment; this tile's share of dw."""
    i_t, i_b, o_t, o_c, m_t, m_c = _block(T, C, BT, BC)
    if USE_SEG:
        start = tl.load(seg + i_b * T + o_t, mask=m_t, other=0)
    else:
        start = tl.zeros([BT], dtype=tl.int32)
    row = i_b.to(tl.int64) * T
    b_da = tl.load(da + (row + o_t[:, None]) * C + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0)
    b_dx = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(w + o_c * W + (W - 1 - j), mask=m_c, other=0.0).to(tl.float32)
        # dx: the target t = s + j reads s when s lies in t's segment
        tgt = o_t + j
        m_tgt = tgt < T
        if USE_SEG:
            t_start = tl.load(seg + i_b * T + tgt, mask=m_tgt, other=0)
            m_tgt = m_tgt & (t_start <= o_t)
        b_dt = tl.load(da + (row + tgt[:, None]) * C + o_c[None, :], mask=m_tgt[:, None] & m_c[None, :], other=0.0)
        b_dx += b_dt * wj[None, :]
        # dw[c, W-1-j]: sum over this tile's tokens t of da[t] x[t-j]
        src = o_t - j
        m_src = m_t & (src >= start)
        xv = tl.load(_x_ptrs(x, i_b, src, o_c, sxb, sxt, sxu, D), mask=m_src[:, None] & m_c[None, :], other=0.0)
        b_dw = tl.sum(b_da * xv.to(tl.float32), 0)
        tl.store(dw + ((i_b * NTB + i_t) * C + o_c) * W + (W - 1 - j), b_dw, mask=m_c)
    tl.store(dx + (row + o_t[:, None]) * C + o_c[None, :], b_dx.to(dx.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride of B, of T, of a unit U, unit width D) of a [B, T, C] or [B, T, U, D] input with unit last stride."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1), x.shape[2], x.shape[2]
    return x.stride(0), x.stride(1), x.stride(2), x.shape[3]


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, seg, act):
        B, T = x.shape[:2]
        C, W = weight.shape
        sxb, sxt, sxu, D = _strides(x)
        w = weight.contiguous()
        y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
        short_conv_fwd_kernel[grid](x, w, seg, y, T, C, sxb, sxt, sxu, D=D, W=W, BT=BT, BC=BC,
                                    USE_SEG=seg is not None, ACT=act)
        ctx.save_for_backward(x, w, seg)
        ctx.act, ctx.weight_dtype = act, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, seg = ctx.saved_tensors
        B, T = x.shape[:2]
        C, W = w.shape
        sxb, sxt, sxu, D = _strides(x)
        dy = dy.contiguous()
        grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
        da = torch.empty(B, T, C, dtype=torch.float32, device=x.device)
        short_conv_bwd_kernel_dact[grid](x, w, seg, dy, da, T, C, sxb, sxt, sxu, D=D, W=W, BT=BT, BC=BC,
                                         USE_SEG=seg is not None, ACT=ctx.act)
        NTB = triton.cdiv(T, BT)
        dx = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        dw = torch.empty(B * NTB, C, W, dtype=torch.float32, device=x.device)
        short_conv_bwd_kernel_dx[grid](x, w, seg, da, dx, dw, T, C, NTB, sxb, sxt, sxu, D=D, W=W, BT=BT, BC=BC,
                                       USE_SEG=seg is not None)
        return dx.view(x.shape), dw.sum(0).to(ctx.weight_dtype), None, None


def segment_starts(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """int32 [T]: the position of each token's segment start, from offsets [N+1] (zero-length segments allowed),
    without a host sync."""
    cu = cu_seqlens.to(torch.int32)
    t = torch.arange(T, device=cu.device, dtype=torch.int32)
    return cu[torch.searchsorted(cu[1:].contiguous(), t, right=True)].contiguous()


def short_conv(x: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
               activation: str | None = "silu", backend: str | None = None) -> torch.Tensor:
    """Causal depthwise conv over time that never crosses a segment border.

    Args:
        x: [B, T, C], or a strided [B, T, U, D] view with C = U * D (read in place); unit stride in the last dim.
        weight: [C, W].
        cu_seqlens: [N + 1] segment offsets of a packed x (B must be 1); None: each row is one sequence.
        activation: "silu" or None.
        backend: None (Triton on CUDA, torch on CPU), "triton" or "torch".
    Returns:
        y [B, T, C] contiguous, in x's dtype.
    """
    if x.dim() not in (3, 4) or x.stride(-1) != 1:
        raise ValueError(f"x must be [B, T, C] or [B, T, U, D] with unit stride in the last dim, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    B, T = x.shape[:2]
    C = x.shape[2] if x.dim() == 3 else x.shape[2] * x.shape[3]
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must be [C={C}, W], got {tuple(weight.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens x must be packed as [1, T, C], got B={B}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation={activation!r} must be None or 'silu'")
    if not use_triton(x, backend):
        return naive_short_conv(x.reshape(B, T, C), weight, cu_seqlens=cu_seqlens, activation=activation)
    seg = segment_starts(cu_seqlens, T) if cu_seqlens is not None else None
    return ShortConvFunction.apply(x, weight, seg, activation == "silu")


def naive_short_conv(x: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                     activation: str | None = "silu") -> torch.Tensor:
    """The definition: F.conv1d over each segment on its own (a host loop over segments; tests and CPU only)."""
    W = weight.shape[1]
    w = weight.to(x.dtype)[:, None, :]

    def conv(seq):  # [L, C] -> [L, C]
        if seq.shape[0] == 0:
            return seq
        y = F.conv1d(F.pad(seq.t()[None], (W - 1, 0)), w, groups=seq.shape[1])[0].t()
        return F.silu(y) if activation == "silu" else y

    if cu_seqlens is None:
        return torch.stack([conv(row) for row in x])
    bounds = cu_seqlens.tolist()
    return torch.cat([conv(x[0, a:b]) for a, b in itertools.pairwise(bounds)])[None]
