"""MoM's combine in Triton: each token's weighted sum of its k' memory-slot outputs, gathered in place.

    out[n] = sum_j weights[n, j] * o[slot_of[n, j]]            (fp32 accumulation, out in o's dtype)

One program per token reads its k' slot rows straight from the packed kernel output (no permuted copy, no batched
GEMM of 1 x k' matrices); the backward writes each slot's gradient weights[n, j] * dout[n] (every slot belongs to
exactly one (token, j), so no atomics) and the weight gradients o[slot] . dout[n]. `naive_combine` is the definition
(a gather and a weighted sum in torch) and the CPU path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from linear_moe.kernels.common import use_triton


@triton.jit
def combine_fwd_kernel(o, w, slot, out, D, KP: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        acc = tl.zeros([BD], dtype=tl.float32)
        for j in tl.static_range(KP):
            s = tl.load(slot + n * KP + j).to(tl.int64)
            wj = tl.load(w + n * KP + j).to(tl.float32)
            acc += wj * tl.load(o + s * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        tl.store(out + n * D + o_d, acc.to(out.dtype.element_ty), mask=m_d)


@triton.jit
def combine_bwd_kernel(o, w, slot, dout, do, dw, D, KP: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(KP):
        s = tl.load(slot + n * KP + j).to(tl.int64)
        wj = tl.load(w + n * KP + j).to(tl.float32)
        acc = tl.zeros([BD], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_dout = tl.load(dout + n * D + o_d, mask=m_d, other=0.0).to(tl.float32)
            acc += b_dout * tl.load(o + s * D + o_d, mask=m_d, other=0.0).to(tl.float32)
            tl.store(do + s * D + o_d, (wj * b_dout).to(do.dtype.element_ty), mask=m_d)
        tl.store(dw + n * KP + j, tl.sum(acc, 0))


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, weights, slot_of):
        D = o.shape[1]
        N, KP = slot_of.shape
        o, weights, slot_of = o.contiguous(), weights.contiguous(), slot_of.contiguous()
        out = torch.empty(N, D, dtype=o.dtype, device=o.device)
        BD = min(triton.next_power_of_2(D), 1024)
        combine_fwd_kernel[(N,)](o, weights, slot_of, out, D, KP=KP, BD=BD)
        ctx.save_for_backward(o, weights, slot_of)
        return out

    @staticmethod
    def backward(ctx, dout):
        o, weights, slot_of = ctx.saved_tensors
        D = o.shape[1]
        N, KP = slot_of.shape
        # every slot is some (token, j)'s, so the kernel writes all of do
        do = torch.empty_like(o)
        dw = torch.empty(N, KP, dtype=torch.float32, device=o.device)
        BD = min(triton.next_power_of_2(D), 1024)
        combine_bwd_kernel[(N,)](o, weights, slot_of, dout.contiguous(), do, dw, D, KP=KP, BD=BD)
        return do, dw.to(weights.dtype), None


def naive_combine(o: torch.Tensor, weights: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """The definition: gather each token's slot rows, weighted sum in fp32, back in o's dtype."""
    N, KP = slot_of.shape
    per_slot = o.index_select(0, slot_of.reshape(-1)).view(N, KP, -1)
    return (weights.float().unsqueeze(1) @ per_slot.float()).squeeze(1).to(o.dtype)


def combine(o: torch.Tensor, weights: torch.Tensor, slot_of: torch.Tensor, backend: str | None = None
            ) -> torch.Tensor:
    """o [S, D] packed slot outputs, weights [N, k'], slot_of [N, k'] (a permutation of the S = N * k' slots) ->
    [N, D]."""
    if o.dim() != 2 or weights.dim() != 2 or slot_of.shape != weights.shape or o.shape[0] != slot_of.numel():
        raise ValueError(f"combine takes o [S, D], weights and slot_of [N, k'] with S = N * k', got {tuple(o.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(slot_of.shape)}")
    if use_triton(o, backend):
        return CombineFunction.apply(o, weights, slot_of)
    return naive_combine(o, weights, slot_of)
