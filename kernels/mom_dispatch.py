"""MoM's projection and dispatch: hidden states into the packed memory slots, projecting only what each token uses.

Per head, a token's projection has a dense part that every token needs and a routed part per memory:

    dense   xd: q K, [gate V], [the shared memory's k K, v V, a 1, beta 1]        UD columns per head
    routed  yr: k K, v V, a 1, [beta 1] of one routed memory                     DM columns per head

`project` computes xd with one GEMM over all tokens and the routed rows with ONE grouped GEMM over the N * k routed
(token, memory) pairs only, sorted by memory (torch's grouped GEMM: offsets on the device, no host sync, no group
padded to a common length; only a row's width is padded to 16 bytes). That is k / M of the routed FLOPs of
projecting every token for every memory. The gathered hidden rows are not kept for the backward: it gathers them
again. Where the grouped GEMM would need a host sync (CUDA dtypes other than bf16, GPUs other than sm90 / sm100,
torch < 2.10) every token is projected for every memory instead (rows n * M + m), the same dispatch reading the rows
it needs.

On one TP rank the router's rows ride on the dense GEMM too (`project(router=...)`): xd ends in router columns, the
logits that chose the memories (fp32, computed without gradient) come back from the dispatch with their gradient
routed into those columns, and the dense GEMM's backward turns it into the gradients of x and of the router's weight.
The router then has no backward GEMMs of its own, and x's gradient is not the sum of two tensors (0.28 ms of a 19 ms
MoM layer at 32768 tokens, hidden 2048, H100).

`dispatch` then copies the pieces into the packed slots: slot s = slot_of[n, j] of token n's j-th memory gets

    q[s] = q of token n,  k[s], v[s], a[s], beta[s] = that memory's (routed: row row_of[n, j] of yr; shared: xd's)

One program per (token, head) reads the token's q once and writes its k' slots; the gate is copied per token. Its
backward writes each input gradient element once (no zero fill of xd's gradient, no atomics): q's gradient is the sum
of the token's k' slot gradients. `naive_dispatch` is the definition (torch index ops) and the CPU path.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from linear_moe.kernels.common import stable_sort_small, use_triton
from linear_moe.kernels.mom_combine import combine


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
    logits: torch.Tensor | None = None
    """[N, M] fp32 router logits whose gradient flows through xd's router columns (None without them)."""


