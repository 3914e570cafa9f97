"""Causal depthwise short convolution with SiLU, segment-aware, in Triton: forward and backward.

    y[t, c] = act( sum_{j < W} w[c, W-1-j] * x[t-j, c] ),   x[t-j] counted only inside t's segment

and optionally y[t, unit] L2-normalised per token over each unit's channels (the delta rule's q and k: one kernel
instead of a conv, a 16-bit round trip and a norm; its backward recomputes the norm from x).

Segments are the packed documents (and MoM's per-memory segments) of a `[1, T, C]` batch, given per token as the
position of its segment's first token; a dense `[B, T, C]` batch is one segment per row. The input may be a strided
`[B, T, U, D]` view (a few sections split out of a larger projection): it is read in place, not copied; a channel tile
never crosses a unit, so its addresses are contiguous and the strides' common power-of-two factor is passed on for
vector loads. One kernel writes y; the backward's first kernel writes da = dy * act'(pre) (computed in fp32, stored
in x's dtype; with the norm, dy is first taken through it), its second dx and per-program partial dw (summed in
torch, deterministic). With the norm a channel tile is the whole unit. No atomics, no host sync. `naive_short_conv` is
the per-segment F.conv1d definition the tests compare against; the module (linear_moe/modules/short_conv.py) keeps a
pure-torch path for CPU, initial states and decoding.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from linear_moe.kernels.common import use_triton
from linear_moe.kernels.norms import torch_l2norm

# Per kernel: (BT token rows per step, BC channels, num_warps, steps). A program covers BT * steps tokens in a loop of
# BT-row steps and BC channels of one unit. The backward runs in two passes: "dact" writes da = dy * act'(pre)
# (pre recomputed once per token), "dx" reads da at each source row's W targets (L1/L2 hits) for dx and the dw
# partials. A fused single-pass backward (pre recomputed at the W targets, W*W x loads, no da in memory) measured
# slower in every launch tried: 1.37-4.4 ms against this form's 1.06 ms at [16, 2048, 3072] on an H200.
# Defaults: the best of `benchmarks/profile_gpu.py conv`, first on an H200 (forward 0.15 ms at [16, 2048, 3072] and
# 0.60 ms over MoM's packed [1, 98304, 3072], 0.41 and 1.08 ms before on an H100), then on an H100 (2026-11-26). dx
# runs one warp over 8-row steps of 256 channels: dw's per-tap column sums then stay within the warp (no shared-memory
# round trips), and the backward fell from 2.94 to 1.67 ms over the packed [1, 98304, 3072] and from 0.96 to 0.52 ms
# on GDN's view (4 warps over [32, 128] tiles before; two warps over [16, 256]: 2.04 and 0.66 ms). With the L2 norm
# ("fwd_norm", "dact_norm") a tile spans the whole unit and BC is unused; 8-row steps took the packed
# [1, 98304, 4, 256] forward from 0.25 to 0.19 ms (backward 1.11-1.15 ms in every launch tried).
# da = dy * act'(pre) in fp32, or (default) rounded to x's dtype like dy itself: a quarter less memory traffic in the
# backward, 0.23-0.26 ms less at [16, 2048, 3072] and the packed [1, 98304, 3072] (H100, 2026-11-26)
DA_FP32 = False
LAUNCH: dict[str, tuple[int, int, int, int]] = {"fwd": (32, 128, 4, 4), "dact": (32, 128, 4, 1), "dx": (8, 256, 1, 8),
                                                "fwd_norm": (8, 0, 4, 8), "dact_norm": (8, 0, 4, 2)}


@triton.jit
def _tile(x, i_p, sxb, sxu, D: tl.constexpr, BC: tl.constexpr, A: tl.constexpr):
    """This program's batch row, x base pointer (batch row and unit), channel offsets in the unit and in C, mask."""
    i_b = tl.program_id(2)
    ND: tl.constexpr = (D + BC - 1) // BC
    i_u, i_d = i_p // ND, i_p % ND
    o_d = i_d * BC + tl.arange(0, BC)
    base = x + i_b.to(tl.int64) * sxb * A + i_u.to(tl.int64) * sxu * A
    return i_b, base, o_d, i_u * D + o_d, o_d < D


