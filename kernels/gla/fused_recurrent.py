"""Fused recurrent gated linear attention in Triton: one program per (sequence, head, V block) loops over time with
the [K, BV] state in registers. For decoding (small T) and as a second reference for `chunk_gla`.

Backward: a forward-in-time pass recomputes the states for dq, a backward-in-time pass carries dS for dk, dv and dh0,
and the gate gradient is the reverse cumulative sum of q * dq - k * dk plus the final-state term (see chunk.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from linear_moe.kernels.common import use_triton
from linear_moe.kernels.gla import chunk as _chunk
from linear_moe.kernels.gla.naive import torch_chunk_gla, validate_gla_inputs


@triton.jit
def _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        bos = i_n * T
        eos = bos + T
    return bos, eos


@triton.jit
def fused_recurrent_gla_fwd_kernel(
    q, k, v, g, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    G_MODE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """G_MODE: 0 no decay, 1 scalar [B, T, H], 2 vector [B, T, H, K]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        if G_MODE == 2:
            b_h *= tl.exp(tl.load(g + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32))[:, None]
        elif G_MODE == 1:
            b_h *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)


@triton.jit
def fused_recurrent_gla_bwd_kernel_dq(
    k, v, g, do, dq, h0, ht, cu_seqlens, scale, T, NUMEL,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    G_MODE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dq partial sums [NV, B, T, H, K] fp32: dq_t = scale * S_t do_t over this V block; also the final state."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0)
    for t in range(bos, eos):
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_do = tl.load(do + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        if G_MODE == 2:
            b_h *= tl.exp(tl.load(g + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32))[:, None]
        elif G_MODE == 1:
            b_h *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        b_h += b_k[:, None] * b_v[None, :]
        b_dq = tl.sum(b_h * b_do[None, :], 1) * scale
        tl.store(dq + i_v * NUMEL + (t * H + i_h) * K + o_k, b_dq, mask=m_k)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)


@triton.jit
def fused_recurrent_gla_bwd_kernel_dkv(
    q, k, v, g, do, dk, dv, dht, dh0, cu_seqlens, scale, T, NUMEL,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    G_MODE: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Backward in time with dS [K, BV]: dk partial sums [NV, B, T, H, K] fp32, dv, and dh0."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0)
    for i_r in range(eos - bos):
        t = eos - 1 - i_r
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_do = tl.load(do + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_dh += (b_q * scale)[:, None] * b_do[None, :]
        tl.store(dk + i_v * NUMEL + (t * H + i_h) * K + o_k, tl.sum(b_dh * b_v[None, :], 1), mask=m_k)
        tl.store(dv + (t * H + i_h) * V + o_v, tl.sum(b_dh * b_k[:, None], 0).to(dv.dtype.element_ty), mask=m_v)
        if G_MODE == 2:
            b_dh *= tl.exp(tl.load(g + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32))[:, None]
        elif G_MODE == 1:
            b_dh *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_dh, mask=m_kv)


def _blocks(K: int, V: int) -> tuple[int, int]:
    return triton.next_power_of_2(K), min(triton.next_power_of_2(V), 32 if K <= 128 else 16)


class FusedRecurrentGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = g.contiguous() if g is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        BK, BV = _blocks(K, V)
        g_mode = 0 if g is None else g.dim() - 2
        o = _chunk._empty(B, T, H, V, dtype=v.dtype, device=q.device)
        ht = _chunk._empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
        fused_recurrent_gla_fwd_kernel[(triton.cdiv(V, BV), N * H)](
            q, k, v, g, o, h0, ht, cu_seqlens, scale, T, H=H, K=K, V=V, BK=BK, BV=BV, G_MODE=g_mode,
            USE_H0=h0 is not None, STORE_HT=output_final_state, IS_VARLEN=cu_seqlens is not None,
            num_warps=_chunk._num_warps(4),
        )
        ctx.save_for_backward(q, k, v, g, h0, cu_seqlens)
        ctx.scale = scale
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu_seqlens = ctx.saved_tensors
        do = do.contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        BK, BV = _blocks(K, V)
        NV = triton.cdiv(V, BV)
        g_mode = 0 if g is None else g.dim() - 2
        varlen = cu_seqlens is not None
        want_ht = g is not None and dht is not None
        dq = _chunk._empty(NV, B, T, H, K, dtype=torch.float32, device=q.device)
        ht = _chunk._empty(N, H, K, V, dtype=torch.float32, device=q.device) if want_ht else None
        fused_recurrent_gla_bwd_kernel_dq[(NV, N * H)](
            k, v, g, do, dq, h0, ht, cu_seqlens, ctx.scale, T, B * T * H * K, H=H, K=K, V=V, BK=BK, BV=BV,
            G_MODE=g_mode, USE_H0=h0 is not None, STORE_HT=want_ht, IS_VARLEN=varlen, num_warps=_chunk._num_warps(4),
        )
        dk = _chunk._empty(NV, B, T, H, K, dtype=torch.float32, device=q.device)
        dv = _chunk._empty(B, T, H, V, dtype=v.dtype, device=q.device)
        dh0 = _chunk._empty(N, H, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
        fused_recurrent_gla_bwd_kernel_dkv[(NV, N * H)](
            q, k, v, g, do, dk, dv, dht, dh0, cu_seqlens, ctx.scale, T, B * T * H * K, H=H, K=K, V=V, BK=BK, BV=BV,
            G_MODE=g_mode, USE_DHT=dht is not None, STORE_DH0=h0 is not None, IS_VARLEN=varlen,
            num_warps=_chunk._num_warps(4),
        )
        dq, dk = dq.sum(0), dk.sum(0)
        dg = None
        if g is not None:
            dg = _chunk.gate_grad(q.float() * dq - k.float() * dk, ht, dht, g, cu_seqlens)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, None, dh0, None, None


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention as a fused loop over time; same arguments and returns as `chunk_gla`.

    q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K] (log-decay); initial_state [N, H, K, V];
    cu_seqlens [N + 1] with B = 1. Returns o [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32 or None.
    """
    validate_gla_inputs(q, k, v, g, initial_state, cu_seqlens, check_inputs)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q, backend):
        return torch_chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return FusedRecurrentGLAFunction.apply(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
