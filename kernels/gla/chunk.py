"""Chunked gated linear attention in Triton: forward, backward and the public `chunk_gla`.

Per chunk of BT steps, with G the chunk-local cumulative log-decay (G_i <= 0, non-increasing), h the state at the
chunk start and scale folded into the intra-chunk scores A:
    o_i    = scale * (q_i * exp(G_i)) h + sum_{j<=i} A_ij v_j,   A_ij = scale * sum_c q_ic k_jc exp(G_ic - G_jc)
    h_next = exp(G_last) * h + sum_j (k_j * exp(G_last - G_j)) v_j^T
A is built from sub-chunks of BC rows so that every exponent is <= 0: an off-diagonal block takes G at the first row
of its query sub-chunk as reference, a diagonal block is summed pairwise. The kernels hold G in base 2 (G log2 e),
so each decay factor is one exp2. A scalar decay (one per head and step) runs on the delta rule's state kernels
without their WY transform (`chunk_scalar_decay`). The gate gradient uses the identity (per sequence, with global
cumulative decays):
    dg_t = sum_{s>=t} (q_s * dq_s - k_s * dk_s) + sum_v S_T * dS_T
so it is one reverse cumulative sum over time of per-token terms plus the final-state term.

Varlen launches a fixed grid of cdiv(T, BT) + N chunk programs; each looks up its (sequence, chunk) in a table built
on the device with fixed-size ops, so no host sync is needed when `check_inputs=False`.

Hopper note (Triton 3.4-3.7.0 miscompile): no kernel here transposes a `tl.dot` result into another `tl.dot`; every
transposed operand is a tile loaded transposed from memory.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from linear_moe.kernels.common import dot_precision, sm_count, use_triton
from linear_moe.kernels.delta_rule.chunk import chunk_scalar_decay
from linear_moe.kernels.gla.naive import torch_chunk_gla, validate_gla_inputs

# Block sizes of the Triton path; tests monkeypatch this (or set LINEAR_MOE_GLA_BLOCKS="BK=32,BV=32") to vary them.
# BK_DIAG (default 256: the whole key dim up to 256) is the key block of the forward's diagonal sub-chunk blocks: in one
# block they took 0.43 -> 0.39 ms at B16 x T2048 x H4 x D256 and 0.83 -> 0.73 ms at H16 x D128 against 64 (H100, bf16).
BLOCK_SIZES = {"BT": 64, "BC": 16, "BK": 64, "BV": 64, "BK_DIAG": 256}
# Fill every Triton output with NaN before launch so unwritten elements show up in tests.
POISON = os.environ.get("LINEAR_MOE_POISON", "0") == "1"
# Diagonal sub-chunk blocks by a column loop (True), by a [BC, BC, BK] tensor (False), or auto (None).
DIAG_LOOP: bool | None = None


def _block_sizes(K: int, V: int, N: int, H: int, device: torch.device) -> dict[str, int]:
    """BLOCK_SIZES (and LINEAR_MOE_GLA_BLOCKS) fitted to K and V, plus the per-sequence kernels' choices for N
    sequences of H heads (see FEW_PROGRAMS_PER_SM): BK_DH, BK_DG and the states' stages H_STAGES."""
    bs = {"BK_DIAG": 256} | BLOCK_SIZES  # a dict patched in without BK_DIAG keeps the default
    env = os.environ.get("LINEAR_MOE_GLA_BLOCKS")
    if env:
        for item in env.split(","):
            key, val = item.split("=")
            bs[key.strip()] = int(val)
    bs["BK"] = min(bs["BK"], max(16, triton.next_power_of_2(K)))
    bs["BV"] = min(bs["BV"], max(16, triton.next_power_of_2(V)))
    if bs["BT"] % bs["BC"]:
        raise ValueError(f"BT={bs['BT']} must be a multiple of BC={bs['BC']}")
    BK = bs["BK"]
    few = N * H * triton.cdiv(K, BK) * triton.cdiv(V, bs["BV"]) < FEW_PROGRAMS_PER_SM * sm_count(device)
    return bs | {"BK_DH": max(16, BK // 2) if few else BK, "BK_DG": max(16, BK // 4) if few else BK,
                 "H_STAGES": 3 if few or K <= 128 else LAUNCH["h"][1]}


def _empty(*shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


def _diag_loop() -> bool:
    """Diagonal sub-chunk blocks: a loop over columns on GPU; one 3-D tensor op under the interpreter (DIAG_LOOP=None)."""
    return os.environ.get("TRITON_INTERPRET") != "1" if DIAG_LOOP is None else DIAG_LOOP


def _num_warps(default: int) -> int:
    return 1 if os.environ.get("TRITON_INTERPRET") == "1" else default


# Launch settings per chunk kernel: (num_warps, num_stages); stages None leaves Triton's default (3). The
# interpreter runs every kernel with one warp. From a sweep of warps {2, 4, 8} x stages {1, 2, 3, 4} (H100, Triton
# 3.6, bf16, vector decay, B16 x T2048 at H4 x D256 and H16 x D128): two stages beat three in the loops over chunks or
# key blocks. Kernel ms per fwd+bwd, three stages -> chosen, D256 / D128: h 0.65 -> 0.62 / 0.73 -> 0.72, intra
# 0.60 -> 0.55 / 1.19 -> 1.10, dh 0.37 -> 0.35 / 0.39 -> 0.39, dv 0.38 -> 0.36 / 0.51 -> 0.48, inter 0.60 -> 0.55 /
# 0.85 -> 0.73. The forward's diagonal sub-chunk blocks run in a launch of their own (intra_diag; four warps when the
# key block is 256 wide): the forward's intra-chunk time 0.55 -> 0.53 ms at D256 and 1.09 -> 1.00 ms at D128 (same
# sweep). The backward's intra-chunk kernel, a loop over BC-row blocks and single rows, runs in one warp (fla's
# autotuner chose one too): 1.14 -> 1.00 ms at D256 and 2.21 -> 1.94 ms at D128 against four, B4 x T8192 and
# B16 x T2048 alike; two warps, or one with three stages, were slower.
LAUNCH: dict[str, tuple[int, int | None]] = {
    "cumsum": (4, None), "h": (4, 2), "intra": (2, 2), "o": (4, None), "dh": (2, 2), "dA": (4, None),
    "dv": (4, 2), "inter": (4, 2), "bwd_intra": (1, 2), "dg": (4, None), "intra_diag": (2, 2),
    "intra_diag_wide": (4, 2),
}

# The per-sequence kernels (the states h, their gradients dh, the gate's reverse scan dg) loop over one sequence's
# chunks, one program per (key block, value block, sequence, head). Below FEW_PROGRAMS_PER_SM programs per SM (at
# BK = BV = 64: B4 x T8192 x H4 x D256 gives 256 programs on the H100's 132 SMs) the loops' latency shows: dh then
# takes half the key block, dg a quarter, h three stages. Kernel ms per fwd+bwd at B4 x T8192, D256 / D128 (H100,
# bf16): dh 0.401 -> 0.347 / 0.457 -> 0.406, dg 0.249 -> 0.195 / 0.298 -> 0.256, h 0.661 -> 0.629 / 0.756 -> 0.701.
# With 1024 programs (B16 x T2048) the same choices cost 0.01-0.05 ms each, except h's three stages at K <= 128
# (0.723 -> 0.696 ms at D128), taken there at any count.
FEW_PROGRAMS_PER_SM = 2


def _launch(name: str) -> dict[str, int]:
    warps, stages = LAUNCH[name]
    return {"num_warps": _num_warps(warps)} | ({} if stages is None else {"num_stages": stages})


# Varlen bookkeeping without host syncs.


def prepare_varlen_chunks(cu_seqlens: torch.Tensor, T: int, BT: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fixed-size device tables for varlen: chunk_indices [NT_max, 2] int32 rows of (sequence, chunk in sequence),
    sequence -1 for the unused tail; chunk_offsets [N] int32, the first global chunk of each sequence; NT_max.

    NT_max = cdiv(T, BT) + N bounds sum_n cdiv(len_n, BT), so the grid size depends on shapes only.
    """
    N = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    nch = (cu[1:] - cu[:-1] + BT - 1) // BT
    cum = torch.cumsum(nch, 0)
    offsets = cum - nch
    NT_max = triton.cdiv(T, BT) + N
    c = torch.arange(NT_max, device=cu.device)
    seq = torch.searchsorted(cum, c, right=True)
    valid = seq < N
    local = c - offsets[seq.clamp(max=N - 1)]
    idx = torch.stack([torch.where(valid, seq, -1), torch.where(valid, local, 0)], 1)
    return idx.to(torch.int32).contiguous(), offsets.to(torch.int32).contiguous(), NT_max


# Kernels. Every tensor is contiguous [B, T, H, D] (B = 1 under varlen); `bos` is the flat token index of the
# sequence start, `T_n` its length; chunk-level tensors (h, dh) are [total chunks, H, K, V].


@triton.jit
def _bp(base, n0, n1, s0, s1, off0, off1, B0: tl.constexpr, B1: tl.constexpr):
    """Pointers and bounds mask of a [B0, B1] tile at (off0, off1) of an [n0, n1] view with strides (s0, s1).

    A transposed view of a row-major tensor is a swap of (n0, n1) and (s0, s1): transposed tiles come from memory.
    """
    o0 = off0 + tl.arange(0, B0)
    o1 = off1 + tl.arange(0, B1)
    return base + o0[:, None] * s0 + o1[None, :] * s1, (o0[:, None] < n0) & (o1[None, :] < n1)


@triton.jit
def _locate_chunk(i_c, i_b, cu_seqlens, chunk_indices, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(chunk index in its sequence, flat start token, sequence length, global chunk index); i_t < 0: no chunk."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        i_nc = tl.maximum(i_n, 0)
        bos = tl.load(cu_seqlens + i_nc).to(tl.int32)
        eos = tl.load(cu_seqlens + i_nc + 1).to(tl.int32)
        T_n = eos - bos
        i_t = tl.where(i_n < 0, -1, i_t)
        i_g = i_c
    else:
        i_t = i_c
        bos = i_b * T
        T_n = T
        i_g = i_b * tl.cdiv(T, BT) + i_c
    return i_t, bos, T_n, i_g


@triton.jit
def _locate_sub_chunk(i_c, i_i, i_b, cu_seqlens, chunk_indices, T, BT: tl.constexpr, BC: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    """(chunk index in its sequence, first row of its sub-chunk i_i, flat start token, sequence length); the row is -1
    where the sub-chunk holds no token (no chunk in this program's table slot, or past the sequence's end)."""
    i_t, bos, T_n, _i_g = _locate_chunk(i_c, i_b, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    row0 = i_t * BT + i_i * BC
    return i_t, tl.where((i_t < 0) | (row0 >= T_n), -1, row0), bos, T_n


@triton.jit
def _locate_seq(i_n, cu_seqlens, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(flat start token, length, number of chunks, first global chunk) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        T_n = eos - bos
        NT = tl.cdiv(T_n, BT)
        boh = tl.load(chunk_offsets + i_n).to(tl.int32)
    else:
        bos = i_n * T
        T_n = T
        NT = tl.cdiv(T, BT)
        boh = i_n * NT
    return bos, T_n, NT, boh


@triton.jit
def chunk_gla_fwd_kernel_cumsum(
    g, gc, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """gc [B, T, H, K] fp32: the gate's cumulative sum within each chunk, in base 2 (times log2 e), so that every
    decay factor downstream is one exp2 (tl.exp multiplies by log2 e before its exp2)."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T_n, _i_g = _locate_chunk(i_c, i_b, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = o_t < T_n
    p_g, mp_g = _bp(g + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
    b_g = tl.cumsum(tl.load(p_g, mask=mp_g, other=0).to(tl.float32), 0) * 1.4426950408889634
    p_o = gc + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
    tl.store(p_o, b_g, mask=m_t[:, None] & (o_k[None, :] < K))


@triton.jit
def chunk_gla_fwd_kernel_h(
    k, v, gc, h, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """Chunk-start states h [chunks, H, K, V] (k's dtype) by a loop over one sequence's chunks; fp32 carry."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n, NT, boh = _locate_seq(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + o_kv, mask=m_kv, other=0).to(tl.float32)
    for i_t in range(NT):
        tl.store(h + ((boh + i_t) * H + i_h) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        # [BK, BT]: k loaded transposed
        p_k, mp_k = _bp(k + (bos * H + i_h) * K, K, T_n, 1, H * K, i_k * BK, i_t * BT, BK, BT)
        p_v, mp_v = _bp(v + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        b_k = tl.load(p_k, mask=mp_k, other=0)
        b_v = tl.load(p_v, mask=mp_v, other=0)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, T_n) - 1
            b_gl = tl.load(gc + ((bos + last) * H + i_h) * K + o_k, mask=o_k < K, other=0)
            p_g, mp_g = _bp(gc + (bos * H + i_h) * K, K, T_n, 1, H * K, i_k * BK, i_t * BT, BK, BT)
            b_g = tl.load(p_g, mask=mp_g, other=0)
            b_h *= tl.exp2(b_gl)[:, None]
            b_k = b_k * tl.exp2(b_gl[:, None] - b_g)
        # 16-bit operands for the forward's 16-bit states; the backward recomputes fp32 states with fp32 operands
        b_h += tl.dot(b_k.to(h.dtype.element_ty), b_v.to(h.dtype.element_ty), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def chunk_gla_fwd_kernel_intra(
    q, k, gc, A, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """Intra-chunk scores A [B, T, H, BT] fp32 (scale folded in, zero above the diagonal), one BC x BC block off the
    diagonal each (`chunk_gla_fwd_kernel_intra_diag` writes the diagonal blocks)."""
    i_c, i_ij, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_i, i_j = i_ij // NC, i_ij % NC
    if i_i == i_j:
        return
    i_t, row0, bos, T_n = _locate_sub_chunk(i_c, i_i, i_b, cu_seqlens, chunk_indices, T, BT, BC, IS_VARLEN)
    if row0 < 0:
        return
    col0 = i_t * BT + i_j * BC
    o_r = tl.arange(0, BC)
    m_r = row0 + o_r < T_n
    p_A, mp_A = _bp(A + (bos * H + i_h) * BT, T_n, BT, H * BT, 1, row0, i_j * BC, BC, BC)
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    if i_i > i_j:
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            p_q, mp_q = _bp(q + (bos * H + i_h) * K, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
            p_kt, mp_kt = _bp(k + (bos * H + i_h) * K, K, T_n, 1, H * K, i_k * BK, col0, BK, BC)
            b_q = tl.load(p_q, mask=mp_q, other=0)
            b_kt = tl.load(p_kt, mask=mp_kt, other=0)
            if USE_G:
                p_g, mp_g = _bp(gc + (bos * H + i_h) * K, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
                p_gkt, mp_gkt = _bp(gc + (bos * H + i_h) * K, K, T_n, 1, H * K, i_k * BK, col0, BK, BC)
                b_gn = tl.load(gc + ((bos + row0) * H + i_h) * K + o_k, mask=o_k < K, other=0)
                b_g = tl.load(p_g, mask=mp_g, other=0)
                b_gkt = tl.load(p_gkt, mask=mp_gkt, other=0)
                b_qg = tl.where(m_r[:, None], b_q * tl.exp2(b_g - b_gn[None, :]), 0).to(b_q.dtype)
                b_kg = (b_kt * tl.exp2(b_gn[:, None] - b_gkt)).to(b_kt.dtype)
                b_A += tl.dot(b_qg, b_kg, input_precision=PREC)
            else:
                b_A += tl.dot(b_q, b_kt, input_precision=PREC)
    tl.store(p_A, (b_A * scale).to(A.dtype.element_ty), mask=mp_A)


@triton.jit
def chunk_gla_fwd_kernel_intra_diag(
    q, k, gc, A, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, DIAG_LOOP: tl.constexpr,
):
    """The diagonal blocks of A, one sub-chunk each, summed pairwise (every exponent <= 0); its key block can span
    the whole key dim (a launch of its own: these blocks take three quarters of the forward's intra-chunk time)."""
    i_c, i_i, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    _i_t, row0, bos, T_n = _locate_sub_chunk(i_c, i_i, i_b, cu_seqlens, chunk_indices, T, BT, BC, IS_VARLEN)
    if row0 < 0:
        return
    p_A, mp_A = _bp(A + (bos * H + i_h) * BT, T_n, BT, H * BT, 1, row0, i_i * BC, BC, BC)
    o_r = tl.arange(0, BC)
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    if USE_G:
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            p_q, mp_q = _bp(q + (bos * H + i_h) * K, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
            p_g, mp_g = _bp(gc + (bos * H + i_h) * K, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
            b_q = tl.load(p_q, mask=mp_q, other=0).to(tl.float32)
            b_g = tl.load(p_g, mask=mp_g, other=0)
            if DIAG_LOOP:
                for jj in range(BC):
                    m_j = o_k < tl.where(row0 + jj < T_n, K, 0)
                    b_kj = tl.load(k + ((bos + row0 + jj) * H + i_h) * K + o_k, mask=m_j, other=0).to(tl.float32)
                    b_gj = tl.load(gc + ((bos + row0 + jj) * H + i_h) * K + o_k, mask=m_j, other=0)
                    b_a = tl.sum(b_q * b_kj[None, :] * tl.exp2(b_g - b_gj[None, :]), 1)
                    b_A += tl.where((o_r[:, None] >= jj) & (o_r[None, :] == jj), b_a[:, None], 0)
            else:
                # the same sums as one [BC, BC, BK] tensor
                p_k, mp_k = _bp(k + (bos * H + i_h) * K, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
                b_k = tl.load(p_k, mask=mp_k, other=0).to(tl.float32)
                b_E = tl.where((o_r[:, None] >= o_r[None, :])[:, :, None],
                               tl.exp2(b_g[:, None, :] - b_g[None, :, :]), 0)
                b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_E, 2)
    else:
        for i_k in range(tl.cdiv(K, BK)):
            p_q, mp_q = _bp(q + (bos * H + i_h) * K, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
            p_kt, mp_kt = _bp(k + (bos * H + i_h) * K, K, T_n, 1, H * K, i_k * BK, row0, BK, BC)
            b_A += tl.dot(tl.load(p_q, mask=mp_q, other=0), tl.load(p_kt, mask=mp_kt, other=0),
                          input_precision=PREC)
        b_A = tl.where(o_r[:, None] >= o_r[None, :], b_A, 0)
    tl.store(p_A, (b_A * scale).to(A.dtype.element_ty), mask=mp_A)


@triton.jit
def chunk_gla_fwd_kernel_o(
    q, v, gc, h, A, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """o = scale * (q * exp(G)) h + A v, one [BT, BV] tile per program."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T_n, i_g = _locate_chunk(i_c, i_b, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_q, mp_q = _bp(q + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_h, mp_h = _bp(h + (i_g * H + i_h) * K * V, K, V, V, 1, i_k * BK, i_v * BV, BK, BV)
        b_q = tl.load(p_q, mask=mp_q, other=0)
        b_h = tl.load(p_h, mask=mp_h, other=0)
        if USE_G:
            p_g, mp_g = _bp(gc + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
            b_q = (b_q * tl.exp2(tl.load(p_g, mask=mp_g, other=0))).to(b_q.dtype)
        b_o += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC)
    b_o *= scale
    o_r = tl.arange(0, BT)
    p_A, mp_A = _bp(A + (bos * H + i_h) * BT, T_n, BT, H * BT, 1, i_t * BT, 0, BT, BT)
    p_v, mp_v = _bp(v + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
    b_v = tl.load(p_v, mask=mp_v, other=0)
    b_A = tl.where(o_r[:, None] >= o_r[None, :], tl.load(p_A, mask=mp_A, other=0), 0)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
    p_o, mp_o = _bp(o + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=mp_o)


@triton.jit
def chunk_gla_bwd_kernel_dh(
    q, do, gc, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """dh [chunks, H, K, V]: gradient w.r.t. the state at each chunk's END, by a reverse loop over chunks."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n, NT, boh = _locate_seq(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh * K * V + o_kv, mask=m_kv, other=0).to(tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tl.store(dh + ((boh + i_t) * H + i_h) * K * V + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        p_q, mp_q = _bp(q + (bos * H + i_h) * K, K, T_n, 1, H * K, i_k * BK, i_t * BT, BK, BT)
        p_do, mp_do = _bp(do + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        b_q = tl.load(p_q, mask=mp_q, other=0)
        b_do = tl.load(p_do, mask=mp_do, other=0)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, T_n) - 1
            b_gl = tl.load(gc + ((bos + last) * H + i_h) * K + o_k, mask=o_k < K, other=0)
            p_g, mp_g = _bp(gc + (bos * H + i_h) * K, K, T_n, 1, H * K, i_k * BK, i_t * BT, BK, BT)
            b_q = b_q * tl.exp2(tl.load(p_g, mask=mp_g, other=0))
            b_dh *= tl.exp2(b_gl)[:, None]
        b_dh += tl.dot(b_q.to(dh.dtype.element_ty), b_do.to(dh.dtype.element_ty), input_precision=PREC) * scale
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + o_kv, b_dh, mask=m_kv)


@triton.jit
def chunk_gla_bwd_kernel_dA(
    v, do, dA, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """dA [B, T, H, BT] fp32 = scale * do v^T within the chunk, zero above the diagonal."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T_n, _i_g = _locate_chunk(i_c, i_b, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        p_do, mp_do = _bp(do + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        p_vt, mp_vt = _bp(v + (bos * H + i_h) * V, V, T_n, 1, H * V, i_v * BV, i_t * BT, BV, BT)
        b_do = tl.load(p_do, mask=mp_do, other=0)
        b_dA += tl.dot(b_do, tl.load(p_vt, mask=mp_vt, other=0).to(b_do.dtype), input_precision=PREC)
    o_r = tl.arange(0, BT)
    b_dA = tl.where(o_r[:, None] >= o_r[None, :], b_dA * scale, 0)
    p_dA, mp_dA = _bp(dA + (bos * H + i_h) * BT, T_n, BT, H * BT, 1, i_t * BT, 0, BT, BT)
    tl.store(p_dA, b_dA, mask=mp_dA)


@triton.jit
def chunk_gla_bwd_kernel_dv(
    k, gc, A, do, dh, dv, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """dv = A^T do + (k * exp(G_last - G)) dh, with A^T a tile loaded transposed."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T_n, i_g = _locate_chunk(i_c, i_b, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_r = tl.arange(0, BT)
    p_At, mp_At = _bp(A + (bos * H + i_h) * BT, BT, T_n, 1, H * BT, 0, i_t * BT, BT, BT)
    p_do, mp_do = _bp(do + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
    b_do = tl.load(p_do, mask=mp_do, other=0)
    b_At = tl.where(o_r[:, None] <= o_r[None, :], tl.load(p_At, mask=mp_At, other=0), 0)
    b_dv = tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC)
    if USE_G:
        last = tl.minimum(i_t * BT + BT, T_n) - 1
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_k, mp_k = _bp(k + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        p_dh, mp_dh = _bp(dh + (i_g * H + i_h) * K * V, K, V, V, 1, i_k * BK, i_v * BV, BK, BV)
        b_k = tl.load(p_k, mask=mp_k, other=0)
        if USE_G:
            p_g, mp_g = _bp(gc + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
            b_gl = tl.load(gc + ((bos + last) * H + i_h) * K + o_k, mask=o_k < K, other=0)
            b_k = (b_k * tl.exp2(b_gl[None, :] - tl.load(p_g, mask=mp_g, other=0))).to(b_k.dtype)
        b_dv += tl.dot(b_k, tl.load(p_dh, mask=mp_dh, other=0).to(b_k.dtype), input_precision=PREC)
    p_dv, mp_dv = _bp(dv + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=mp_dv)


@triton.jit
def chunk_gla_bwd_kernel_inter(
    v, gc, h, do, dh, dq, dk, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """State parts of dq, dk (fp32): dq = scale * exp(G) * (do h^T), dk = exp(G_last - G) * (v dh^T)."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T_n, i_g = _locate_chunk(i_c, i_b, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        p_do, mp_do = _bp(do + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        p_v, mp_v = _bp(v + (bos * H + i_h) * V, T_n, V, H * V, 1, i_t * BT, i_v * BV, BT, BV)
        # [BV, BK]: h and dh loaded transposed
        p_ht, mp_ht = _bp(h + (i_g * H + i_h) * K * V, V, K, 1, V, i_v * BV, i_k * BK, BV, BK)
        p_dht, mp_dht = _bp(dh + (i_g * H + i_h) * K * V, V, K, 1, V, i_v * BV, i_k * BK, BV, BK)
        b_do = tl.load(p_do, mask=mp_do, other=0)
        b_v = tl.load(p_v, mask=mp_v, other=0)
        b_dq += tl.dot(b_do.to(tl.float32), tl.load(p_ht, mask=mp_ht, other=0), input_precision=PREC)
        b_dk += tl.dot(b_v.to(tl.float32), tl.load(p_dht, mask=mp_dht, other=0), input_precision=PREC)
    if USE_G:
        o_k = i_k * BK + tl.arange(0, BK)
        last = tl.minimum(i_t * BT + BT, T_n) - 1
        b_gl = tl.load(gc + ((bos + last) * H + i_h) * K + o_k, mask=o_k < K, other=0)
        p_g, mp_g = _bp(gc + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        b_g = tl.load(p_g, mask=mp_g, other=0)
        b_dq *= tl.exp2(b_g)
        b_dk *= tl.exp2(b_gl[None, :] - b_g)
    p_dq, mp_dq = _bp(dq + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
    p_dk, mp_dk = _bp(dk + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
    tl.store(p_dq, b_dq * scale, mask=mp_dq)
    tl.store(p_dk, b_dk, mask=mp_dk)


@triton.jit
def chunk_gla_bwd_kernel_intra(
    q, k, gc, dA, dq_inter, dk_inter, dq, dk, dgt, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, DIAG_LOOP: tl.constexpr,
):
    """Intra-chunk parts of dq, dk for one BC-row sub-chunk, plus the state parts; writes dq, dk and, for the gate,
    the per-token term dgt = q * dq - k * dk (fp32).

    dq_i = sum_{j<=i} dA_ij k_j exp(G_i - G_j): earlier sub-chunks referenced at G of this sub-chunk's first row.
    dk_j = sum_{i>=j} dA_ij q_i exp(G_i - G_j): later sub-chunks referenced at G of this sub-chunk's last row.
    """
    i_k, i_ci, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_c, i_i = i_ci // NC, i_ci % NC
    i_t, row0, bos, T_n = _locate_sub_chunk(i_c, i_i, i_b, cu_seqlens, chunk_indices, T, BT, BC, IS_VARLEN)
    if row0 < 0:
        return
    o_r = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_r = row0 + o_r < T_n
    base_k = (bos * H + i_h) * K
    base_A = (bos * H + i_h) * BT
    p_q, mp_q = _bp(q + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
    p_k, mp_k = _bp(k + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
    b_q = tl.load(p_q, mask=mp_q, other=0)
    b_k = tl.load(p_k, mask=mp_k, other=0)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    if USE_G:
        p_g, mp_g = _bp(gc + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
        b_g = tl.load(p_g, mask=mp_g, other=0)
        b_gn = tl.load(gc + ((bos + row0) * H + i_h) * K + o_k, mask=m_k, other=0)
    for i_j in range(i_i):
        col0 = i_t * BT + i_j * BC
        p_kj, mp_kj = _bp(k + base_k, T_n, K, H * K, 1, col0, i_k * BK, BC, BK)
        p_dA, mp_dA = _bp(dA + base_A, T_n, BT, H * BT, 1, row0, i_j * BC, BC, BC)
        b_kj = tl.load(p_kj, mask=mp_kj, other=0)
        if USE_G:
            p_gj, mp_gj = _bp(gc + base_k, T_n, K, H * K, 1, col0, i_k * BK, BC, BK)
            b_kj = b_kj * tl.exp2(b_gn[None, :] - tl.load(p_gj, mask=mp_gj, other=0))
        b_dq += tl.dot(tl.load(p_dA, mask=mp_dA, other=0), b_kj.to(tl.float32), input_precision=PREC)
    if USE_G:
        b_dq *= tl.where(m_r[:, None], tl.exp2(b_g - b_gn[None, :]), 0)
    if DIAG_LOOP:
        for jj in range(BC):
            m_j = o_k < tl.where(row0 + jj < T_n, K, 0)
            b_kd = tl.load(k + ((bos + row0 + jj) * H + i_h) * K + o_k, mask=m_j, other=0).to(tl.float32)
            # column jj of this diagonal block of dA: [BC]
            b_dAc = tl.load(dA + (bos + row0 + o_r) * H * BT + i_h * BT + i_i * BC + jj, mask=m_r, other=0)
            b_tq = b_dAc[:, None] * b_kd[None, :]
            if USE_G:
                b_gd = tl.load(gc + ((bos + row0 + jj) * H + i_h) * K + o_k, mask=m_j, other=0)
                b_tq *= tl.exp2(b_g - b_gd[None, :])
            b_dq += tl.where((o_r[:, None] >= jj) & m_r[:, None], b_tq, 0)

    last = tl.minimum(row0 + BC, T_n) - 1
    if USE_G:
        b_gn = tl.load(gc + ((bos + last) * H + i_h) * K + o_k, mask=m_k, other=0)
    for i_j in range(i_i + 1, NC):
        r0 = i_t * BT + i_j * BC
        m_rj = r0 + o_r < T_n
        p_qj, mp_qj = _bp(q + base_k, T_n, K, H * K, 1, r0, i_k * BK, BC, BK)
        # [our rows, their rows]: dA loaded transposed
        p_dAt, mp_dAt = _bp(dA + base_A, BT, T_n, 1, H * BT, i_i * BC, r0, BC, BC)
        b_qj = tl.load(p_qj, mask=mp_qj, other=0)
        if USE_G:
            p_gj, mp_gj = _bp(gc + base_k, T_n, K, H * K, 1, r0, i_k * BK, BC, BK)
            b_e = tl.exp2(tl.load(p_gj, mask=mp_gj, other=0) - b_gn[None, :])
            b_qj = tl.where(m_rj[:, None], b_qj * b_e, 0)
        b_dk += tl.dot(tl.load(p_dAt, mask=mp_dAt, other=0), b_qj.to(tl.float32), input_precision=PREC)
    if USE_G:
        b_dk *= tl.exp2(b_gn[None, :] - b_g)
    if not DIAG_LOOP:
        # both diagonal-block sums as [BC, BC, BK] tensors (cheaper under the interpreter)
        p_dAd, mp_dAd = _bp(dA + base_A, T_n, BT, H * BT, 1, row0, i_i * BC, BC, BC)
        b_dAd = tl.load(p_dAd, mask=mp_dAd, other=0)
        # rows past the end (gate 0 there) are left out: exp(0 - G) overflows once the chunk's decay passes -88
        tri = ((o_r[:, None] >= o_r[None, :]) & m_r[:, None])[:, :, None]
        b_E = tl.where(tri, b_dAd[:, :, None], 0)
        if USE_G:
            b_E = tl.where(tri, b_E * tl.exp2(b_g[:, None, :] - b_g[None, :, :]), 0)
        b_dq += tl.sum(b_E * b_k.to(tl.float32)[None, :, :], 1)
        b_dk += tl.sum(b_E * b_q.to(tl.float32)[:, None, :], 0)
    else:
        for ii in range(BC):
            m_i = o_k < tl.where(row0 + ii < T_n, K, 0)
            b_qi = tl.load(q + ((bos + row0 + ii) * H + i_h) * K + o_k, mask=m_i, other=0).to(tl.float32)
            # row ii of this diagonal block of dA: [BC]
            b_dAr = tl.load(dA + (bos + row0 + ii) * H * BT + i_h * BT + i_i * BC + o_r,
                            mask=o_r < tl.where(row0 + ii < T_n, BC, 0), other=0)
            b_tk = b_dAr[:, None] * b_qi[None, :]
            if USE_G:
                b_gi = tl.load(gc + ((bos + row0 + ii) * H + i_h) * K + o_k, mask=m_i, other=0)
                b_tk *= tl.exp2(b_gi[None, :] - b_g)
            # a row ii past the end has gate 0, where exp(0 - G) can overflow: it contributes nothing
            b_dk += tl.where((o_r[:, None] <= ii) & (row0 + ii < T_n), b_tk, 0)

    p_dqi, mp_dqi = _bp(dq_inter + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
    p_dki, mp_dki = _bp(dk_inter + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
    b_dq += tl.load(p_dqi, mask=mp_dqi, other=0)
    b_dk += tl.load(p_dki, mask=mp_dki, other=0)
    p_dq, mp_dq = _bp(dq + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
    p_dk, mp_dk = _bp(dk + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=mp_dq)
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=mp_dk)
    if USE_G:
        p_dg, mp_dg = _bp(dgt + base_k, T_n, K, H * K, 1, row0, i_k * BK, BC, BK)
        tl.store(p_dg, b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, mask=mp_dg)


@triton.jit
def chunk_gla_bwd_kernel_dg(
    dgt, dg_last, dg, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    USE_DG_LAST: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dg [B, T, H, K] fp32: reverse cumulative sum over each sequence of dgt, started at dg_last [N, H, K]."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T_n, NT, _boh = _locate_seq(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    b_acc = tl.zeros([BK], dtype=tl.float32)
    if USE_DG_LAST:
        b_acc += tl.load(dg_last + i_nh * K + o_k, mask=o_k < K, other=0)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        p_x, mp_x = _bp(dgt + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        b_x = tl.load(p_x, mask=mp_x, other=0)
        b_s = tl.sum(b_x, 0)
        b_out = b_acc[None, :] + b_s[None, :] - tl.cumsum(b_x, 0) + b_x
        p_o, mp_o = _bp(dg + (bos * H + i_h) * K, T_n, K, H * K, 1, i_t * BT, i_k * BK, BT, BK)
        tl.store(p_o, b_out, mask=mp_o)
        b_acc += b_s


# Host functions.


def _gate_cumsum(g, B, T, H, K, cu_seqlens, chunk_indices, NT_grid, bs):
    gc = _empty(B, T, H, K, dtype=torch.float32, device=g.device)
    BK = bs["BK"]
    grid = (triton.cdiv(K, BK), NT_grid, B * H)
    chunk_gla_fwd_kernel_cumsum[grid](
        g, gc, cu_seqlens, chunk_indices, T, H=H, K=K, BT=bs["BT"], BK=BK,
        IS_VARLEN=cu_seqlens is not None, **_launch("cumsum"),
    )
    return gc


def _states(k, v, gc, h0, want_ht, B, T, H, K, V, N, NT_total, cu_seqlens, chunk_offsets, bs, dtype=None):
    BK, BV = bs["BK"], bs["BV"]
    h = _empty(NT_total, H, K, V, dtype=dtype or k.dtype, device=k.device)
    ht = _empty(N, H, K, V, dtype=torch.float32, device=k.device) if want_ht else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), N * H)
    chunk_gla_fwd_kernel_h[grid](
        k, v, gc if gc is not None else k, h, h0 if h0 is not None else k, ht if ht is not None else k,
        cu_seqlens, chunk_offsets, T, H=H, K=K, V=V, BT=bs["BT"], BK=BK, BV=BV, USE_G=gc is not None,
        USE_H0=h0 is not None, STORE_HT=want_ht, IS_VARLEN=cu_seqlens is not None, PREC=dot_precision(k),
        **(_launch("h") | {"num_stages": bs["H_STAGES"]}),
    )
    return h, ht


def _meta(q, cu_seqlens, B, T, bs):
    BT = bs["BT"]
    if cu_seqlens is None:
        NT = triton.cdiv(T, BT)
        return None, None, NT, B * NT
    chunk_indices, chunk_offsets, NT_max = prepare_varlen_chunks(cu_seqlens, T, BT)
    return chunk_indices, chunk_offsets, NT_max, NT_max


def chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, bs):
    """Forward on contiguous inputs: returns (o, final_state or None, A, gc) with A [B, T, H, BT] and the gate's
    chunk-local cumulative sum gc [B, T, H, K] in base 2 (None without a gate), both fp32, for the backward."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT, BC, BK, BV = bs["BT"], bs["BC"], bs["BK"], bs["BV"]
    chunk_indices, chunk_offsets, NT_grid, NT_total = _meta(q, cu_seqlens, B, T, bs)
    varlen = cu_seqlens is not None
    gc = None if g is None else _gate_cumsum(g, B, T, H, K, cu_seqlens, chunk_indices, NT_grid, bs)
    h, ht = _states(k, v, gc, initial_state, output_final_state, B, T, H, K, V, N, NT_total, cu_seqlens,
                    chunk_offsets, bs)
    A = _empty(B, T, H, BT, dtype=torch.float32, device=q.device)
    NC = BT // BC
    common = {"H": H, "K": K, "BT": BT, "BC": BC, "USE_G": gc is not None, "IS_VARLEN": varlen,
              "PREC": dot_precision(q)}
    chunk_gla_fwd_kernel_intra[(NT_grid, NC * NC, B * H)](
        q, k, gc if gc is not None else q, A, cu_seqlens, chunk_indices, scale, T, BK=BK, NC=NC, **common,
        **_launch("intra"),
    )
    wide = K > 128
    chunk_gla_fwd_kernel_intra_diag[(NT_grid, NC, B * H)](
        q, k, gc if gc is not None else q, A, cu_seqlens, chunk_indices, scale, T,
        BK=min(bs["BK_DIAG"], max(16, triton.next_power_of_2(K))), DIAG_LOOP=_diag_loop(), **common,
        **_launch("intra_diag_wide" if wide else "intra_diag"),
    )
    o = _empty(B, T, H, V, dtype=v.dtype, device=q.device)
    chunk_gla_fwd_kernel_o[(triton.cdiv(V, BV), NT_grid, B * H)](
        q, v, gc if gc is not None else q, h, A, o, cu_seqlens, chunk_indices, scale, T, H=H, K=K, V=V, BT=BT, BK=BK,
        BV=BV, USE_G=gc is not None, IS_VARLEN=varlen, PREC=dot_precision(q), **_launch("o"),
    )
    return o, ht, A, gc


def chunk_gla_bwd(q, k, v, g, gc, A, scale, initial_state, cu_seqlens, do, dht, bs):
    """Backward from the forward's gate cumsum gc and scores A: recompute the states, then dh, dv, dq, dk, dg and
    dh0. (Recomputing gc instead of keeping it costs a kernel as long as fla's whole cumsum: 0.09 ms at B16 x T2048 x
    H4 x D256.)"""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT, BC, BK, BV = bs["BT"], bs["BC"], bs["BK"], bs["BV"]
    chunk_indices, chunk_offsets, NT_grid, NT_total = _meta(q, cu_seqlens, B, T, bs)
    varlen = cu_seqlens is not None
    use_g = g is not None
    gcp = gc if use_g else q
    # the final state is only needed for the gate's final-state term
    want_ht = use_g and dht is not None
    h, ht = _states(k, v, gc, initial_state, want_ht, B, T, H, K, V, N, NT_total, cu_seqlens, chunk_offsets, bs,
                    dtype=torch.float32)
    dh = _empty(NT_total, H, K, V, dtype=torch.float32, device=q.device)
    dh0 = _empty(N, H, K, V, dtype=torch.float32, device=q.device) if initial_state is not None else None
    chunk_gla_bwd_kernel_dh[(triton.cdiv(K, bs["BK_DH"]), triton.cdiv(V, BV), N * H)](
        q, do, gcp, dh, dht if dht is not None else q, dh0 if dh0 is not None else q, cu_seqlens, chunk_offsets,
        scale, T, H=H, K=K, V=V, BT=BT, BK=bs["BK_DH"], BV=BV, USE_G=use_g, USE_DHT=dht is not None,
        STORE_DH0=dh0 is not None, IS_VARLEN=varlen, PREC=dot_precision(q), **_launch("dh"),
    )
    dA = _empty(B, T, H, BT, dtype=torch.float32, device=q.device)
    chunk_gla_bwd_kernel_dA[(NT_grid, B * H)](
        v, do, dA, cu_seqlens, chunk_indices, scale, T, H=H, V=V, BT=BT, BV=BV, IS_VARLEN=varlen, PREC=dot_precision(q),
        **_launch("dA"),
    )
    dv = _empty(B, T, H, V, dtype=v.dtype, device=q.device)
    chunk_gla_bwd_kernel_dv[(triton.cdiv(V, BV), NT_grid, B * H)](
        k, gcp, A, do, dh, dv, cu_seqlens, chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g,
        IS_VARLEN=varlen, PREC=dot_precision(q), **_launch("dv"),
    )
    dq_inter = _empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dk_inter = _empty(B, T, H, K, dtype=torch.float32, device=q.device)
    chunk_gla_bwd_kernel_inter[(triton.cdiv(K, BK), NT_grid, B * H)](
        v, gcp, h, do, dh, dq_inter, dk_inter, cu_seqlens, chunk_indices, scale, T, H=H, K=K, V=V, BT=BT, BK=BK,
        BV=BV, USE_G=use_g, IS_VARLEN=varlen, PREC=dot_precision(q), **_launch("inter"),
    )
    del h, dh  # the fp32 states' last reader has run: dq, dk and dgt can take their memory
    dq = _empty(B, T, H, K, dtype=q.dtype, device=q.device)
    dk = _empty(B, T, H, K, dtype=k.dtype, device=q.device)
    dgt = _empty(B, T, H, K, dtype=torch.float32, device=q.device) if use_g else None
    NC = BT // BC
    chunk_gla_bwd_kernel_intra[(triton.cdiv(K, BK), NT_grid * NC, B * H)](
        q, k, gcp, dA, dq_inter, dk_inter, dq, dk, dgt if use_g else q, cu_seqlens, chunk_indices, T, H=H, K=K,
        BT=BT, BC=BC, BK=BK, NC=NC, USE_G=use_g, IS_VARLEN=varlen, PREC=dot_precision(q), DIAG_LOOP=_diag_loop(),
        **_launch("bwd_intra"),
    )
    dg = gate_grad(dgt, ht, dht, g, cu_seqlens, bs) if use_g else None
    return dq, dk, dv, dg, dh0


def gate_grad(dgt, ht, dht, g, cu_seqlens, bs=None):
    """dg from the per-token terms dgt = q * dq - k * dk [B, T, H, K] fp32: a reverse cumulative sum over each
    sequence, started at the final-state term sum_v ht * dht (ht, dht [N, H, K, V] or None). Sync-free."""
    B, T, H, K = dgt.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    bs = bs or _block_sizes(K, K, N, H, dgt.device)
    BT, BK = bs["BT"], bs["BK_DG"]
    chunk_offsets = None if cu_seqlens is None else prepare_varlen_chunks(cu_seqlens, T, BT)[1]
    dg_last = (ht * dht.float()).sum(-1).contiguous() if ht is not None and dht is not None else None  # [N, H, K]
    dg = _empty(B, T, H, K, dtype=torch.float32, device=dgt.device)
    chunk_gla_bwd_kernel_dg[(triton.cdiv(K, BK), N * H)](
        dgt.contiguous(), dg_last if dg_last is not None else dgt, dg, cu_seqlens, chunk_offsets, T, H=H, K=K, BT=BT,
        BK=BK, USE_DG_LAST=dg_last is not None, IS_VARLEN=cu_seqlens is not None, **_launch("dg"),
    )
    # a scalar gate (the fused recurrent kernels' backward) is broadcast over K: its gradient sums over K
    return (dg.sum(-1) if g.dim() == 3 else dg).to(g.dtype)


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        bs = _block_sizes(q.shape[-1], v.shape[-1], N, q.shape[2], q.device)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = g.contiguous() if g is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht, A, gc = chunk_gla_fwd(q, k, v, g, scale, h0, output_final_state, cu_seqlens, bs)
        ctx.save_for_backward(q, k, v, g, gc, h0, A, cu_seqlens)
        ctx.scale, ctx.bs = scale, bs
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, gc, h0, A, cu_seqlens = ctx.saved_tensors
        dht = dht.float().contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(q, k, v, g, gc, A, ctx.scale, h0, cu_seqlens, do.contiguous(), dht, ctx.bs)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dg, None, dh0, None, None


def chunk_gla(
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
    """Gated linear attention, chunked: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; fp32, fp16 or bf16 (one dtype), fp32 accumulation.
        g: log-decay (<= 0), None (no decay), [B, T, H] (per head and step) or [B, T, H, K] (per key channel).
        scale: defaults to K ** -0.5.
        initial_state: [N, H, K, V] (fp32 preferred), N = B, or the number of segments with cu_seqlens.
        output_final_state: also return the final state [N, H, K, V] fp32.
        cu_seqlens: [N + 1] int32/int64 segment offsets into a packed B = 1 batch; zero-length segments allowed.
        backend: None (Triton on CUDA, torch on CPU), "triton" or "torch".
        check_inputs: check cu_seqlens values on the host (a device sync); pass False on a sync-free hot path.

    Returns:
        o [B, T, H, V] in v's dtype, and the final state or None.
    """
    validate_gla_inputs(q, k, v, g, initial_state, cu_seqlens, check_inputs)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q, backend):
        return torch_chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if g is not None and g.dim() == 3:
        # one decay per head and step: the delta rule's state kernels without its WY transform (no per-channel
        # decay to carry through the chunk's products)
        return chunk_scalar_decay(q, k, v, None, g, scale, initial_state, output_final_state, cu_seqlens)
    return ChunkGLAFunction.apply(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