@triton.jit
def _x(base, src, m, o_d, m_d, sxt, A: tl.constexpr):
    """[BT, BC] x rows src (fp32), zero where ~m."""
    p = base + src.to(tl.int64)[:, None] * sxt * A + o_d[None, :]
    return tl.load(p, mask=m[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _taps(w, c, m_d, W: tl.constexpr):
    """The W [BC] fp32 taps, loaded once per program: taps[k] multiplies x[t-k]."""
    taps = ()
    for k in tl.static_range(W):
        taps = taps + (tl.load(w + c * W + (W - 1 - k), mask=m_d, other=0.0).to(tl.float32),)
    return taps


@triton.jit
def _preact(base, seg, taps, o_t, m_t, o_d, m_d, sxt, W: tl.constexpr, A: tl.constexpr, BC: tl.constexpr,
            USE_SEG: tl.constexpr):
    """[BT, BC] fp32 pre-activation at tokens o_t: the W taps over x[t-k], counted only inside t's segment."""
    if USE_SEG:
        start = tl.load(seg + o_t, mask=m_t, other=0)
    else:
        start = tl.zeros_like(o_t)
    acc = tl.zeros([o_t.shape[0], BC], dtype=tl.float32)
    for k in tl.static_range(W):
        acc += _x(base, o_t - k, m_t & (o_t - k >= start), o_d, m_d, sxt, A) * taps[k][None, :]
    return acc


@triton.jit
def short_conv_fwd_kernel(x, w, seg, y, T, C, sxb, sxt, sxu, eps, D: tl.constexpr, W: tl.constexpr, A: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, STEPS: tl.constexpr,
                          USE_SEG: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr):
    i_b, base, o_d, c, m_d = _tile(x, tl.program_id(1), sxb, sxu, D, BC, A)
    taps = _taps(w, c, m_d, W)
    for i_s in range(STEPS):
        o_t = (tl.program_id(0) * STEPS + i_s) * BT + tl.arange(0, BT)
        m_t = o_t < T
        acc = _preact(base, seg, taps, o_t, m_t, o_d, m_d, sxt, W, A, BC, USE_SEG)
        if ACT:
            acc = acc * tl.sigmoid(acc)
        if NORM:
            # the tile is the whole unit; masked channels are zero
            acc = acc * tl.rsqrt(tl.sum(acc * acc, 1) + eps)[:, None]
        p_y = y + (i_b.to(tl.int64) * T + o_t)[:, None] * C + c[None, :]
        tl.store(p_y, acc.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def short_conv_bwd_dact_kernel(x, w, seg, dy, da, T, C, sxb, sxt, sxu, eps, D: tl.constexpr, W: tl.constexpr,
                               A: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, STEPS: tl.constexpr,
                               USE_SEG: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr):
    """Backward, first pass: da = dy * act'(pre) (in fp32, stored in da's dtype), pre recomputed once per token as
    the forward does; with the norm, dy is first taken back through it: r (dy - n sum(dy n)), n = act(pre) r,
    r = 1 / |act(pre)|."""
    i_b, base, o_d, c, m_d = _tile(x, tl.program_id(1), sxb, sxu, D, BC, A)
    taps = _taps(w, c, m_d, W)
    for i_s in range(STEPS):
        o_t = (tl.program_id(0) * STEPS + i_s) * BT + tl.arange(0, BT)
        m_t = o_t < T
        off = (i_b.to(tl.int64) * T + o_t)[:, None] * C + c[None, :]
        m = m_t[:, None] & m_d[None, :]
        b_da = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
        if ACT or NORM:
            pre = _preact(base, seg, taps, o_t, m_t, o_d, m_d, sxt, W, A, BC, USE_SEG)
            if ACT:
                sig = tl.sigmoid(pre)
                b_y = pre * sig
            else:
                b_y = pre
            if NORM:
                r = tl.rsqrt(tl.sum(b_y * b_y, 1) + eps)[:, None]
                b_n = b_y * r
                b_da = (b_da - b_n * tl.sum(b_da * b_n, 1)[:, None]) * r
            if ACT:
                b_da = b_da * sig * (1 + pre * (1 - sig))
        tl.store(da + off, b_da.to(da.dtype.element_ty), mask=m)


@triton.jit
def short_conv_bwd_dx_kernel(x, w, seg, da, dx, dw, T, C, P, sxb, sxt, sxu, D: tl.constexpr, W: tl.constexpr,
                             A: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, STEPS: tl.constexpr,
                             USE_SEG: tl.constexpr):
    """Backward, second pass: dx[s] = sum_j w[W-1-j] da[s+j] over targets s+j in s's segment (da read W times,
    mostly from L1/L2) and this program's partial dw, one [BC] row per tap of dw [W, P, C] (P row-programs): each
    tap's sum stays in the reduction's layout, with no [BC, W] tile to gather it into."""
    i_b, base, o_d, c, m_d = _tile(x, tl.program_id(1), sxb, sxu, D, BC, A)
    taps = _taps(w, c, m_d, W)
    row = i_b.to(tl.int64) * T
    b_dw = ()
    for j in tl.static_range(W):
        b_dw = b_dw + (tl.zeros([BC], dtype=tl.float32),)
    for i_s in range(STEPS):
        o_t = (tl.program_id(0) * STEPS + i_s) * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_x = _x(base, o_t, m_t, o_d, m_d, sxt, A)
        b_dx = tl.zeros([BT, BC], dtype=tl.float32)
        acc = ()
        for j in tl.static_range(W):
            tgt = o_t + j
            m_tgt = tgt < T
            if USE_SEG:
                m_tgt = m_tgt & (tl.load(seg + tgt, mask=m_tgt, other=0) <= o_t)
            b_da = tl.load(da + (row + tgt)[:, None] * C + c[None, :], mask=m_tgt[:, None] & m_d[None, :],
                           other=0.0).to(tl.float32)
            b_dx += b_da * taps[j][None, :]
            acc = acc + (b_dw[j] + tl.sum(b_x * b_da, 0),)
        b_dw = acc
        p_dx = dx + (row + o_t)[:, None] * C + c[None, :]
        tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    i_p = (i_b * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
    for j in tl.static_range(W):
        # x[s] da[s + j] belongs to tap W - 1 - j
        tl.store(dw + ((W - 1 - j) * P + i_p) * C + c, b_dw[j], mask=m_d)


def _layout(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(stride of B, of T, of a unit U, all divided by A; unit width D; A) of a [B, T, C] or [B, T, U, D] input with
    unit last stride. A (<= 8) is the strides' common power-of-two factor: it tells Triton the rows' alignment, so a
    view of an odd-width projection still gets the widest loads its strides allow."""
    # the stride of a size-1 dim is never used; it must not lower A
    sxb, sxt = (x.stride(0) if x.shape[0] > 1 else 0), (x.stride(1) if x.shape[1] > 1 else 0)
    sxu, D = (0, x.shape[2]) if x.dim() == 3 else (x.stride(2) if x.shape[2] > 1 else 0, x.shape[3])
    A = math.gcd(8, sxb, sxt, sxu)
    return sxb // A, sxt // A, sxu // A, D, A


def _launch(kernel: str, D: int, norm: bool) -> tuple[int, int, int, int]:
    """LAUNCH[kernel], its channel tile no wider than the unit (its "_norm" entry with the norm, whose channel tile
    is the unit)."""
    if not norm:
        BT, BC, warps, steps = LAUNCH[kernel]
        return BT, min(BC, triton.next_power_of_2(D)), warps, steps
    BT, _, warps, steps = LAUNCH[kernel + "_norm"]
    return BT, triton.next_power_of_2(D), warps, steps


def _grid(x: torch.Tensor, D: int, BT: int, BC: int, steps: int) -> tuple[int, int, int]:
    U = 1 if x.dim() == 3 else x.shape[2]
    return triton.cdiv(x.shape[1], BT * steps), U * triton.cdiv(D, BC), x.shape[0]


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, seg, act, eps):
        B, T = x.shape[:2]
        C, W = weight.shape
        sxb, sxt, sxu, D, A = _layout(x)
        w = weight.contiguous()
        y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        norm = eps is not None
        BT, BC, warps, steps = _launch("fwd", D, norm)
        short_conv_fwd_kernel[_grid(x, D, BT, BC, steps)](
            x, w, seg, y, T, C, sxb, sxt, sxu, eps or 0.0, D=D, W=W, A=A, BT=BT, BC=BC, STEPS=steps,
            USE_SEG=seg is not None, ACT=act, NORM=norm, num_warps=warps)
        ctx.save_for_backward(x, w, seg)
        ctx.act, ctx.eps, ctx.weight_dtype = act, eps, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, seg = ctx.saved_tensors
        B, T = x.shape[:2]
        C, W = w.shape
        sxb, sxt, sxu, D, A = _layout(x)
        dy = dy.contiguous()
        dx = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        common = {"D": D, "W": W, "A": A, "USE_SEG": seg is not None}
        norm = ctx.eps is not None
        BT, BC, warps, steps = _launch("dact", D, norm)
        da = torch.empty(B, T, C, dtype=torch.float32 if DA_FP32 else x.dtype, device=x.device)
        short_conv_bwd_dact_kernel[_grid(x, D, BT, BC, steps)](
            x, w, seg, dy, da, T, C, sxb, sxt, sxu, ctx.eps or 0.0, **common, BT=BT, BC=BC, STEPS=steps, ACT=ctx.act,
            NORM=norm, num_warps=warps)
        BT, BC, warps, steps = _launch("dx", D, False)
        grid = _grid(x, D, BT, BC, steps)
        P = B * grid[0]
        dw = torch.empty(W, P, C, dtype=torch.float32, device=x.device)
        short_conv_bwd_dx_kernel[grid](
            x, w, seg, da, dx, dw, T, C, P, sxb, sxt, sxu, **common, BT=BT, BC=BC, STEPS=steps, num_warps=warps)
        return dx.view(x.shape), dw.sum(1).t().to(ctx.weight_dtype), None, None, None


def segment_starts(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """int32 [T]: the position of each token's segment start, from offsets [N+1] (zero-length segments allowed),
    without a host sync."""
    cu = cu_seqlens.to(torch.int32)
    t = torch.arange(T, device=cu.device, dtype=torch.int32)
    return cu[torch.searchsorted(cu[1:].contiguous(), t, right=True)].contiguous()


def short_conv(x: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
               activation: str | None = "silu", l2norm_eps: float | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Causal depthwise conv over time that never crosses a segment border.

    Args:
        x: [B, T, C], or a strided [B, T, U, D] view with C = U * D (read in place); unit stride in the last dim.
        weight: [C, W].
        cu_seqlens: [N + 1] segment offsets of a packed x (B must be 1); None: each row is one sequence.
        activation: "silu" or None.
        l2norm_eps: None, or L2-normalise each token's output over each unit's D channels (over C for [B, T, C]),
            y * rsqrt(sum(y^2) + l2norm_eps), after the activation.
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
    if l2norm_eps is not None and not l2norm_eps >= 0:
        raise ValueError(f"l2norm_eps={l2norm_eps} must be None or >= 0")
    if not use_triton(x, backend):
        return naive_short_conv(x, weight, cu_seqlens=cu_seqlens, activation=activation, l2norm_eps=l2norm_eps)
    seg = segment_starts(cu_seqlens, T) if cu_seqlens is not None else None
    return ShortConvFunction.apply(x, weight, seg, activation == "silu",
                                   None if l2norm_eps is None else float(l2norm_eps))


def naive_short_conv(x: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                     activation: str | None = "silu", l2norm_eps: float | None = None) -> torch.Tensor:
    """The definition: F.conv1d over each segment on its own (a host loop over segments; tests and CPU only), then
    the optional L2 norm over each unit (the last dim of x) -> [B, T, C]."""
    W = weight.shape[1]
    B, T, D = x.shape[0], x.shape[1], x.shape[-1]
    x = x.reshape(B, T, -1)
    w = weight.to(x.dtype)[:, None, :]

    def conv(seq):  # [L, C] -> [L, C]
        if seq.shape[0] == 0:
            return seq
        y = F.conv1d(F.pad(seq.t()[None], (W - 1, 0)), w, groups=seq.shape[1])[0].t()
        y = F.silu(y) if activation == "silu" else y
        if l2norm_eps is None:
            return y
        return torch_l2norm(y.unflatten(-1, (-1, D)), l2norm_eps).flatten(-2)

    if cu_seqlens is None:
        return torch.stack([conv(row) for row in x])
    bounds = cu_seqlens.tolist()
    return torch.cat([conv(x[0, a:b]) for a, b in itertools.pairwise(bounds)])[None]
