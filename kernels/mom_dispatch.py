"""MoM's dispatch in Triton: the in_proj output of every token, split and copied into the packed memory slots.

One projection unit per head (H heads) is laid out as

    q K, [gate V], then for each memory m = 0..M_tot-1: k K, v V, a 1, [beta 1]

and slot s = slot_of[n, j] of token n's j-th memory m = memories[n, j] gets

    q[s] = q of token n,  k[s], v[s] = those of memory m,  a[s], beta[s] = the gate inputs of memory m   (every head)

One program per (token, head) reads the token's q once and writes its k' slots; the gate is copied per token. The
backward writes the whole input gradient in one pass, every element exactly once (no zero fill, no atomics): the sum
of the token's k' slot gradients for q, the gate's gradient, and per memory block the gradient of the slot routed to
that memory, or zeros when the token has none. `naive_dispatch` is the definition (torch index ops) and the CPU path.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from linear_moe.kernels.common import use_triton


class DispatchedTokens(NamedTuple):
    """The pieces of the dispatch, all contiguous and in x's dtype. N tokens, S = N * k' slots."""

    gate: torch.Tensor | None
    """[N, H, V] output gate of each token (None without one)."""
    q: torch.Tensor
    """[S, H, K] the token's q, one copy per slot."""
    k: torch.Tensor
    """[S, H, K] k of the slot's memory."""
    v: torch.Tensor
    """[S, H, V] v of the slot's memory."""
    a: torch.Tensor
    """[S, H] decay input of the slot's memory."""
    beta: torch.Tensor | None
    """[S, H] beta input of the slot's memory (None for memories without one, e.g. GLA)."""


