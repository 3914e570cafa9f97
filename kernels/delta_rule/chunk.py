"""Chunked delta rule (DeltaNet / gated DeltaNet) in Triton: forward and backward.

Within a chunk of BT steps with cumulative log gate G (gamma = exp(G), Gl = G at the chunk's last step), state h
entering the chunk, q already scaled:
    A = strict_lower(beta_i k_i.k_j exp(G_i - G_j)),   T = (I + A)^-1       (WY representation)
    w = T (beta gamma k),   u = T (beta v),   v_new = u - w h
    o = gamma q h + (q k^T * decay mask) v_new,   h_next = exp(Gl) h + (k exp(Gl - G))^T v_new

Every sequence layout is handled as varlen: a dense [B, T] batch is [1, B*T] with offsets 0, T, 2T, ... Kernels that
work per chunk run over an upper bound of chunks and read their (sequence, chunk) from a device-side table, so the
varlen path has no host sync. Plain DeltaNet is the gated rule with G = 0. Without beta (`chunk_scalar_decay`, the
GLA family's scalar decay) the same kernels skip the WY transform: u = v, w = 0 (constexpr DELTA). Hopper notes
(Triton 3.4-3.7.0 miscompiles): no kernel feeds `tl.trans` of a `tl.dot` result into another `tl.dot` (transposed
products are recomputed from loaded tiles, or written to memory and read back transposed); there is one kernel set for gated and
plain DeltaNet, the gated one, because the ungated specialisation came out wrong on an H100 at head dim 256; and the
state kernels keep their loads in the order the H100 tests passed with (see `chunk_delta_rule_bwd_kernel_dh`).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from linear_moe.kernels.common import dot_precision, sm_count, use_triton
from linear_moe.kernels.delta_rule.naive import torch_chunk_delta_rule, validate_delta_rule_inputs
from linear_moe.kernels.norms import l2norm

# tests set this to poison every torch.empty buffer with NaN, so an unwritten element cannot pass unnoticed
DEBUG_POISON = os.environ.get("LINEAR_MOE_POISON", "0") == "1"


# Launch settings per kernel: (num_warps, num_stages). Stages None: 3 for 16-bit inputs, 2 for fp32 (fp32 tiles are
# twice as large); for the state kernels h and dh, STATE_LAUNCH. `benchmarks/profile_gpu.py kernels` varies these.
LAUNCH: dict[str, tuple[int, int | None]] = {
    "wy": (4, None), "h": (4, None), "o": (4, None), "dh": (4, None), "dqkw": (4, None), "bwd_wy": (4, None),
}
# where K <= 128 takes other settings: o in two warps, 0.40 -> 0.35 ms at B4 x T8192 and B16 x T2048, H16 x D128
# (H100, Triton 3.6; at K = 256 two warps cost 0.21 -> 0.23 ms, and one warp, or two for the other per-chunk kernels,
# took 1.4-20x longer)
LAUNCH_K128: dict[str, tuple[int, int | None]] = {"o": (2, None)}
# The state kernels h and dh hold a [K, BV] fp32 state beside [BT, K] tiles and walk a sequence's chunks in order,
# one program per (sequence, head, V-block). Per kernel and K bucket (<= 128, 256), (V-block, stages) options for
# 16-bit inputs (fp32: one stage): a launch takes the first that gives every SM a program, else the last (the one for
# launches too short of programs to hide load latency). Two stages load the next chunk's tiles during this chunk's
# products. H100, Triton 3.6, kernel ms per fwd+bwd:
# - h at K = 256: (64, 2) 0.46 against 0.72 at (32, 1) for B16 x T2048 x H4 (256 programs at BV 64), 1.40 against
#   2.13 at MoM's packing (98304 slots, 80 segments); (32, 2) 0.62 against 1.15 at (32, 1) and 0.72 at (64, 2) for
#   B4 x T8192 x H4 (64 programs at BV 64).
# - dh at K = 256: two stages need 238 KB of shared memory at BV 32 when dh reads the forward's q.k scores (over the
#   H100's 227 KB; sm_90, 16-byte aligned pointers), so in two stages it recomputes them from its k and q tiles
#   (217 KB). That pays only with few programs: 0.57 against 0.80 ms at B4 x T8192 x H4 (128 programs), but 0.59
#   against 0.51 at B16 x T2048 and 1.70 against 1.55 at MoM's packing, where the one-stage dh reading the scores is
#   kept.
# - At K = 128 two stages cut h and dh by 30% (B4 x T8192, H16); dh in three stages: 0.43 -> 0.36 ms at B16 x T2048
#   x H16 (h: 0.58 either way). Without the delta correction dh keeps two stages (its last option, see `_dh_launch`):
#   three were not run on an H100 there.
STATE_LAUNCH: dict[str, dict[int, list[tuple[int, int]]]] = {
    "h": {128: [(64, 2)], 256: [(64, 2), (32, 2)]},
    "dh": {128: [(64, 3), (64, 2)], 256: [(32, 1), (32, 2)]},
}
# dh recomputes the scores when it runs in two stages at K above this (the tests lower it to cover that path)
DH_RECOMPUTE_ABOVE_K = 128


def _launch(name: str, dtype: torch.dtype, K: int | None = None) -> dict[str, int]:
    warps, stages = LAUNCH_K128[name] if K is not None and K <= 128 and name in LAUNCH_K128 else LAUNCH[name]
    if stages is None:
        stages = 2 if dtype == torch.float32 else 3
    return {"num_warps": warps, "num_stages": stages}


def _state_launch(name: str, dtype: torch.dtype, KP: int, BV: int, V: int, rows: int, device: torch.device
                  ) -> tuple[int, dict[str, int]]:
    """(V-block, launch settings) of state kernel `name` ("h" or "dh") at K padded to KP, block_v BV and value dim
    V, over `rows` (sequence, head) pairs."""
    options = STATE_LAUNCH[name][128 if KP <= 128 else 256]
    bv, stages = next(((b, st) for b, st in options if rows * triton.cdiv(V, min(BV, b)) >= sm_count(device)),
                      options[-1])
    warps, fixed = LAUNCH[name]
    stages = fixed if fixed is not None else 1 if dtype == torch.float32 else stages
    return min(BV, bv), {"num_warps": warps, "num_stages": stages}


def _dh_launch(d: Dims, dtype: torch.dtype, device: torch.device, delta: bool) -> tuple[int, dict[str, int], bool]:
    """The dh kernel's V-block and launch (chosen over all heads; the head groups keep it), and whether it recomputes
    the q.k scores (see STATE_LAUNCH): the forward then need not keep them.

    Without the delta correction dh always takes the last option: at K = 256 its one-stage form reading the scores
    faulted on the H100 (illegal address, Triton 3.6, B8 and B16 x T2048 x H4), while the two-stage one that
    recomputes them matched the reference (the delta rule's one-stage form does)."""
    BV, launch = _state_launch("dh", dtype, d.KP, d.BV, d.V, d.S * d.H if delta else 0, device)
    return BV, launch, launch["num_stages"] > 1 and d.KP > DH_RECOMPUTE_ABOVE_K


def _empty(*shape, dtype, device):
    x = torch.empty(*shape, dtype=dtype, device=device)
    if DEBUG_POISON:
        x.fill_(float("nan"))
    return x


@triton.jit
def _tile(base, R, C, sr, sc, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of a [BR, BC] tile at (r0, c0) of an [R, C] matrix with strides (sr, sc)."""
    o_r = r0 + tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BC)
    return base + o_r[:, None] * sr + o_c[None, :] * sc, (o_r[:, None] < R) & (o_c[None, :] < C)


@triton.jit
def _merge_level(b_T, b_A, o_i, lvl: tl.constexpr, PREC: tl.constexpr):
    """D, the inverse of (I + A)'s block diagonal at block size s = 2^lvl, to that at 2s: D - D L D, where L is A's
    lower-left s x s block inside each 2s block ((D L)^2 = 0)."""
    pair = (o_i[:, None] // (2 << lvl)) == (o_i[None, :] // (2 << lvl))
    lower_left = ((o_i[:, None] // (1 << lvl)) % 2 == 1) & ((o_i[None, :] // (1 << lvl)) % 2 == 0)
    b_L = tl.where(pair & lower_left, b_A, 0.0)
    return b_T - tl.dot(tl.dot(b_T, b_L, input_precision=PREC), b_T, input_precision=PREC)


@triton.jit
def _unit_lower_inverse(b_A, BT: tl.constexpr, LOG_BT: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^-1 for strictly lower A [BT, BT] in fp32, by blocks (no row-by-row loop): the inverse of the block
    diagonal at block size 2 needs no product ([[1, 0], [a, 1]] inverts to [[1, 0], [-a, 1]]); `_merge_level`
    doubles the block size up to BT, two products a level. Up to block size 16 the merges multiply A's diagonal
    16 x 16 blocks as one batch ([BT / 16, 16, 16] products, a 16th of the [BT, BT] ones' work at BT = 64): the
    forward's wy kernel took 0.65 instead of 0.84 ms at B4 x T8192 x H16 x D128 and 0.29 instead of 0.33 ms at H4 x
    D256 (H100, Triton 3.6).

    Powers of A would take fewer levels but lose every digit: with correlated keys (a short conv makes neighbours
    alike) their entries grow like binomial coefficients (C(15, 7) = 6435 within 16 steps, ~1e17 at BT = 64) while
    the inverse stays O(1). The merges only multiply O(1) matrices, so tf32 products are as accurate as three-pass
    ones on powers within 16-row blocks were (the scheme before 2026-11-26, 37% slower at H16 x D128 on the H100:
    fp32 reference errors equal to three digits)."""
    NB: tl.constexpr = BT // 16
    o_b = tl.arange(0, NB)
    o_j = tl.arange(0, 16)
    same_block = o_b[:, None, None, None] == o_b[None, None, :, None]
    b_Ad = tl.sum(tl.where(same_block, tl.reshape(b_A, (NB, 16, NB, 16)), 0.0), axis=2)
    b_T = tl.where(o_j[:, None] == o_j[None, :], 1.0, 0.0)[None, :, :] + tl.zeros([NB, 16, 16], dtype=tl.float32)
    b_T -= tl.where(((o_j[:, None] % 2 == 1) & (o_j[None, :] == o_j[:, None] - 1))[None, :, :], b_Ad, 0.0)
    for lvl in tl.static_range(1, 4):
        b_T = _merge_level(b_T, b_Ad, o_j, lvl, PREC)
    b_T = tl.reshape(tl.where(same_block, tl.broadcast_to(tl.expand_dims(b_T, 2), (NB, 16, NB, 16)), 0.0), (BT, BT))
    o_i = tl.arange(0, BT)
    for lvl in tl.static_range(4, LOG_BT):
        b_T = _merge_level(b_T, b_A, o_i, lvl, PREC)
    return b_T


@triton.jit
def _chunk_lookup(chunk_info, cu_seqlens, i_c):
    n = tl.load(chunk_info + i_c * 2).to(tl.int32)
    i_t = tl.load(chunk_info + i_c * 2 + 1).to(tl.int32)
    bos = tl.load(cu_seqlens + n).to(tl.int32)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int32)
    return n, i_t, bos, eos - bos


@triton.jit
def _load_gates(G, bos, T, i_t, i_h, H: tl.constexpr, BT: tl.constexpr):
    """Cumulative log gate of the chunk [BT] and its value at the chunk's last step, which rows beyond the sequence
    repeat (as the forward's cumsum of zero-padded gates gives): a row past the end paired with a valid one then has
    a decay factor exp(G_i - G_j) within the chunk's real range, where a 0 there would overflow exp to inf once the
    chunk's decay passes -88 and turn the tile products' 0 * inf into NaN in valid rows."""
    o_t = i_t * BT + tl.arange(0, BT)
    last = tl.minimum(i_t * BT + BT, T) - 1
    b_Gl = tl.load(G + (bos + last) * H + i_h)
    b_G = tl.load(G + (bos + o_t) * H + i_h, mask=o_t < T, other=0.0)
    return tl.where(o_t < T, b_G, b_Gl), b_Gl


@triton.jit
def chunk_delta_rule_fwd_kernel_wy(
    k, v, beta, g, G, w, u, Ti,
    cu_seqlens, chunk_info, N, hb,
    H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, LOG_BT: tl.constexpr, STORE_T: tl.constexpr, DELTA: tl.constexpr,
):
    """For the HS heads from hb: the cumulative gates G per chunk, and (DELTA) w, u; with STORE_T also
    T = (I + A)^-1 (fp32) for the backward's WY kernel, which reads it and its transpose from memory. w, u and T are
    the head group's own tensors in the chunk layout (see `_local`)."""
    i_c, i_hs = tl.program_id(0), tl.program_id(1)
    i_h = hb + i_hs
    n, i_t, bos, T = _chunk_lookup(chunk_info, cu_seqlens, i_c)
    if n >= N:
        return
    cbos = (i_c - i_t) * BT
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    if DELTA:
        b_beta = tl.load(beta + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_G = tl.cumsum(b_g, 0)
    tl.store(G + (bos + o_t) * H + i_h, b_G, mask=m_t)
    if DELTA:
        _wy_chunk(k, v, b_beta, w, u, Ti, b_G, bos, cbos, T, i_t, i_h, i_hs, H, HS, K, V, BT, BK, BV, PREC, LOG_BT,
                  STORE_T)


@triton.jit
def _wy_chunk(k, v, b_beta, w, u, Ti, b_G, bos, cbos, T, i_t, i_h, i_hs, H: tl.constexpr, HS: tl.constexpr,
              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              PREC: tl.constexpr, LOG_BT: tl.constexpr, STORE_T: tl.constexpr):
    """w = T (beta gamma k) and u = T (beta v) of one chunk of head i_h, T = (I + A)^-1 (stored with STORE_T); w, u
    and T in the head group's chunk layout (rows from cbos, head i_hs of HS)."""
    o_i = tl.arange(0, BT)
    # A = strict_lower(beta_i k_i.k_j exp(G_i - G_j))
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_k, m_k = _tile(k + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    m_strict = o_i[:, None] > o_i[None, :]
    b_A = tl.where(m_strict, b_A * b_beta[:, None] * tl.exp(b_G[:, None] - b_G[None, :]), 0.0)
    b_T = _unit_lower_inverse(b_A, BT, LOG_BT, PREC)
    if STORE_T:
        p_T, m_T = _tile(Ti + (cbos * HS + i_hs) * BT, T, BT, HS * BT, 1, i_t * BT, 0, BT, BT)
        tl.store(p_T, b_T, mask=m_T)
    b_Tc = b_T.to(k.dtype.element_ty)
    b_bg = b_beta * tl.exp(b_G)
    for i_k in range(tl.cdiv(K, BK)):
        p_k, m_k = _tile(k + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_w, m_w = _tile(w + (cbos * HS + i_hs) * K, T, K, HS * K, 1, i_t * BT, i_k * BK, BT, BK)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_kb = (b_k * b_bg[:, None]).to(b_k.dtype)
        b_w = tl.dot(b_Tc, b_kb, input_precision=PREC)
        tl.store(p_w, b_w.to(p_w.dtype.element_ty), mask=m_w)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_v = _tile(v + (bos * H + i_h) * V, T, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        p_u, m_u = _tile(u + (cbos * HS + i_hs) * V, T, V, HS * V, 1, i_t * BT, i_v * BV, BT, BV)
        b_v = tl.load(p_v, mask=m_v, other=0.0)
        b_vb = (b_v * b_beta[:, None]).to(b_v.dtype)
        b_u = tl.dot(b_Tc, b_vb, input_precision=PREC)
        tl.store(p_u, b_u.to(p_u.dtype.element_ty), mask=m_u)


@triton.jit
def chunk_delta_rule_fwd_kernel_h(
    k, w, u, G, h, v_new, h0, ht, mid,
    cu_seqlens, cu_chunks, order, hb, vb, S,
    H: tl.constexpr, HS: tl.constexpr, VH: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, PARTS: tl.constexpr, MIDS: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, DELTA: tl.constexpr,
):
    """The states entering each chunk, h [NT, HS, K, V], and (DELTA) v_new = u - w h, for the HS heads hb, hb + 1,
    ... (a head group); programs take the segments in `order` (longest first). w is the group's, in the chunk layout
    (`_local`); u and v_new have VH heads, the group's (VH = HS, vb = 0, chunk layout) or, without DELTA (u is v, no
    w), all (VH = H, vb = hb, token layout). The segments are parts of PARTS per sequence (`_parts`): h0 and ht
    are the sequence's, row n // PARTS. With MIDS > 1 (the forward, PARTS 1) also the fp32 states where parts 1 ..
    MIDS - 1 of a split in MIDS parts would start, mid [MIDS - 1, S, H, K, V]."""
    i_v, i_ns = tl.program_id(0), tl.program_id(1)
    n, i_hs = tl.load(order + i_ns // HS), i_ns % HS
    i_h = hb + i_hs
    i_hv = vb + i_hs
    i_nh = (n // PARTS) * H + i_h
    bos = tl.load(cu_seqlens + n).to(tl.int32)
    T = tl.load(cu_seqlens + n + 1).to(tl.int32) - bos
    c0 = tl.load(cu_chunks + n).to(tl.int64)
    cbos = (c0 * BT).to(tl.int32)
    vbos = cbos if DELTA else bos
    NT = tl.cdiv(T, BT)
    o_i = tl.arange(0, BT)
    if USE_H0:
        p_s, m_s = _tile(h0 + i_nh * K * V, K, V, V, 1, 0, i_v * BV, KP, BV)
        b_h = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([KP, BV], dtype=tl.float32)
    p_mid, m_mid = _tile(mid + i_nh * K * V, K, V, V, 1, 0, i_v * BV, KP, BV)
    # one loop per part, the state stored between them: a store inside the loop, under a condition, keeps Triton
    # from pipelining it (the forward's h kernel took 0.72 ms instead of 0.46 at B16 x T2048 x H4, H100)
    for i_p in tl.static_range(MIDS):
        if i_p > 0:
            tl.store(p_mid + (i_p - 1) * S * H * K * V, b_h, mask=m_mid)
        for i_t in range(NT * i_p // MIDS, NT * (i_p + 1) // MIDS):
            p_h, m_h = _tile(h + ((c0 + i_t) * HS + i_hs) * K * V, K, V, V, 1, 0, i_v * BV, KP, BV)
            tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_h)
            p_u, m_u = _tile(u + (vbos * VH + i_hv) * V, T, V, VH * V, 1, i_t * BT, i_v * BV, BT, BV)
            p_kt, m_kt = _tile(k + (bos * H + i_h) * K, K, T, 1, H * K, 0, i_t * BT, KP, BT)
            # the delta rule's loads and products in the order its kernel has always had them (the state kernels are
            # sensitive to it on the H100 with Triton 3.6, see chunk_delta_rule_bwd_kernel_dh)
            if DELTA:
                p_w, m_w = _tile(w + (cbos * HS + i_hs) * K, T, K, HS * K, 1, i_t * BT, 0, BT, KP)
                b_w = tl.load(p_w, mask=m_w, other=0.0)
            b_v = tl.load(p_u, mask=m_u, other=0.0).to(tl.float32)
            if DELTA:
                p_vn, m_vn = _tile(v_new + (cbos * VH + i_hv) * V, T, V, VH * V, 1, i_t * BT, i_v * BV, BT, BV)
                b_v -= tl.dot(b_w, b_h.to(b_w.dtype), input_precision=PREC)
                tl.store(p_vn, b_v.to(p_vn.dtype.element_ty), mask=m_vn)
            b_G, b_Gl = _load_gates(G, bos, T, i_t, i_h, H, BT)
            m_t = i_t * BT + o_i < T
            b_v = b_v * tl.where(m_t, tl.exp(b_Gl - b_G), 0.0)[:, None]
            b_h *= tl.exp(b_Gl)
            b_kt = tl.load(p_kt, mask=m_kt, other=0.0)
            b_h += tl.dot(b_kt, b_v.to(b_kt.dtype), input_precision=PREC)
    if STORE_HT:
        p_ht, m_ht = _tile(ht + i_nh * K * V, K, V, V, 1, 0, i_v * BV, KP, BV)
        tl.store(p_ht, b_h, mask=m_ht)


@triton.jit
def chunk_delta_rule_fwd_kernel_o(
    q, k, v_new, h, G, o, A, scale,
    cu_seqlens, chunk_info, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, STORE_A: tl.constexpr, DELTA: tl.constexpr,
):
    """o per chunk and V-block; with STORE_A the first V-block also writes the decayed causal q.k scores
    A [TT, H, BT] (16-bit) that the backward's dh kernel reads instead of recomputing them for every V-block. v_new
    is in the chunk layout (DELTA) or v."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i_t, bos, T = _chunk_lookup(chunk_info, cu_seqlens, i_c)
    if n >= N:
        return
    vbos = (i_c - i_t) * BT if DELTA else bos
    o_i = tl.arange(0, BT)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_q, m_q = _tile(q + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_kt, m_kt = _tile(k + (bos * H + i_h) * K, K, T, 1, H * K, i_k * BK, i_t * BT, BK, BT)
        p_h, m_h = _tile(h + (i_c.to(tl.int64) * H + i_h) * K * V, K, V, V, 1, i_k * BK, i_v * BV, BK, BV)
        b_q = tl.load(p_q, mask=m_q, other=0.0)
        b_kt = tl.load(p_kt, mask=m_kt, other=0.0)
        b_h = tl.load(p_h, mask=m_h, other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision=PREC)
        b_A += tl.dot(b_q, b_kt, input_precision=PREC)
    m_c = o_i[:, None] >= o_i[None, :]
    b_G, _ = _load_gates(G, bos, T, i_t, i_h, H, BT)
    b_o = b_o * tl.exp(b_G)[:, None]
    b_A = tl.where(m_c, b_A * tl.exp(b_G[:, None] - b_G[None, :]), 0.0)
    if STORE_A:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if i_v == 0:
            p_A, m_A = _tile(A + (bos * H + i_h) * BT, T, BT, H * BT, 1, i_t * BT, 0, BT, BT)
            tl.store(p_A, b_A.to(p_A.dtype.element_ty), mask=m_A)
    p_vn, m_vn = _tile(v_new + (vbos * H + i_h) * V, T, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
    p_o, m_o = _tile(o + (bos * H + i_h) * V, T, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
    b_vn = tl.load(p_vn, mask=m_vn, other=0.0)
    b_o = (b_o + tl.dot(b_A.to(b_vn.dtype), b_vn, input_precision=PREC)) * scale
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_o)


@triton.jit
def chunk_delta_rule_bwd_kernel_dh(
    q, k, w, G, A, do, dv, dh, dht, dh0, scale,
    cu_seqlens, cu_chunks, order, hb, vb,
    H: tl.constexpr, HS: tl.constexpr, VH: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, PARTS: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, RECOMPUTE_A: tl.constexpr, PREC: tl.constexpr,
    DELTA: tl.constexpr,
):
    """Backward over chunks: dv (gradient of v_new, all of it; v's without DELTA) per chunk, and dh (of the state
    after each chunk, [NT, HS, K, V]), for the HS heads from hb, segments in `order`. w is the group's; dv has VH
    heads, from vb (see the h kernel, also for PARTS: dht and dh0 are the sequence's, row n // PARTS)."""
    i_v, i_ns = tl.program_id(0), tl.program_id(1)
    n, i_hs = tl.load(order + i_ns // HS), i_ns % HS
    i_h = hb + i_hs
    i_hv = vb + i_hs
    i_nh = (n // PARTS) * H + i_h
    bos = tl.load(cu_seqlens + n).to(tl.int32)
    T = tl.load(cu_seqlens + n + 1).to(tl.int32) - bos
    c0 = tl.load(cu_chunks + n).to(tl.int64)
    cbos = (c0 * BT).to(tl.int32)
    vbos = cbos if DELTA else bos
    NT = tl.cdiv(T, BT)
    o_i = tl.arange(0, BT)
    if USE_DHT:
        p_dht, m_dht = _tile(dht + i_nh * K * V, K, V, V, 1, 0, i_v * BV, KP, BV)
        b_dh = tl.load(p_dht, mask=m_dht, other=0.0).to(tl.float32)
    else:
        b_dh = tl.zeros([KP, BV], dtype=tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        p_dh, m_dh = _tile(dh + ((c0 + i_t) * HS + i_hs) * K * V, K, V, V, 1, 0, i_v * BV, KP, BV)
        tl.store(p_dh, b_dh.to(p_dh.dtype.element_ty), mask=m_dh)
        p_k, m_k = _tile(k + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, 0, BT, KP)
        p_qt, m_qt = _tile(q + (bos * H + i_h) * K, K, T, 1, H * K, 0, i_t * BT, KP, BT)
        p_do, m_do = _tile(do + (bos * H + i_h) * V, T, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        p_dv, m_dv = _tile(dv + (vbos * VH + i_hv) * V, T, V, VH * V, 1, i_t * BT, i_v * BV, BT, BV)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_qt = tl.load(p_qt, mask=m_qt, other=0.0)
        b_do = tl.load(p_do, mask=m_do, other=0.0)
        b_G, b_Gl = _load_gates(G, bos, T, i_t, i_h, H, BT)
        m_t = i_t * BT + o_i < T
        # [BT, BT]: entry (j, i) = q_i.k_j exp(G_i - G_j) for i >= j: the forward's scores read transposed, or
        # recomputed from the k and q tiles loaded anyway
        if RECOMPUTE_A:
            b_Akq = tl.dot(b_k, b_qt, input_precision=PREC)
            b_Akq = tl.where(o_i[:, None] <= o_i[None, :], b_Akq * tl.exp(b_G[None, :] - b_G[:, None]), 0.0)
        else:
            p_At, m_At = _tile(A + (bos * H + i_h) * BT, BT, T, 1, H * BT, 0, i_t * BT, BT, BT)
            b_Akq = tl.load(p_At, mask=m_At, other=0.0)
        # the per-step decays scale the products' rows (k's, do's) after or before the dot, so that the [BT, K]
        # and [K, BT] tiles enter their dots as loaded (shared memory holds each once)
        b_dv = tl.dot(b_Akq.to(b_do.dtype), b_do, input_precision=PREC) * scale
        b_kdec = tl.where(m_t, tl.exp(b_Gl - b_G), 0.0)
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PREC) * b_kdec[:, None]
        tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), mask=m_dv)
        # w's tile is loaded before the state update, as the delta rule's kernel always did: with the load after it,
        # the one-stage form reading the scores at K = 256 went wrong on the H100 (Triton 3.6)
        if DELTA:
            p_wt, m_wt = _tile(w + (cbos * HS + i_hs) * K, K, T, 1, HS * K, 0, i_t * BT, KP, BT)
            b_wt = tl.load(p_wt, mask=m_wt, other=0.0)
        b_dh *= tl.exp(b_Gl)
        b_dh += tl.dot(b_qt, (b_do * (tl.exp(b_G) * scale)[:, None]).to(b_do.dtype), input_precision=PREC)
        if DELTA:
            b_dh -= tl.dot(b_wt, b_dv.to(b_wt.dtype), input_precision=PREC)
    if STORE_DH0:
        p_dh0, m_dh0 = _tile(dh0 + i_nh * K * V, K, V, V, 1, 0, i_v * BV, KP, BV)
        tl.store(p_dh0, b_dh, mask=m_dh0)


@triton.jit
def chunk_delta_rule_bwd_kernel_dqkw(
    q, k, v_new, h, do, dh, dv, G, dq, dk, dw, dG, scale,
    cu_seqlens, chunk_info, N, TT, hb, vb,
    H: tl.constexpr, HS: tl.constexpr, VH: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, DELTA: tl.constexpr,
):
    """Per chunk and K-block: dq (final), dk from the output and the state (partial with DELTA, else final), dw
    (DELTA), and the per-step gradient of the cumulative gate from those terms (partial over K-blocks), for the HS
    heads from hb (h and dh hold those). dw is the group's; v_new, dv and dk have VH heads, from vb (see the h
    kernel: with DELTA the group's, in the chunk layout)."""
    i_k, i_c, i_hs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = hb + i_hs
    i_hv = vb + i_hs
    n, i_t, bos, T = _chunk_lookup(chunk_info, cu_seqlens, i_c)
    if n >= N:
        return
    cbos = (i_c - i_t) * BT
    vbos = cbos if DELTA else bos
    o_i = tl.arange(0, BT)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dst = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        p_vn, m_vn = _tile(v_new + (vbos * VH + i_hv) * V, T, V, VH * V, 1, i_t * BT, i_v * BV, BT, BV)
        p_do, m_do = _tile(do + (bos * H + i_h) * V, T, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        # h and dh stored [K, V]; loaded as [BV, BK] tiles through the strides
        p_ht, m_ht = _tile(h + (i_c.to(tl.int64) * HS + i_hs) * K * V, V, K, 1, V, i_v * BV, i_k * BK, BV, BK)
        p_dht, m_dht = _tile(dh + (i_c.to(tl.int64) * HS + i_hs) * K * V, V, K, 1, V, i_v * BV, i_k * BK, BV, BK)
        b_vn = tl.load(p_vn, mask=m_vn, other=0.0)
        b_do = tl.load(p_do, mask=m_do, other=0.0)
        if DELTA:
            p_dv, m_dv = _tile(dv + (cbos * VH + i_hv) * V, T, V, VH * V, 1, i_t * BT, i_v * BV, BT, BV)
            b_dv = tl.load(p_dv, mask=m_dv, other=0.0)
        b_ht = tl.load(p_ht, mask=m_ht, other=0.0)
        b_dht = tl.load(p_dht, mask=m_dht, other=0.0)
        b_dq += tl.dot(b_do, b_ht.to(b_do.dtype), input_precision=PREC)
        b_dk += tl.dot(b_vn, b_dht.to(b_vn.dtype), input_precision=PREC)
        if DELTA:
            b_dw += tl.dot(b_dv, b_ht.to(b_dv.dtype), input_precision=PREC)
        # ds_ij = do_i.v_new_j and its transpose, both from loaded tiles
        b_ds += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)
        b_dst += tl.dot(b_vn, tl.trans(b_do), input_precision=PREC)
        b_dgl += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
    p_q, m_q = _tile(q + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
    p_k, m_k = _tile(k + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
    b_q = tl.load(p_q, mask=m_q, other=0.0)
    b_k = tl.load(p_k, mask=m_k, other=0.0)
    m_t = i_t * BT + o_i < T
    b_G, b_Gl = _load_gates(G, bos, T, i_t, i_h, H, BT)
    b_ds = tl.where(o_i[:, None] >= o_i[None, :], b_ds * tl.exp(b_G[:, None] - b_G[None, :]), 0.0) * scale
    b_dst = tl.where(o_i[:, None] <= o_i[None, :], b_dst * tl.exp(b_G[None, :] - b_G[:, None]), 0.0) * scale
    b_dq = b_dq * (tl.exp(b_G) * scale)[:, None]
    b_dk = b_dk * tl.where(m_t, tl.exp(b_Gl - b_G), 0.0)[:, None]
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dk_state = b_dk
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    p_dq, m_dq = _tile(dq + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
    p_dk, m_dk = _tile(dk + (vbos * VH + i_hv) * K, T, K, VH * K, 1, i_t * BT, i_k * BK, BT, BK)
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), mask=m_dq)
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), mask=m_dk)
    if DELTA:
        p_dw, m_dw = _tile(dw + (cbos * HS + i_hs) * K, T, K, HS * K, 1, i_t * BT, i_k * BK, BT, BK)
        tl.store(p_dw, (-b_dw).to(p_dw.dtype.element_ty), mask=m_dw)
    # d/dG_i of the output and state terms: q_i.dq_i - k_i.dk_i, plus the state's decay at the last step
    b_dG = tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, 1)
    b_last = tl.sum(b_dgl, 0) * tl.exp(b_Gl) + tl.sum(b_k.to(tl.float32) * b_dk_state)
    i_last = tl.minimum(BT, T - i_t * BT) - 1
    b_dG += tl.where(o_i == i_last, b_last, 0.0)
    tl.store(dG + (i_k * TT + bos + i_t * BT + o_i) * H + i_h, b_dG, mask=m_t)


@triton.jit
def chunk_delta_rule_bwd_kernel_wy(
    k, v, beta, G, Ti, dw, du, dk, dk_out, dv_out, dbeta, dG, dg,
    cu_seqlens, chunk_info, N, TT, hb,
    H: tl.constexpr, HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    PREC: tl.constexpr, DELTA: tl.constexpr,
):
    """For the HS heads from hb: dg from the gate gradients of the other kernels (partial over K-blocks, dG) and,
    with DELTA, the backward through w = T (beta gamma k), u = T (beta v), T = (I + A)^-1, which finishes dk, dv,
    dbeta. T, dw, du and dk's partial sum are the head group's tensors in the chunk layout; each chunk's T is
    overwritten (with the gradient that the transposed products read back)."""
    i_c, i_hs = tl.program_id(0), tl.program_id(1)
    i_h = hb + i_hs
    n, i_t, bos, T = _chunk_lookup(chunk_info, cu_seqlens, i_c)
    if n >= N:
        return
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    if DELTA:
        b_dG = _wy_chunk_bwd(k, v, beta, G, Ti, dw, du, dk, dk_out, dv_out, dbeta, bos, (i_c - i_t) * BT, T, i_t,
                             i_h, i_hs, H, HS, K, V, BT, BK, BV, PREC)
    else:
        b_dG = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(NK):
        b_dG += tl.load(dG + (i_k * TT + bos + o_t) * H + i_h, mask=m_t, other=0.0)
    # g_t enters every G_i with i >= t of its chunk: reverse cumulative sum
    b_dg = tl.sum(tl.where(o_i[:, None] <= o_i[None, :], b_dG[None, :], 0.0), 1)
    tl.store(dg + (bos + o_t) * H + i_h, b_dg, mask=m_t)


@triton.jit
def _wy_chunk_bwd(k, v, beta, G, Ti, dw, du, dk, dk_out, dv_out, dbeta, bos, cbos, T, i_t, i_h, i_hs, H: tl.constexpr,
                  HS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, PREC: tl.constexpr):
    """One chunk's backward through the WY form of head i_h (i_hs of its group, the layout of T, dw, du and dk's
    partial sum, rows from cbos): writes dk, dv, dbeta; returns its part of the gate gradient."""
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    b_beta = tl.load(beta + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_G, _ = _load_gates(G, bos, T, i_t, i_h, H, BT)
    b_gam = tl.exp(b_G)
    b_bg = b_beta * b_gam
    b_KK = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_k, m_k = _tile(k + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_KK += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    m_strict = o_i[:, None] > o_i[None, :]
    # T^T as the recomputed forward stored T (read through the strides, not transposed in registers)
    p_T, m_T = _tile(Ti + (cbos * HS + i_hs) * BT, T, BT, HS * BT, 1, i_t * BT, 0, BT, BT)
    p_Tt, m_Tt = _tile(Ti + (cbos * HS + i_hs) * BT, BT, T, 1, HS * BT, 0, i_t * BT, BT, BT)
    b_Tt = tl.load(p_Tt, mask=m_Tt, other=0.0)
    b_Ttc = b_Tt.to(k.dtype.element_ty)
    # dT = dw (beta gamma k)^T + du (beta v)^T from loaded tiles
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_k, m_k = _tile(k + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_dw, m_dw = _tile(dw + (cbos * HS + i_hs) * K, T, K, HS * K, 1, i_t * BT, i_k * BK, BT, BK)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_dw = tl.load(p_dw, mask=m_dw, other=0.0)
        b_kb = (b_k * b_bg[:, None]).to(b_k.dtype)
        b_dT += tl.dot(b_dw, tl.trans(b_kb), input_precision=PREC)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_v = _tile(v + (bos * H + i_h) * V, T, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        p_du, m_du = _tile(du + (cbos * HS + i_hs) * V, T, V, HS * V, 1, i_t * BT, i_v * BV, BT, BV)
        p_dvo, m_dvo = _tile(dv_out + (bos * H + i_h) * V, T, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        b_v = tl.load(p_v, mask=m_v, other=0.0)
        b_du = tl.load(p_du, mask=m_du, other=0.0)
        b_vb = (b_v * b_beta[:, None]).to(b_v.dtype)
        b_dT += tl.dot(b_du, tl.trans(b_vb), input_precision=PREC)
        # T^T du
        b_dvb = tl.dot(b_Ttc, b_du.to(b_Ttc.dtype), input_precision=PREC)
        b_dbeta += tl.sum(b_dvb * b_v.to(tl.float32), 1)
        tl.store(p_dvo, (b_dvb * b_beta[:, None]).to(p_dvo.dtype.element_ty), mask=m_dvo)
    # dA = -T^T dT T^T (strictly lower); then through A_ij = beta_i k_i.k_j exp(G_i - G_j)
    b_dA = -tl.dot(tl.dot(b_Tt, b_dT, input_precision=PREC), b_Tt, input_precision=PREC)
    b_D = tl.where(m_strict, b_dA * tl.exp(b_G[:, None] - b_G[None, :]), 0.0)
    # D^T through memory, not from a transposed product (see the module notes): D goes where this chunk's T was,
    # once every thread has read T, and comes back through T^T's strides
    tl.debug_barrier()
    tl.store(p_T, b_D, mask=m_T)
    tl.debug_barrier()
    b_Dt = tl.load(p_Tt, mask=m_Tt, other=0.0)
    b_DKK = b_D * b_KK
    b_dbeta += tl.sum(b_DKK, 1)
    b_E = b_DKK * b_beta[:, None]
    b_dG = tl.sum(b_E, 1) - tl.sum(b_E, 0)
    b_Dc = b_D.to(k.dtype.element_ty)
    b_Dtc = b_Dt.to(k.dtype.element_ty)
    for i_k in range(tl.cdiv(K, BK)):
        p_k, m_k = _tile(k + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_dw, m_dw = _tile(dw + (cbos * HS + i_hs) * K, T, K, HS * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_dk, m_dk = _tile(dk + (cbos * HS + i_hs) * K, T, K, HS * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_dko, m_dko = _tile(dk_out + (bos * H + i_h) * K, T, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_dw = tl.load(p_dw, mask=m_dw, other=0.0)
        b_dk = tl.load(p_dk, mask=m_dk, other=0.0).to(tl.float32)
        # T^T dw: gradient of (beta gamma k)
        b_dkb = tl.dot(b_Ttc, b_dw.to(b_Ttc.dtype), input_precision=PREC)
        b_kdkb = tl.sum(b_dkb * b_k.to(tl.float32), 1)
        b_dbeta += b_kdkb * b_gam
        b_dG += b_kdkb * b_bg
        b_dk += b_dkb * b_bg[:, None]
        b_dk += tl.dot(b_Dc, b_k, input_precision=PREC) * b_beta[:, None]
        b_dk += tl.dot(b_Dtc, (b_k * b_beta[:, None]).to(b_k.dtype), input_precision=PREC)
        tl.store(p_dko, b_dk.to(p_dko.dtype.element_ty), mask=m_dko)
    tl.store(dbeta + (bos + o_t) * H + i_h, b_dbeta, mask=m_t)
    return b_dG


def _chunk_tables(nch: torch.Tensor, NT: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side chunk bookkeeping without host syncs, from the chunks of each of M segments: (cu_chunks [M + 1],
    chunk_info [NT, 2] of (segment, chunk within it)). NT bounds the number of chunks; rows past the last chunk
    carry segment index M (skipped)."""
    M = nch.numel()
    cu_chunks = torch.cat([nch.new_zeros(1), torch.cumsum(nch, 0, dtype=torch.int32)])
    ids = torch.arange(NT, device=nch.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_chunks[1:].contiguous(), ids, right=True).to(torch.int32)
    local = ids - cu_chunks[seq.clamp(max=M - 1)]
    return cu_chunks, torch.stack([seq, local], 1).contiguous()


# The backward runs per group of heads (the WY recompute, h, dh, dqkw and the WY backward), so that h and dh
# [NT, heads, K, V] and the group's other intermediates exist for one group at a time: groups as small as keep at
# least this many programs per SM in each state-kernel launch. A launch lasts as long as its longest program (one walks
# a whole sequence), so every extra group costs that tail again. H100, MoM's packing (98304 slots, 80 uneven segments,
# 4 heads of 256), kernel ms fwd+bwd: one group 9.37, two 9.45, four (at 2 per SM) 11.13. At 8, MoM at 32768 tokens
# gets two groups at B16 (its layer's peak 4.24 -> 3.73 GiB, +0.2 ms) and one at B4 (4.60 GiB, where the time parts
# below take over; two groups there, at 2 per SM: 3.7 GiB for +0.58 ms, the seventh session's same-run measurements).
STATE_GROUP_PROGRAMS_PER_SM = 8
# Programs take the sequences longest first, so that one long segment does not run alone at the end of a launch:
# 9.66 -> 9.37 ms at the shape above; MoM's layer 23.42 -> 22.83 ms (B16 x T2048) and 24.73 -> 23.25 ms (B4 x T8192)
# with four head groups.
STATE_LONGEST_FIRST = True
# Where head groups would cost that tail (too few programs), the backward runs in parts along time instead: each
# sequence's chunks split into P consecutive runs, the last run first. The forward keeps the fp32 state where each
# later run starts ([P - 1, N, H, K, V]), so a part recomputes only its own states and intermediates, and a part's dh
# starts from the gradient that the part after it left at its start. A part's state kernels keep every program and
# walk 1 / P of each sequence; h, dh and the group's other intermediates shrink by P. P is as small as keeps a
# group's h and dh within STATE_PART_BYTES. H100, MoM's layer at B4 x T8192 (one head group of 4; 20 segments, h and
# dh 1.5 GiB): two parts 18.90 -> 19.18 ms, peak 4.61 -> 3.76 GiB, where two head groups cost 0.74 ms for 3.71 GiB.
# At B16 x T2048 one group in two parts took 0.29 ms more than the rule's two groups in one part (3.97 against 3.75
# GiB); two parts cost gated DeltaNet's layer (h and dh 0.5 GiB) 0.2-0.5 ms. The eighth session's measurements.
STATE_PART_BYTES = 2**30
# A fixed number of parts instead of the rule (the tests and benchmarks set it)
STATE_TIME_PARTS: int | None = None


class Forward(NamedTuple):
    o: torch.Tensor
    ht: torch.Tensor | None
    A: torch.Tensor | None
    """The decayed causal q.k scores [1, TT, H, BT] that the backward reads (forward for training only)."""
    mid: torch.Tensor | None
    """The fp32 states where the backward's time parts 1 .. P - 1 start, [P - 1, N, H, K, V] (training, P > 1)."""
    d: Dims
    """The launches' sizes and tables, which the backward reuses."""


class Dims(NamedTuple):
    """Sizes shared by the launches: tokens TT, heads H, K, V, segments N, chunk and block sizes, K padded to a
    power of two, the chunk tables, the order in which the state kernels take the segments, the sequences S (rows
    of the states) and the time parts P. The forward's segments are the sequences (N = S); a time part's (`_parts`)
    are S x P, part p of sequence s being segment s * P + p, the other parts' segments holding no chunk."""
    TT: int
    H: int
    K: int
    V: int
    N: int
    BT: int
    BK: int
    BV: int
    KP: int
    cu: torch.Tensor
    cu_chunks: torch.Tensor
    info: torch.Tensor
    NT: int
    order: torch.Tensor
    S: int
    P: int


def _order(lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The segments `ids` in the order the state kernels take them (longest first, see STATE_LONGEST_FIRST)."""
    if STATE_LONGEST_FIRST:
        ids = ids[lengths.argsort(descending=True, stable=True)]
    return ids.to(torch.int32)


@functools.lru_cache(maxsize=32)
def _dense_tables(B: int, T: int, BT: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cu, cu_chunks, chunk_info and order of a dense batch of B sequences of T tokens: fixed by the shape, so built
    once (the tables' dozen small launches are host time that a step of short sequences would otherwise wait on)."""
    cu = torch.arange(0, B + 1, device=device, dtype=torch.int32) * T
    cu_chunks, info = _chunk_tables(torch.full((B,), triton.cdiv(T, BT), device=device, dtype=torch.int32),
                                    B * triton.cdiv(T, BT))
    return cu, cu_chunks, info, torch.arange(B, device=device, dtype=torch.int32)


def _dims(k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, BT: int, BK: int, BV: int, P: int = 1,
          batch: int = 1) -> Dims:
    """The launches' sizes and tables; cu_seqlens None: a dense batch of `batch` sequences of equal length."""
    _, TT, H, K = k.shape
    V = v.shape[-1]
    BK, BV, KP = min(BK, triton.next_power_of_2(K)), min(BV, triton.next_power_of_2(V)), triton.next_power_of_2(K)
    if cu_seqlens is None:
        # not cached while a CUDA graph is captured: its launches would fill the cached tensors only on replay
        tables = _dense_tables.__wrapped__ if k.is_cuda and torch.cuda.is_current_stream_capturing() else _dense_tables
        cu, cu_chunks, info, order = tables(batch, TT // batch, BT, k.device)
        return Dims(TT, H, K, V, batch, BT, BK, BV, KP, cu, cu_chunks, info, info.shape[0], order, batch, P)
    cu = cu_seqlens.to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    N = lengths.numel()
    NT = TT // BT + N
    cu_chunks, info = _chunk_tables((lengths + BT - 1) // BT, NT)
    return Dims(TT, H, K, V, N, BT, BK, BV, KP, cu, cu_chunks, info, NT,
                _order(lengths, torch.arange(N, device=cu.device)), N, P)


def _parts(d: Dims) -> list[Dims]:
    """The d.P time parts: part p takes each sequence's chunks (n of them) from n p // P to n (p + 1) // P. All parts
    share one partition of the tokens into S x P runs (run s * P + p); each part's tables list its own chunks only,
    so its h, dh and intermediates are numbered compactly. NT bounds a part's chunks: at most ceil(n / P) per
    sequence."""
    P, S, BT = d.P, d.S, d.BT
    nch = (d.cu[1:] - d.cu[:-1] + BT - 1) // BT
    bounds = torch.stack([nch * i // P for i in range(P)] + [nch], 1)
    cu = torch.cat([(d.cu[:-1, None] + bounds[:, :P] * BT).reshape(-1), d.cu[-1:]])
    counts = bounds[:, 1:] - bounds[:, :P]
    lengths = (cu[1:] - cu[:-1]).view(S, P)
    NT = (d.TT // BT + S * P) // P
    parts = []
    for p in range(P):
        cu_chunks, info = _chunk_tables(torch.where(torch.arange(P, device=cu.device) == p, counts, 0).reshape(-1),
                                        NT)
        order = _order(lengths[:, p], torch.arange(S, device=cu.device) * P + p)
        parts.append(d._replace(N=S * P, cu=cu, cu_chunks=cu_chunks, info=info, NT=NT, order=order))
    return parts


def _local(d: Dims, HS: int, D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A head group's intermediate in the chunk layout [1, NT * BT, HS, D]: chunk-table row i holds rows i * BT ..
    i * BT + BT - 1, so a time part's intermediates take its chunks only."""
    return _empty(1, d.NT * d.BT, HS, D, dtype=dtype, device=device)


def _wy(k, v, beta, g, G, d: Dims, store_T: bool, hb: int, HS: int):
    """For the HS heads from hb: the cumulative gates (written into G [1, TT, H] fp32) and, with beta (the delta
    rule), the group's WY keys w [.., HS, K] and values u [.., HS, V] and (store_T) T = (I + A_kk)^-1 fp32
    [.., HS, BT], in the chunk layout; without beta (gated linear attention) w, u and T are None."""
    dev, dt = k.device, k.dtype
    delta = beta is not None
    w = _local(d, HS, d.K, dt, dev) if delta else None
    u = _local(d, HS, d.V, dt, dev) if delta else None
    Ti = _local(d, HS, d.BT, torch.float32, dev) if store_T and delta else None
    # absent tensors get a stand-in pointer that the kernel never touches
    chunk_delta_rule_fwd_kernel_wy[(d.NT, HS)](
        k, v, beta if delta else g, g, G, w if delta else k, u if delta else v, k if Ti is None else Ti, d.cu, d.info,
        d.N, hb, H=d.H, HS=HS, K=d.K, V=d.V, BT=d.BT, BK=d.BK, BV=d.BV, PREC=dot_precision(k),
        LOG_BT=d.BT.bit_length() - 1, STORE_T=Ti is not None, DELTA=delta, **_launch("wy", dt),
    )
    return w, u, Ti


def _value_layout(delta: bool, d: Dims, hb: int, HS: int) -> dict[str, int]:
    """Heads and head offset of v_new, its gradient and dk's partial sum in the state kernels: the head group's own
    tensors with the delta correction, v, dv and dk of all heads without it."""
    return {"vb": 0, "VH": HS} if delta else {"vb": hb, "VH": d.H}


def _states(k, w, u, G, v_new, initial_state, ht, d: Dims, hb: int, HS: int, mid=None) -> torch.Tensor:
    """h [NT, HS, K, V] entering each chunk for heads hb .. hb + HS - 1; writes their v_new = u - w h (and ht, and
    with `mid` the states where time parts 1 .. P - 1 start), w, u and v_new being the group's. Without w (gated
    linear attention) u is v and nothing is written but h (and ht, mid)."""
    h = _empty(d.NT, HS, d.K, d.V, dtype=k.dtype, device=k.device)
    BV, launch = _state_launch("h", k.dtype, d.KP, d.BV, d.V, d.S * HS, k.device)
    lay = _value_layout(w is not None, d, hb, HS)
    chunk_delta_rule_fwd_kernel_h[(triton.cdiv(d.V, BV), d.S * HS)](
        k, k if w is None else w, u, G, h, v_new, initial_state, ht, G if mid is None else mid, d.cu, d.cu_chunks,
        d.order, hb, lay["vb"], d.S, H=d.H, HS=HS, VH=lay["VH"], K=d.K, V=d.V, BT=d.BT, KP=d.KP, BV=BV,
        PARTS=d.N // d.S, MIDS=1 if mid is None else d.P, USE_H0=initial_state is not None, STORE_HT=ht is not None,
        PREC=dot_precision(k), DELTA=w is not None, **launch,
    )
    return h


def _state_heads(d: Dims, device: torch.device, BV: int) -> int:
    """Heads per group of the backward's state kernels at V-block BV (a divisor of H; see
    STATE_GROUP_PROGRAMS_PER_SM)."""
    programs = d.S * triton.cdiv(d.V, BV)
    return next(hs for hs in range(1, d.H + 1)
                if d.H % hs == 0 and (hs == d.H or programs * hs >= STATE_GROUP_PROGRAMS_PER_SM * sm_count(device)))


def _time_parts(d: Dims, dtype: torch.dtype, device: torch.device, delta: bool) -> int:
    """Parts along time of the backward (see STATE_PART_BYTES) at the head groups it takes."""
    if STATE_TIME_PARTS is not None:
        return STATE_TIME_PARTS
    HS = _state_heads(d, device, _dh_launch(d, dtype, device, delta)[0])
    state_bytes = 2 * d.NT * HS * d.K * d.V * torch.finfo(dtype).bits // 8
    return min(-(-state_bytes // STATE_PART_BYTES), 8)


def chunk_delta_rule_fwd(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, batch: int = 1,
                         BT: int = 64, BK: int = 64, BV: int = 64, training: bool = False) -> Forward:
    """Inputs flattened to [1, TT, H, D] contiguous, cu_seqlens given or None for `batch` sequences of equal length;
    beta None: gated linear attention (no delta correction). `training`: also keep the scores A for the backward,
    unless its dh kernel recomputes them, and the states where its time parts start (`_time_parts`)."""
    dev, dt = q.device, q.dtype
    d = _dims(k, v, cu_seqlens, BT, BK, BV, batch=batch)
    if training:
        d = d._replace(P=_time_parts(d, dt, dev, beta is not None))
    G = _empty(1, d.TT, d.H, dtype=torch.float32, device=dev)
    w, u, _ = _wy(k, v, beta, g, G, d, False, 0, d.H)
    v_new = _local(d, d.H, d.V, dt, dev) if beta is not None else v
    ht = _empty(d.N, d.H, d.K, d.V, dtype=torch.float32, device=dev) if output_final_state else None
    mid = _empty(d.P - 1, d.S, d.H, d.K, d.V, dtype=torch.float32, device=dev) if d.P > 1 else None
    h = _states(k, w, v if u is None else u, G, v_new, initial_state, ht, d, 0, d.H, mid)
    del w, u  # the output kernel reads neither: their memory can go to o and A
    o = _empty(1, d.TT, d.H, d.V, dtype=dt, device=dev)
    store_A = training and not _dh_launch(d, dt, dev, beta is not None)[2]
    A = _empty(1, d.TT, d.H, BT, dtype=dt, device=dev) if store_A else None
    chunk_delta_rule_fwd_kernel_o[(triton.cdiv(d.V, d.BV), d.NT, d.H)](
        q, k, v_new, h, G, o, A, scale, d.cu, d.info, d.N, H=d.H, K=d.K, V=d.V, BT=BT, BK=d.BK, BV=d.BV,
        PREC=dot_precision(q), STORE_A=store_A, DELTA=beta is not None, **_launch("o", dt, d.K),
    )
    return Forward(o, ht, A, mid, d)


def chunk_delta_rule_bwd(q, k, v, beta, g, scale, initial_state, base: Dims, do, dht, A, mid):
    """The whole backward runs per time part (base.P of them, the forward's; `mid` holds where parts after the first
    start), last part first, and within a part per head group (see `_state_heads`): the forward's intermediates
    recomputed (all but o and the saved scores A, None when dh recomputes them), the states h, dh through the chunks,
    the per-chunk gradients of q, k, w, then the WY backward (with beta) and the gate's. Without beta (gated linear
    attention) dbeta is None.

    A group's intermediates (w, u, T, v_new, du, h, dh, dk's fp32 partial sum, dw) are its own tensors over its
    part's chunks, each dropped after its last reader: the peak is at a group's dqkw kernel, which holds its h and dh
    beside the outputs."""
    BT = base.BT
    dev, dt = q.device, q.dtype
    prec = dot_precision(q)
    NK = triton.cdiv(base.K, base.BK)
    delta = beta is not None
    G = _empty(1, base.TT, base.H, dtype=torch.float32, device=dev)
    dq = _empty(1, base.TT, base.H, base.K, dtype=dt, device=dev)
    dG = _empty(NK, base.TT, base.H, dtype=torch.float32, device=dev)
    dg = _empty(1, base.TT, base.H, dtype=torch.float32, device=dev)
    dh0 = _empty(base.S, base.H, base.K, base.V, dtype=torch.float32, device=dev) if initial_state is not None else None
    # the gradient of the state where a part starts: written by that part's dh, read by the part before it
    dmid = _empty(base.S, base.H, base.K, base.V, dtype=torch.float32, device=dev) if base.P > 1 else None
    # the outputs dk and dv; with the delta correction allocated after the first group's state kernels (one group
    # then never holds them beside h and dh), without it written by them (v_new is v, du its gradient)
    dk = dv = dbeta = None
    if not delta:
        dk = _empty(1, base.TT, base.H, base.K, dtype=dt, device=dev)
        dv = _empty(1, base.TT, base.H, base.V, dtype=dt, device=dev)
    BVS, dh_launch, recompute_A = _dh_launch(base, dt, dev, delta)
    HS = _state_heads(base, dev, BVS)
    parts = [base] if base.P == 1 else _parts(base)
    for p in reversed(range(base.P)):
        d = parts[p]
        h_in = initial_state if p == 0 else mid[p - 1]
        dh_in = dht if p == base.P - 1 else dmid
        dh_out = dh0 if p == 0 else dmid
        for hb in range(0, d.H, HS):
            lay = _value_layout(delta, d, hb, HS)
            w, u, Ti = _wy(k, v, beta, g, G, d, True, hb, HS)
            v_new = _local(d, HS, d.V, dt, dev) if delta else v
            h = _states(k, w, v if u is None else u, G, v_new, h_in, None, d, hb, HS)
            del u  # read by the state kernel only
            # the gradient of v_new (the group's); without the delta correction, v's
            du = _local(d, HS, d.V, dt, dev) if delta else dv
            dh = _empty(d.NT, HS, d.K, d.V, dtype=dt, device=dev)
            chunk_delta_rule_bwd_kernel_dh[(triton.cdiv(d.V, BVS), d.S * HS)](
                q, k, q if w is None else w, G, q if A is None else A, do, du, dh, dh_in, dh_out, scale, d.cu,
                d.cu_chunks, d.order, hb, lay["vb"], H=d.H, HS=HS, VH=lay["VH"], K=d.K, V=d.V, BT=BT, KP=d.KP,
                BV=BVS, PARTS=d.N // d.S, USE_DHT=dh_in is not None, STORE_DH0=dh_out is not None,
                RECOMPUTE_A=recompute_A, PREC=prec, DELTA=delta, **dh_launch,
            )
            del w  # read by dh only
            # dk: the group's fp32 partial sum that the WY backward completes, or (no delta correction) final
            dk_part = _local(d, HS, d.K, torch.float32, dev) if delta else dk
            dw = _local(d, HS, d.K, dt, dev) if delta else dk
            chunk_delta_rule_bwd_kernel_dqkw[(NK, d.NT, HS)](
                q, k, v_new, h, do, dh, du, G, dq, dk_part, dw, dG, scale, d.cu, d.info, d.N, d.TT, hb, lay["vb"],
                H=d.H, HS=HS, VH=lay["VH"], K=d.K, V=d.V, BT=BT, BK=d.BK, BV=d.BV, PREC=prec, DELTA=delta,
                **_launch("dqkw", dt),
            )
            del h, dh, v_new
            if delta and dk is None:
                dk = _empty(1, d.TT, d.H, d.K, dtype=dt, device=dev)
                dv = _empty(1, d.TT, d.H, d.V, dtype=dt, device=dev)
                dbeta = _empty(1, d.TT, d.H, dtype=torch.float32, device=dev)
            # dg (and with beta the WY backward into dk, dv, dbeta); without beta the WY tensors' places take
            # stand-in pointers that this variant never touches
            chunk_delta_rule_bwd_kernel_wy[(d.NT, HS)](
                k, v, beta if delta else g, G, Ti if delta else G, dw, du, dk_part, dk, dv, dbeta if delta else g,
                dG, dg, d.cu, d.info, d.N, d.TT, hb, H=d.H, HS=HS, K=d.K, V=d.V, BT=BT, BK=d.BK, BV=d.BV, NK=NK,
                PREC=prec, DELTA=delta, **_launch("bwd_wy", dt),
            )
            del Ti, du, dk_part, dw
    return dq, dk, dv, dbeta, dg, dh0


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, batch, blocks):
        fwd = chunk_delta_rule_fwd(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, batch,
                                   *blocks, training=any(ctx.needs_input_grad))
        ctx.save_for_backward(q, k, v, beta, g, initial_state, fwd.A, fwd.mid)
        # the tables (small int tensors the forward made) go to the backward as they are
        ctx.scale, ctx.d = scale, fwd.d
        return fwd.o, fwd.ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, initial_state, A, mid = ctx.saved_tensors
        dq, dk, dv, dbeta, dg, dh0 = chunk_delta_rule_bwd(
            q, k, v, beta, g, ctx.scale, initial_state, ctx.d, do.contiguous(),
            dht.contiguous() if dht is not None else None, A, mid,
        )
        dbeta = dbeta.to(beta.dtype) if dbeta is not None else None
        dg = dg.to(g.dtype)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, dbeta, dg, None, dh0, None, None, None, None


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
    check_inputs: bool = True,
    chunk_size: int = 64,
    block_k: int = 64,
    block_v: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (gated) delta rule.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] in (0, 1); g: [B, T, H] log decay (<= 0) or None
            for plain DeltaNet. fp32/fp16/bf16 (q, k, v one dtype); accumulation in fp32.
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] (N = B, or the number of sequences with cu_seqlens); read in fp32.
        output_final_state: also return the fp32 final state [N, H, K, V].
        cu_seqlens: [N + 1] int32/int64 offsets of packed sequences (B must be 1); zero-length segments allowed.
        use_qk_l2norm: L2-normalise q and k over the head dim first (gradients flow through it).
        backend: None (Triton on CUDA, torch on CPU), "triton" or "torch".
        check_inputs: check cu_seqlens values on the host (a device sync); pass False on a sync-free hot path.
        chunk_size, block_k, block_v: Triton tile sizes (powers of two, >= 16).
    Returns:
        o [B, T, H, V] in v's dtype, and the final state or None.
    """
    K = validate_delta_rule_inputs(q, k, v, beta, g, initial_state, cu_seqlens, check_inputs)[3]
    if not use_triton(q, backend):
        return torch_chunk_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, check_inputs=False,
        )
    for name, b in (("chunk_size", chunk_size), ("block_k", block_k), ("block_v", block_v)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    scale = K**-0.5 if scale is None else float(scale)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return chunk_scalar_decay(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens,
                              (chunk_size, block_k, block_v))


def chunk_scalar_decay(q, k, v, beta, g, scale: float, initial_state, output_final_state: bool, cu_seqlens,
                       blocks: tuple[int, int, int] = (64, 64, 64)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton kernels' entry for checked inputs `[B, T, H, D]`: the delta rule (beta [B, T, H]) or, with beta
    None, gated linear attention with one log decay per head and step (the GLA family's scalar mode): the same state
    kernels without the WY transform. g [B, T, H] or None (no decay). Returns (o [B, T, H, V], final state or None)."""
    B, T, H, _ = q.shape
    V = v.shape[-1]
    q, k, v = (x.reshape(1, B * T, *x.shape[2:]).contiguous() for x in (q, k, v))
    beta = beta.reshape(1, B * T, H).contiguous() if beta is not None else None
    # plain DeltaNet runs as the gated rule with log decay 0: one kernel set (the ungated specialisation of the same
    # kernels came out wrong on the H100 at head dim 256, Triton 3.6, while the gated one matches the reference)
    g = g.reshape(1, B * T, H).contiguous() if g is not None else q.new_zeros(1, B * T, H, dtype=torch.float32)
    h0 = initial_state.contiguous() if initial_state is not None else None
    o, ht = ChunkDeltaRuleFunction.apply(q, k, v, beta, g, scale, h0, output_final_state, cu_seqlens, B, blocks)
    return o.reshape(B, T, H, V), ht