@triton.jit
def dispatch_fwd_kernel(xd, yr, slot, row, gate, q, k, v, a, beta, H, XS, UD, YS,
                        K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, DM: tl.constexpr, KR: tl.constexpr,
                        SHARED: tl.constexpr, HAS_BETA: tl.constexpr,
                        BK: tl.constexpr, BG: tl.constexpr, BV: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    dense = xd + n * XS + h * UD
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = tl.load(dense + o_k, mask=m_k)
    if G > 0:
        o_g = tl.arange(0, BG)
        m_g = o_g < G
        tl.store(gate + (n * H + h) * G + o_g, tl.load(dense + K + o_g, mask=m_g), mask=m_g)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    for j in tl.static_range(KR + SHARED):
        s = tl.load(slot + n * (KR + SHARED) + j).to(tl.int64)
        if j < KR:
            src = yr + tl.load(row + n * KR + j).to(tl.int64) * YS + h * DM
        else:
            src = dense + K + G
        tl.store(q + (s * H + h) * K + o_k, b_q, mask=m_k)
        tl.store(k + (s * H + h) * K + o_k, tl.load(src + o_k, mask=m_k), mask=m_k)
        tl.store(v + (s * H + h) * V + o_v, tl.load(src + K + o_v, mask=m_v), mask=m_v)
        tl.store(a + s * H + h, tl.load(src + K + V))
        if HAS_BETA:
            tl.store(beta + s * H + h, tl.load(src + K + V + 1))


@triton.jit
def dispatch_bwd_kernel(slot, row, dgate, dq, dk, dv, da, dbeta, dxd, dyr, H, XS, UD, YS,
                        K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, DM: tl.constexpr, KR: tl.constexpr,
                        SHARED: tl.constexpr, HAS_BETA: tl.constexpr, HAS_DG: tl.constexpr, HAS_DQ: tl.constexpr,
                        HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_DA: tl.constexpr, HAS_DB: tl.constexpr,
                        BK: tl.constexpr, BG: tl.constexpr, BV: tl.constexpr):
    """Each (token, head) row of dxd and each routed row of dyr written once; a gradient that did not arrive (HAS_*
    False) reads as zeros. The router columns that may end a row of dxd (from XS = H * UD on) are not written."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    dense = dxd + n * XS + h * UD
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    acc = tl.zeros([BK], dtype=tl.float32)
    for j in tl.static_range(KR + SHARED):
        s = tl.load(slot + n * (KR + SHARED) + j).to(tl.int64)
        if HAS_DQ:
            acc += tl.load(dq + (s * H + h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        if j < KR:
            dst = dyr + tl.load(row + n * KR + j).to(tl.int64) * YS + h * DM
        else:
            dst = dense + K + G
        # copies pass through fp32 exactly
        b_k = tl.zeros([BK], dtype=tl.float32)
        if HAS_DK:
            b_k = tl.load(dk + (s * H + h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        tl.store(dst + o_k, b_k.to(dxd.dtype.element_ty), mask=m_k)
        b_v = tl.zeros([BV], dtype=tl.float32)
        if HAS_DV:
            b_v = tl.load(dv + (s * H + h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        tl.store(dst + K + o_v, b_v.to(dxd.dtype.element_ty), mask=m_v)
        b_a = tl.zeros([], dtype=tl.float32)
        if HAS_DA:
            b_a = tl.load(da + s * H + h).to(tl.float32)
        tl.store(dst + K + V, b_a.to(dxd.dtype.element_ty))
        if HAS_BETA:
            b_b = tl.zeros([], dtype=tl.float32)
            if HAS_DB:
                b_b = tl.load(dbeta + s * H + h).to(tl.float32)
            tl.store(dst + K + V + 1, b_b.to(dxd.dtype.element_ty))
    tl.store(dense + o_k, acc.to(dxd.dtype.element_ty), mask=m_k)
    if G > 0:
        o_g = tl.arange(0, BG)
        m_g = o_g < G
        b_g = tl.zeros([BG], dtype=tl.float32)
        if HAS_DG:
            b_g = tl.load(dgate + (n * H + h) * G + o_g, mask=m_g, other=0.0).to(tl.float32)
        tl.store(dense + K + o_g, b_g.to(dxd.dtype.element_ty), mask=m_g)


def _blocks(K: int, V: int, G: int) -> dict[str, int]:
    return {"BK": triton.next_power_of_2(K), "BG": triton.next_power_of_2(max(G, 1)),
            "BV": triton.next_power_of_2(V)}


class DispatchFunction(torch.autograd.Function):
    """xd [N, XS]: per head UD dense columns, then (XS > H * UD) router columns whose gradient is the router logits'
    (`logits` [N, M], passed through unchanged: the forward's fp32 values, the gradient path of xd's columns)."""

    @staticmethod
    def forward(ctx, xd, yr, slot_of, row_of, H, K, V, G, has_beta, logits):
        N, KP = slot_of.shape
        KR = row_of.shape[1]
        S = N * KP
        yr_shape, xd_shape = yr.shape, xd.shape
        xd, slot_of, row_of = xd.reshape(N, -1).contiguous(), slot_of.contiguous(), row_of.contiguous()
        yr = yr.flatten(1).contiguous()
        DM = K + V + 1 + has_beta
        UD = K + G + (KP - KR) * DM
        new = functools.partial(torch.empty, dtype=xd.dtype, device=xd.device)
        gate = new(N, H, G) if G else None
        q, k, v, a = new(S, H, K), new(S, H, K), new(S, H, V), new(S, H)
        beta = new(S, H) if has_beta else None
        # absent outputs get a stand-in pointer that the kernel never touches
        dispatch_fwd_kernel[(N, H)](xd, yr, slot_of, row_of, xd if gate is None else gate, q, k, v, a,
                                    xd if beta is None else beta, H, xd.shape[1], UD, yr.shape[1], K=K, V=V, G=G,
                                    DM=DM, KR=KR, SHARED=KP - KR, HAS_BETA=has_beta, **_blocks(K, V, G))
        ctx.save_for_backward(slot_of, row_of)
        ctx.dims = (xd_shape, yr_shape, xd.dtype, H, K, V, G, UD, has_beta)
        # unused outputs (beta of a layer without it, ...) give None, read as zeros by the kernel: no zero tensors
        ctx.set_materialize_grads(False)
        return gate, q, k, v, a, beta, None if logits is None else logits.clone()

    @staticmethod
    def backward(ctx, dgate, dq, dk, dv, da, dbeta, dlogits):
        slot_of, row_of = ctx.saved_tensors
        xd_shape, yr_shape, dtype, H, K, V, G, UD, has_beta = ctx.dims
        N, KP = slot_of.shape
        KR = row_of.shape[1]
        # the kernel writes every element of dxd but the router columns and the routed rows of dyr; the rest of dyr
        # must be zero: rows that no slot reads (when every token was projected for every memory) and the columns
        # that pad a row
        dxd = torch.empty(N, xd_shape[1:].numel(), dtype=dtype, device=slot_of.device)
        if dxd.shape[1] > H * UD:
            M = dlogits.shape[1] if dlogits is not None else 0
            if dlogits is not None:
                dxd[:, H * UD:H * UD + M] = dlogits
            dxd[:, H * UD + M:] = 0
        R, YS = yr_shape[0], yr_shape[1:].numel()
        DM = K + V + 1 + has_beta
        if R > N * KR:
            dyr = torch.zeros(R, YS, dtype=dtype, device=slot_of.device)
        else:
            dyr = torch.empty(R, YS, dtype=dtype, device=slot_of.device)
            if YS > H * DM:
                dyr[:, H * DM:] = 0
        grads = [dgate, dq, dk, dv, da, dbeta]
        dispatch_bwd_kernel[(N, H)](slot_of, row_of, *(dxd if t is None else t.contiguous() for t in grads), dxd,
                                    dyr, H, dxd.shape[1], UD, YS, K=K, V=V, G=G, DM=DM, KR=KR,
                                    SHARED=KP - KR, HAS_BETA=has_beta, HAS_DG=dgate is not None,
                                    HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None,
                                    HAS_DA=da is not None, HAS_DB=dbeta is not None, **_blocks(K, V, G))
        return dxd.view(xd_shape), dyr.view(yr_shape), None, None, None, None, None, None, None, None


def naive_dispatch(xd: torch.Tensor, yr: torch.Tensor, slot_of: torch.Tensor, row_of: torch.Tensor, *, heads: int,
                   k_dim: int, v_dim: int, has_gate: bool, has_beta: bool, logits: torch.Tensor | None = None
                   ) -> DispatchedTokens:
    """The definition: each slot's (token, memory) rows gathered by torch indexing; `logits` keep their values and
    take the gradient of xd's router columns (straight through)."""
    N, kp = slot_of.shape
    K, V, G = k_dim, v_dim, v_dim if has_gate else 0
    dm = K + V + 1 + int(has_beta)
    ud = K + G + dm * (kp - row_of.shape[1])
    xd = xd.reshape(N, -1)
    if logits is not None:
        cols = xd[:, heads * ud:heads * ud + logits.shape[1]].float()
        logits = logits + (cols - cols.detach())
    q, gate, shared = xd[:, :heads * ud].reshape(N, heads, ud).split([K, G, dm * (kp - row_of.shape[1])], dim=-1)
    # [N, k', H, dm]: the routed memories' rows, then the shared memory's
    mem = yr.flatten(1)[:, :heads * dm].reshape(-1, heads, dm)[row_of]
    if kp > row_of.shape[1]:
        mem = torch.cat([mem, shared[:, None]], dim=1)
    # the (token, j) pair of each slot
    pair = slot_of.reshape(-1).argsort()
    rows = mem.reshape(N * kp, heads, dm)[pair]  # [S, H, dm]
    return DispatchedTokens(gate.contiguous() if G else None, q.index_select(0, pair // kp),
                            rows[..., :K].contiguous(), rows[..., K:K + V].contiguous(), rows[..., K + V].contiguous(),
                            rows[..., K + V + 1].contiguous() if has_beta else None, logits)


def router_columns(num_memories: int) -> int:
    """Columns that end each row of xd when the router rides on the dense GEMM: M, padded to 16 bytes of bf16."""
    return -(-num_memories // 8) * 8


def dispatch(xd: torch.Tensor, yr: torch.Tensor, slot_of: torch.Tensor, row_of: torch.Tensor, *, heads: int,
             k_dim: int, v_dim: int, has_gate: bool, has_beta: bool, logits: torch.Tensor | None = None,
             backend: str | None = None) -> DispatchedTokens:
    """xd [N, H * UD] or [N, H, UD] dense projections (q K, [gate V], then the shared memory's k K, v V, a 1, [beta 1]
    when there is one), yr [R, H * DM] routed rows (k K, v V, a 1, [beta 1]; 2-D rows may end in padding); slot_of
    [N, k'] the packed slot of token n's j-th memory (a permutation of the S = N * k' slots; with a shared memory its
    column is the last); row_of [N, k] the yr row of token n's j-th routed memory -> DispatchedTokens(gate [N, H, V]
    | None, q [S, H, K], k [S, H, K], v [S, H, V], a [S, H], beta [S, H] | None, logits).

    With router logits [N, M] (fp32, computed without gradient for the routing), xd is [N, H * UD + C] (C =
    `router_columns(M)`), its first M extra columns the same logits from the dense GEMM: the returned logits keep the
    given values and pass their gradient to those columns, so the router's gradient comes out of the dense GEMM's
    backward (no GEMMs of its own, no sum of two gradients of x).
    """
    K, V, G = k_dim, v_dim, v_dim if has_gate else 0
    dm = K + V + 1 + int(has_beta)
    N = slot_of.shape[0] if slot_of.dim() == 2 else -1
    shared = slot_of.shape[-1] - row_of.shape[-1]
    ud = K + G + shared * dm
    widths = ((heads * ud,), (heads, ud)) if logits is None else ((heads * ud + router_columns(logits.shape[1]),),)
    if (slot_of.dim() != 2 or row_of.dim() != 2 or row_of.shape[0] != N or shared not in (0, 1)
            or xd.dim() not in (2, 3) or xd.shape[0] != N or tuple(xd.shape[1:]) not in widths
            or logits is not None and (logits.dim() != 2 or logits.shape[0] != N)
            or not (yr.dim() == 2 and yr.shape[1] >= heads * dm or yr.dim() == 3 and yr.shape[1:] == (heads, dm))):
        raise ValueError(f"dispatch takes xd [N, H * {ud}] (+ router columns with logits [N, M]) and yr "
                         f"[R, H * {dm} (+ padding)] with H={heads} (K={K}, V={V}, gate={has_gate}, beta={has_beta}), "
                         f"slot_of [N, k'] and row_of [N, k] with k' = k or k + 1, got {tuple(xd.shape)}, "
                         f"{tuple(yr.shape)}, {tuple(slot_of.shape)}, {tuple(row_of.shape)}, logits "
                         f"{None if logits is None else tuple(logits.shape)}")
    if use_triton(xd, backend):
        return DispatchedTokens(*DispatchFunction.apply(xd, yr, slot_of, row_of, heads, K, V, G, has_beta, logits))
    return naive_dispatch(xd, yr, slot_of, row_of, heads=heads, k_dim=K, v_dim=V, has_gate=has_gate,
                          has_beta=has_beta, logits=logits)


class Layout(NamedTuple):
    """Where a projection unit (one per head) keeps its parts: q K, [gate V], then memories 0..M-1 (the routed ones)
    and the shared one last, each k K, v V, a 1, [beta 1] (dm columns)."""

    heads: int
    lead: int
    """q and gate columns."""
    routed: int
    """M, the routed memories."""
    dm: int
    pad: int
    """Zero rows that end the routed weights, so that the grouped GEMM's rows start on 16 bytes."""
    router: int = 0
    """Rows of the router's weight that end the dense rows, then zero rows up to `router_columns` (0: no router)."""


def _split(weight: torch.Tensor, lay: Layout, router_w: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit-laid-out weight [H * unit, h] (and the router's [M, h]) -> dense rows [H * UD (+ C), h] (q, [gate],
    [shared memory] per head, [the router's rows and zero rows]) and routed rows [M, H * dm + pad, h], head-major
    within each: one copy each (the padding rows zeroed, not copied)."""
    H, M, dm, h = lay.heads, lay.routed, lay.dm, weight.shape[-1]
    w = weight.view(H, -1, h)
    end = lay.lead + M * dm
    ud = w.shape[1] - M * dm
    dense = weight.new_empty(H * ud + (router_columns(lay.router) if lay.router else 0), h)
    heads = dense[:H * ud].view(H, ud, h)
    heads[:, :lay.lead] = w[:, :lay.lead]
    heads[:, lay.lead:] = w[:, end:]
    if lay.router:
        dense[H * ud:H * ud + lay.router] = router_w
        dense[H * ud + lay.router:] = 0
    routed = weight.new_empty(M, H * dm + lay.pad, h)
    routed[:, H * dm:].zero_()
    routed[:, :H * dm].view(M, H, dm, h).copy_(w[:, lay.lead:end].view(H, M, dm, h).transpose(0, 1))
    return dense, routed


class ProjectFunction(torch.autograd.Function):
    """x [N, h] -> xd [N, H * UD (+ C)] (every token: q, [gate], [shared memory], [router logits: see `dispatch`]) and
    the routed rows yr.

    Grouped (src given): yr [N * k, H * dm + pad], row r = x[src[r]] @ w_routed[m]^T for the rows of memory m,
    offs[m - 1] <= r < offs[m], one grouped GEMM (torch's; offsets on the device). The gathered rows live only inside
    each pass (the backward gathers them again); the weight's dense and routed copies are kept for the backward (50 MB
    at hidden 2048, 4 heads x 256, M = 4; copying them again cost more time than they take room). x's gradient sums
    each token's k rows through row_of [N, k] (no atomics), then adds the dense part in the same GEMM. Otherwise
    yr [N * M, H * dm], row n * M + m: every token for every memory."""

    @staticmethod
    def forward(ctx, x, weight, router_w, src, row_of, offs, lay, backend):
        w_dense, w_routed = _split(weight, lay, router_w)
        xd = x @ w_dense.t()
        if src is not None:
            yr = F.grouped_mm(x.index_select(0, src), w_routed.transpose(1, 2), offs=offs)
        else:
            yr = (x @ w_routed.flatten(0, 1).t()).view(-1, w_routed.shape[1])
        ctx.save_for_backward(x, w_dense, w_routed, src, row_of, offs)
        ctx.weight_meta = weight.shape, weight.dtype, None if router_w is None else router_w.dtype
        ctx.lay, ctx.backend = lay, backend
        return xd, yr

    @staticmethod
    def backward(ctx, dxd, dyr):
        x, w_dense, w_routed, src, row_of, offs = ctx.saved_tensors
        lay = ctx.lay
        N, h = x.shape
        H, M, dm = lay.heads, lay.routed, lay.dm
        dxd, dyr = dxd.contiguous(), dyr.contiguous()
        dx = dw = d_router = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # every element written once: no zero fill
            shape, dtype, router_dtype = ctx.weight_meta
            dw = torch.empty(H, shape[0] // H, h, dtype=dtype, device=x.device)
            end = lay.lead + M * dm
            ud = dw.shape[1] - M * dm
            d_dense = dxd.t() @ x
            heads = d_dense[:H * ud].view(H, ud, h)
            dw[:, :lay.lead] = heads[:, :lay.lead]
            dw[:, end:] = heads[:, lay.lead:]
            if lay.router and ctx.needs_input_grad[2]:
                d_router = d_dense[H * ud:H * ud + lay.router].to(router_dtype)
            del d_dense, heads
            if src is not None:
                # before x's gradient: the gathered rows are freed before the rows' gradient is allocated
                d_routed = F.grouped_mm(dyr.t(), x.index_select(0, src), offs=offs)
            else:
                d_routed = (dyr.view(N, -1).t() @ x).view(M, -1, h)
            dw[:, lay.lead:end].view(H, M, dm, h).copy_(d_routed[:, :H * dm].view(M, H, dm, h).transpose(0, 1))
            dw = dw.view(shape)
        if ctx.needs_input_grad[0]:
            if src is not None:
                drows = F.grouped_mm(dyr, w_routed, offs=offs)
                ones = torch.ones(row_of.shape, dtype=torch.float32, device=x.device)
                dx = combine(drows, ones, row_of, backend=ctx.backend)
            else:
                dx = dyr.view(N, -1) @ w_routed.flatten(0, 1)
            dx.addmm_(dxd, w_dense)
        return dx, dw, d_router, None, None, None, None, None


def grouped_gemm_ok(x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs on x's device and dtype without a host sync: its CUDA kernels take bf16 on
    sm90 / sm100 (elsewhere on CUDA it reads the offsets on the host); on CPU it loops over groups there."""
    if not hasattr(F, "grouped_mm"):
        return False
    if not x.is_cuda:
        return True
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def project(x: torch.Tensor, weight: torch.Tensor, slot_of: torch.Tensor, memories: torch.Tensor, *, heads: int,
            k_dim: int, v_dim: int, num_memories: int, has_gate: bool, has_beta: bool, shared: bool,
            router: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str | None = None) -> DispatchedTokens:
    """Hidden states x [N, h] -> the dispatched pieces (see `dispatch`). weight [H * unit, h] holds one unit per head
    (`Layout`: q, [gate], then the num_memories routed memories and the `shared` one last); slot_of, memories [N, k']
    as in routing (the shared memory's column last, its index num_memories). Each token is projected densely for q,
    the gate and the shared memory and, for its k routed memories only, by the grouped GEMM.

    router: (its weight [M, h], the logits [N, M] fp32 that routed x, computed without gradient): the router's rows
    join the dense GEMM, and the returned `logits` carry the router's gradient through it (see `dispatch`)."""
    N, h = x.shape
    M = num_memories
    dm = k_dim + v_dim + 1 + int(has_beta)
    lead = k_dim + (v_dim if has_gate else 0)
    unit = lead + (M + int(shared)) * dm
    k = slot_of.shape[1] - int(shared)
    router_w, logits = router if router is not None else (None, None)
    if (weight.shape != (heads * unit, h) or memories.shape != slot_of.shape or slot_of.shape[0] != N
            or router is not None and (router_w.shape != (M, h) or logits.shape != (N, M))):
        raise ValueError(f"project takes x [N, h], weight [H * unit, h] with H={heads}, unit={unit} (K={k_dim}, "
                         f"V={v_dim}, {M} routed memories, shared={shared}, gate={has_gate}, beta={has_beta}), "
                         f"slot_of and memories [N, k'], got {tuple(x.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(slot_of.shape)}, {tuple(memories.shape)}; router weight [M, h] and logits [N, M] "
                         f"or none, got {None if router is None else (tuple(router_w.shape), tuple(logits.shape))}")
    nr = 0 if router is None else M
    routed = memories[:, :k]
    if grouped_gemm_ok(x):
        flat = routed.reshape(-1)
        # routed pairs sorted by memory, in token order within one: row r holds pair src_pair[r] = n * k + j
        src_pair = stable_sort_small(flat, M)[1]
        row_of = torch.empty_like(src_pair).scatter_(0, src_pair, torch.arange(N * k, device=x.device)).view(N, k)
        offs = torch.zeros(M, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        lay = Layout(heads, lead, M, dm, -heads * dm % (16 // x.element_size()), nr)
        xd, yr = ProjectFunction.apply(x, weight, router_w, src_pair // k, row_of, offs.cumsum(0).to(torch.int32),
                                       lay, backend)
    else:
        row_of = torch.arange(N, device=x.device)[:, None] * M + routed
        xd, yr = ProjectFunction.apply(x, weight, router_w, None, None, None, Layout(heads, lead, M, dm, 0, nr),
                                       backend)
    return dispatch(xd, yr, slot_of, row_of, heads=heads, k_dim=k_dim, v_dim=v_dim, has_gate=has_gate,
                    has_beta=has_beta, logits=logits, backend=backend)