@triton.jit
def dispatch_fwd_kernel(x, slot, mem, gate, q, k, v, a, beta, H, UNIT,
                        K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, DM: tl.constexpr, KP: tl.constexpr,
                        HAS_BETA: tl.constexpr, BK: tl.constexpr, BG: tl.constexpr, BV: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = x + (n * H + h) * UNIT
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = tl.load(row + o_k, mask=m_k)
    if G > 0:
        o_g = tl.arange(0, BG)
        m_g = o_g < G
        tl.store(gate + (n * H + h) * G + o_g, tl.load(row + K + o_g, mask=m_g), mask=m_g)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    for j in tl.static_range(KP):
        s = tl.load(slot + n * KP + j).to(tl.int64)
        src = row + K + G + tl.load(mem + n * KP + j).to(tl.int64) * DM
        tl.store(q + (s * H + h) * K + o_k, b_q, mask=m_k)
        tl.store(k + (s * H + h) * K + o_k, tl.load(src + o_k, mask=m_k), mask=m_k)
        tl.store(v + (s * H + h) * V + o_v, tl.load(src + K + o_v, mask=m_v), mask=m_v)
        tl.store(a + s * H + h, tl.load(src + K + V))
        if HAS_BETA:
            tl.store(beta + s * H + h, tl.load(src + K + V + 1))


@triton.jit
def dispatch_bwd_kernel(slot, mem, dgate, dq, dk, dv, da, dbeta, dx, H, UNIT, MT,
                        K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, DM: tl.constexpr, KP: tl.constexpr,
                        HAS_BETA: tl.constexpr, HAS_DG: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr,
                        HAS_DV: tl.constexpr, HAS_DA: tl.constexpr, HAS_DB: tl.constexpr,
                        BK: tl.constexpr, BG: tl.constexpr, BV: tl.constexpr, BKP: tl.constexpr):
    """Each (token, head) row of dx written once; a gradient that did not arrive (HAS_* False) reads as zeros."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = dx + (n * H + h) * UNIT
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    acc = tl.zeros([BK], dtype=tl.float32)
    if HAS_DQ:
        for j in tl.static_range(KP):
            s = tl.load(slot + n * KP + j).to(tl.int64)
            acc += tl.load(dq + (s * H + h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    tl.store(row + o_k, acc.to(dx.dtype.element_ty), mask=m_k)
    if G > 0:
        o_g = tl.arange(0, BG)
        m_g = o_g < G
        b_g = tl.zeros([BG], dtype=tl.float32)
        if HAS_DG:
            b_g = tl.load(dgate + (n * H + h) * G + o_g, mask=m_g, other=0.0).to(tl.float32)
        tl.store(row + K + o_g, b_g.to(dx.dtype.element_ty), mask=m_g)
    o_j = tl.arange(0, BKP)
    m_j = o_j < KP
    slots = tl.load(slot + n * KP + o_j, mask=m_j, other=-1).to(tl.int64)
    mems = tl.load(mem + n * KP + o_j, mask=m_j, other=-1).to(tl.int64)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    for m in range(MT):
        # the slot of memory m (a token's memories are distinct), or -1: chosen first, so each address is stored once
        sel = tl.max(tl.where(mems == m, slots, -1), 0)
        hit = sel >= 0
        s = tl.maximum(sel, 0)
        dst = row + K + G + m * DM
        # copies pass through fp32 exactly; columns to read: all with a slot, none without (one compare, not
        # m_k & hit: the interpreter makes that mask an integer)
        b_k = tl.zeros([BK], dtype=tl.float32)
        if HAS_DK:
            b_k = tl.load(dk + (s * H + h) * K + o_k, mask=o_k < tl.where(hit, K, 0), other=0.0).to(tl.float32)
        tl.store(dst + o_k, b_k.to(dx.dtype.element_ty), mask=m_k)
        b_v = tl.zeros([BV], dtype=tl.float32)
        if HAS_DV:
            b_v = tl.load(dv + (s * H + h) * V + o_v, mask=o_v < tl.where(hit, V, 0), other=0.0).to(tl.float32)
        tl.store(dst + K + o_v, b_v.to(dx.dtype.element_ty), mask=m_v)
        b_a = tl.zeros([], dtype=tl.float32)
        if HAS_DA:
            b_a = tl.load(da + s * H + h, mask=hit, other=0.0).to(tl.float32)
        tl.store(dst + K + V, b_a.to(dx.dtype.element_ty))
        if HAS_BETA:
            b_b = tl.zeros([], dtype=tl.float32)
            if HAS_DB:
                b_b = tl.load(dbeta + s * H + h, mask=hit, other=0.0).to(tl.float32)
            tl.store(dst + K + V + 1, b_b.to(dx.dtype.element_ty))


def _blocks(K: int, V: int, G: int) -> dict[str, int]:
    return {"BK": triton.next_power_of_2(K), "BG": triton.next_power_of_2(max(G, 1)),
            "BV": triton.next_power_of_2(V)}


class DispatchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot_of, memories, H, K, V, G, MT, has_beta):
        N, KP = slot_of.shape
        S = N * KP
        x, slot_of, memories = x.contiguous(), slot_of.contiguous(), memories.contiguous()
        unit = x.numel() // (N * H)
        new = functools.partial(torch.empty, dtype=x.dtype, device=x.device)
        gate = new(N, H, G) if G else None
        q, k, v, a = new(S, H, K), new(S, H, K), new(S, H, V), new(S, H)
        beta = new(S, H) if has_beta else None
        # absent outputs get a stand-in pointer that the kernel never touches
        dispatch_fwd_kernel[(N, H)](x, slot_of, memories, x if gate is None else gate, q, k, v, a,
                                    x if beta is None else beta, H, unit, K=K, V=V, G=G, DM=K + V + 1 + has_beta,
                                    KP=KP, HAS_BETA=has_beta, **_blocks(K, V, G))
        ctx.save_for_backward(slot_of, memories)
        ctx.dims = (x.shape, x.dtype, H, K, V, G, MT, has_beta)
        # unused outputs (beta of a layer without it, ...) give None, read as zeros by the kernel: no zero tensors
        ctx.set_materialize_grads(False)
        return gate, q, k, v, a, beta

    @staticmethod
    def backward(ctx, dgate, dq, dk, dv, da, dbeta):
        slot_of, memories = ctx.saved_tensors
        shape, dtype, H, K, V, G, MT, has_beta = ctx.dims
        N, KP = slot_of.shape
        # the kernel writes every element of dx
        dx = torch.empty(shape, dtype=dtype, device=slot_of.device)
        grads = [dgate, dq, dk, dv, da, dbeta]
        dispatch_bwd_kernel[(N, H)](slot_of, memories, *(dx if t is None else t.contiguous() for t in grads), dx, H,
                                    dx.numel() // (N * H), MT, K=K, V=V, G=G, DM=K + V + 1 + has_beta, KP=KP,
                                    HAS_BETA=has_beta, HAS_DG=dgate is not None, HAS_DQ=dq is not None,
                                    HAS_DK=dk is not None, HAS_DV=dv is not None, HAS_DA=da is not None,
                                    HAS_DB=dbeta is not None,
                                    BKP=triton.next_power_of_2(KP), **_blocks(K, V, G))
        return dx, None, None, None, None, None, None, None, None


def naive_dispatch(x: torch.Tensor, slot_of: torch.Tensor, memories: torch.Tensor, *, heads: int, k_dim: int,
                   v_dim: int, num_memories: int, has_gate: bool, has_beta: bool) -> DispatchedTokens:
    """The definition: split the units, gather each slot's token and (token, memory) rows by torch indexing."""
    N, kp = slot_of.shape
    K, V, G = k_dim, v_dim, v_dim if has_gate else 0
    dm = K + V + 1 + int(has_beta)
    q, gate, mem = x.reshape(N, heads, -1).split([K, G, num_memories * dm], dim=-1)
    # the (token, j) pair of each slot
    pair = slot_of.reshape(-1).argsort()
    tok = pair // kp
    rows = mem.reshape(N, heads, num_memories, dm)[tok, :, memories.reshape(-1)[pair]]  # [S, H, dm]
    return DispatchedTokens(gate.contiguous() if G else None, q.index_select(0, tok), rows[..., :K].contiguous(),
                            rows[..., K:K + V].contiguous(), rows[..., K + V].contiguous(),
                            rows[..., K + V + 1].contiguous() if has_beta else None)


def dispatch(x: torch.Tensor, slot_of: torch.Tensor, memories: torch.Tensor, *, heads: int, k_dim: int, v_dim: int,
             num_memories: int, has_gate: bool, has_beta: bool, backend: str | None = None) -> DispatchedTokens:
    """x [N, H * unit] or [N, H, unit] in_proj output (unit: q K, [gate V], per memory m < num_memories: k K, v V,
    a 1, [beta 1]); slot_of [N, k'] the packed slot of token n's j-th memory (a permutation of the S = N * k' slots);
    memories [N, k'] that memory's index (distinct per token, < num_memories; the shared memory included)
    -> DispatchedTokens(gate [N, H, V] | None, q [S, H, K], k [S, H, K], v [S, H, V], a [S, H], beta [S, H] | None).
    """
    N = slot_of.shape[0] if slot_of.dim() == 2 else -1
    unit = k_dim + (v_dim if has_gate else 0) + num_memories * (k_dim + v_dim + 1 + int(has_beta))
    if (slot_of.dim() != 2 or memories.shape != slot_of.shape or x.dim() not in (2, 3) or x.shape[0] != N
            or tuple(x.shape[1:]) not in ((heads * unit,), (heads, unit))):
        raise ValueError(f"dispatch takes x [N, H * unit] with H={heads}, unit={unit} (K={k_dim}, V={v_dim}, "
                         f"{num_memories} memories, gate={has_gate}, beta={has_beta}), slot_of and memories [N, k'], "
                         f"got {tuple(x.shape)}, {tuple(slot_of.shape)}, {tuple(memories.shape)}")
    if use_triton(x, backend):
        return DispatchedTokens(*DispatchFunction.apply(x, slot_of, memories, heads, k_dim, v_dim,
                                                        v_dim if has_gate else 0, num_memories, has_beta))
    return naive_dispatch(x, slot_of, memories, heads=heads, k_dim=k_dim, v_dim=v_dim, num_memories=num_memories,
                          has_gate=has_gate, has_beta=has_beta)
