"""Gated linear attention, by definition (a loop over time), and a chunked pure-torch version for CPU.

Per (sequence, head), with an fp32 state S [K, V] and the gate in log space g (a_t = exp(g_t), g_t <= 0):
    S_t = diag(a_t) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t
g selects the decay mode by its shape: None (no decay), [B, T, H] (one decay per head and step: retention, simple
GLA, Mamba2) or [B, T, H, K] (one decay per key channel: GLA, HGRN2).
"""
from __future__ import annotations

import torch
from linear_moe.kernels.common import (
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_per_step,
    check_qkv,
    check_state,
    fit_chunk,
    pack_varlen,
    segments,
    unpack_varlen,
)


def validate_gla_inputs(q, k, v, g, initial_state, cu_seqlens, check_inputs: bool = True):
    """Shape/dtype checks shared by every GLA entry point; returns (B, T, H, K, V, N).

    Value checks of cu_seqlens read it on the host (a sync on GPU), so they only run when `check_inputs` is True.
    """
    B, T, H, K, V = check_qkv(q, k, v)
    if g is not None:
        if g.dim() == 3:
            check_per_step("g", g, B, T, H)
        elif g.dim() == 4:
            check_per_step("g", g, B, T, H, K)
        else:
            raise ValueError(f"g must be None, [B, T, H] or [B, T, H, K], got shape {list(g.shape)}")
    N = check_cu_seqlens(cu_seqlens, B, T)
    if cu_seqlens is not None and check_inputs:
        check_cu_seqlens_values(cu_seqlens, T)
    check_state("initial_state", initial_state, N, H, K, V)
    for name, t in (("g", g), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
    if initial_state is not None and not initial_state.is_floating_point():
        raise ValueError(f"initial_state.dtype={initial_state.dtype} must be a float dtype")
    return B, T, H, K, V, N


def _expand_gate(g: torch.Tensor | None, K: int) -> torch.Tensor | None:
    """[B, T, H] -> [B, T, H, 1] so both gated modes broadcast over the key channel; fp32."""
    if g is None:
        return None
    g = g.float()
    return g.unsqueeze(-1) if g.dim() == 3 else g


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition: an fp32 loop over time. q, k [B, T, H, K], v [B, T, H, V], g None | [B, T, H] | [B, T, H, K].

    Returns o [B, T, H, V] (v's dtype) and the final state [N, H, K, V] fp32 when `output_final_state`.
    With `cu_seqlens` [N + 1], B is 1 and each segment runs from its own initial state.
    """
    B, T, H, K, V, _ = validate_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    scale = K**-0.5 if scale is None else scale
    gf = _expand_gate(g, K)
    qf, kf, vf = q.float(), k.float(), v.float()
    outs, finals = [], []
    for n, (b, bos, eos) in enumerate(segments(cu_seqlens, B, T)):
        S = q.new_zeros(H, K, V, dtype=torch.float32) if initial_state is None else initial_state[n].float()
        steps = []
        for t in range(bos, eos):
            if gf is not None:
                S = S * gf[b, t].exp()[..., None]  # decay [H, 1 or K, 1]
            S = S + kf[b, t][..., None] * vf[b, t][:, None, :]
            steps.append(scale * torch.einsum("hk,hkv->hv", qf[b, t], S))
        outs.append(torch.stack(steps, 0) if steps else qf.new_zeros(0, H, V))
        finals.append(S)
    o = torch.stack(outs, 0) if cu_seqlens is None else torch.cat(outs, 0).unsqueeze(0)
    return o.to(v.dtype), (torch.stack(finals, 0) if output_final_state else None)


def _chunk_one(q, k, v, g, scale, S, BT: int, BC: int):
    """One sequence, chunked: q, k [T, H, K], v [T, H, V], g None | [T, H, 1 or K] fp32, S [H, K, V] fp32.

    Intra-chunk decays use sub-chunks of BC so that every exponent is <= 0: the off-diagonal sub-chunk blocks take the
    cumulative gate at the first row of the query sub-chunk as reference, the diagonal blocks are computed pairwise.
    """
    T, H, _ = q.shape
    V = v.shape[-1]
    NT = (T + BT - 1) // BT
    pad = NT * BT - T
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        if g is not None:
            g = torch.nn.functional.pad(g, (0, 0, 0, 0, 0, pad))
    # [H, NT, BT, D]
    q, k, v = (x.reshape(NT, BT, H, -1).permute(2, 0, 1, 3) for x in (q, k, v))
    q = q * scale
    NC = BT // BC
    causal = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    if g is None:
        A = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0)
        qg, kg, gl = q, k, None
    else:
        G = g.reshape(NT, BT, H, -1).permute(2, 0, 1, 3).cumsum(2)  # [H, NT, BT, 1 or K]
        A = q.new_zeros(H, NT, BT, BT)
        blocks = []
        for r in range(NC):
            rows = slice(r * BC, (r + 1) * BC)
            ref = G[:, :, r * BC : r * BC + 1]
            qr = q[:, :, rows] * (G[:, :, rows] - ref).exp()
            row = []
            if r > 0:
                kc = k[:, :, : r * BC] * (ref - G[:, :, : r * BC]).exp()
                row.append(qr @ kc.transpose(-1, -2))
            # diagonal block, pairwise: [H, NT, BC, BC, K]
            dG = G[:, :, rows].unsqueeze(-2) - G[:, :, rows].unsqueeze(-3)
            dG = dG.masked_fill(~causal[:BC, :BC, None], float("-inf"))
            diag = (q[:, :, rows].unsqueeze(-2) * k[:, :, rows].unsqueeze(-3) * dG.exp()).sum(-1)
            row.append(diag)
            row.append(q.new_zeros(H, NT, BC, BT - (r + 1) * BC))
            blocks.append(torch.cat(row, -1))
        A = torch.cat(blocks, -2)
        gl = G[:, :, -1:]  # [H, NT, 1, 1 or K]
        qg = q * G.exp()
        kg = k * (gl - G).exp()
    Av = A @ v  # [H, NT, BT, V]
    outs = []
    for t in range(NT):
        outs.append(Av[:, t] + qg[:, t] @ S)
        if gl is None:
            S = S + k[:, t].transpose(-1, -2) @ v[:, t]
        else:
            S = S * gl[:, t, 0].unsqueeze(-1).exp() + kg[:, t].transpose(-1, -2) @ v[:, t]
    o = torch.stack(outs, 1).reshape(H, NT * BT, V).transpose(0, 1)[:T]
    return o, S


def torch_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked pure-torch GLA (fp32 inside, differentiable by autograd): the CPU path of `chunk_gla`.

    Same arguments and returns as `naive_recurrent_gla`. Sequences (and varlen segments, zero-padded to
    the longest: a host read of cu_seqlens) run as one batch folded into the head dim; the Triton path is sync-free.
    """
    _, _, H, K, V, _ = validate_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    scale = K**-0.5 if scale is None else scale
    gf = _expand_gate(g, K)
    qf, kf, vf = q.float(), k.float(), v.float()
    index = None
    if cu_seqlens is not None:
        # all segments as one zero-padded batch (padding at a segment's end leaves its state alone)
        (qf, kf, vf, gf), index = unpack_varlen([qf, kf, vf, gf], cu_seqlens)
    N, L = qf.shape[:2]
    # sequences are independent like heads: fold them into the head dim, [L, N * H, D]
    fold = lambda x: None if x is None else x.transpose(0, 1).reshape(L, N * H, x.shape[-1])
    S = torch.zeros(N * H, K, V, device=q.device) if initial_state is None else \
        initial_state.float().reshape(N * H, K, V)
    if L:
        o, S = _chunk_one(fold(qf), fold(kf), fold(vf), fold(gf), scale, S, fit_chunk(chunk_size, L, 16), 16)
    else:
        o = qf.new_zeros(0, N * H, V)
    o = o.reshape(L, N, H, V).transpose(0, 1)
    o = o if index is None else pack_varlen(o, index)
    return o.to(v.dtype), (S.reshape(N, H, K, V) if output_final_state else None)
