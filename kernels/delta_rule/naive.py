"""The delta rule, by definition (a loop over time), and a chunked pure-torch version for CPU.

Per (sequence, head), with an fp32 state S [K, V], gate a_t = exp(g_t) (a_t = 1 when g is None):
    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
from linear_moe.kernels.norms import torch_l2norm as l2norm


def validate_delta_rule_inputs(q, k, v, beta, g, initial_state, cu_seqlens, check_inputs: bool = True):
    """Shape/dtype checks shared by every delta-rule entry point; returns (B, T, H, K, V, N).

    Value checks of cu_seqlens read it on the host, so they only run when `check_inputs` is True.
    """
    B, T, H, K, V = check_qkv(q, k, v)
    if beta is None:
        raise ValueError("beta must be a [B, T, H] tensor, got None")
    check_per_step("beta", beta, B, T, H)
    check_per_step("g", g, B, T, H)
    N = check_cu_seqlens(cu_seqlens, B, T)
    if cu_seqlens is not None and check_inputs:
        check_cu_seqlens_values(cu_seqlens, T)
    check_state("initial_state", initial_state, N, H, K, V)
    for name, t in (("beta", beta), ("g", g), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
    return B, T, H, K, V, N


def naive_recurrent_delta_rule(
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
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference delta rule: q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g [B, T, H] (log gate) or None.

    initial_state: [N, H, K, V]; cu_seqlens: [N + 1] offsets with B == 1. Returns o [B, T, H, V] in v's dtype
    and the fp32 final state [N, H, K, V] (or None). Computed in fp32 step by step; differentiable by autograd.
    """
    B, T, H, K, V, _ = validate_delta_rule_inputs(q, k, v, beta, g, initial_state, cu_seqlens, check_inputs)
    scale = K**-0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    qf, kf, vf, bf = q.float(), k.float(), v.float(), beta.float()
    gf = g.float() if g is not None else None
    outs = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, bos, eos) in enumerate(segments(cu_seqlens, B, T)):
        S = q.new_zeros(H, K, V, dtype=torch.float32) if initial_state is None else initial_state[n].float()
        for t in range(bos, eos):
            if gf is not None:
                S = S * gf[b, t].exp()[:, None, None]
            kt, bt = kf[b, t], bf[b, t]
            # [H, V]: the delta between the target v_t and the state's prediction S^T k_t
            u = bt[:, None] * (vf[b, t] - torch.einsum("hkv,hk->hv", S, kt))
            S = S + kt[:, :, None] * u[:, None, :]
            outs[b][t] = scale * torch.einsum("hkv,hk->hv", S, qf[b, t])
        finals.append(S)
    o = torch.stack([torch.stack(row) if T else vf.new_zeros(0, H, V) for row in outs]).to(v.dtype)
    return o, (torch.stack(finals) if output_final_state else None)


def _chunk_fixed(q, k, v, beta, g, h0, chunk_size: int):
    """Chunked delta rule for equal-length fp32 sequences [B, T, H, D] (q already scaled); returns (o, h_final)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = chunk_size
    NC = (T + BT - 1) // BT
    pad = NC * BT - T
    # zero padding is inert: k = 0 and beta = 0 leave the state alone, g = 0 keeps the chunk's last decay
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
        g = F.pad(g, (0, 0, 0, pad)) if g is not None else None

    def chunks(x):  # [B, T, H, ...] -> [B, H, NC, BT, ...]
        x = x.reshape(B, NC, BT, H, *x.shape[3:])
        return x.movedim(3, 1)

    q, k, v, beta = chunks(q), chunks(k), chunks(v), chunks(beta)
    idx = torch.arange(BT, device=q.device)
    incl = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    if g is not None:
        G = chunks(g).cumsum(-1)  # [B, H, NC, BT]
        diff = (G[..., :, None] - G[..., None, :]).masked_fill(~incl, float("-inf"))
        decay = diff.exp()  # [B, H, NC, BT, BT], exp(G_i - G_j) for i >= j
        gam = G.exp()
        last = G[..., -1:]
        kdec = k * (last - G).exp()[..., None]
        glast = last.exp()[..., 0]  # [B, H, NC]
    else:
        decay = incl.to(q.dtype).expand(B, H, NC, BT, BT)
        gam = torch.ones_like(beta)
        kdec = k
        glast = None
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0)
    eye = torch.eye(BT, device=q.device, dtype=q.dtype)
    Tm = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    w = Tm @ (k * (beta * gam)[..., None])
    u = Tm @ (v * beta[..., None])
    Aqk = (q @ k.transpose(-1, -2)) * decay
    qg = q * gam[..., None]
    h = q.new_zeros(B, H, K, V) if h0 is None else h0
    os_ = []
    for c in range(NC):
        v_new = u[:, :, c] - w[:, :, c] @ h
        os_.append(qg[:, :, c] @ h + Aqk[:, :, c] @ v_new)
        hd = h if glast is None else h * glast[:, :, c, None, None]
        h = hd + kdec[:, :, c].transpose(-1, -2) @ v_new
    o = torch.stack(os_, 2)  # [B, H, NC, BT, V]
    o = o.movedim(1, 3).reshape(B, NC * BT, H, V)[:, :T]
    return o, h


def torch_chunk_delta_rule(
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
    check_inputs: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY representation) delta rule in pure torch, fp32, differentiable by autograd; the CPU path.

    Same arguments and results as `naive_recurrent_delta_rule`. Varlen input runs as one zero-padded batch (the
    padded length is a host read of cu_seqlens).
    """
    _, _, _, K, _, _ = validate_delta_rule_inputs(q, k, v, beta, g, initial_state, cu_seqlens, check_inputs)
    scale = K**-0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    qf, kf, vf, bf = q.float() * scale, k.float(), v.float(), beta.float()
    gf = g.float() if g is not None else None
    h0 = initial_state.float() if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _chunk_fixed(qf, kf, vf, bf, gf, h0, fit_chunk(chunk_size, qf.shape[1]))
        return o.to(v.dtype), (ht if output_final_state else None)
    # all segments as one zero-padded batch (padding at a segment's end leaves its state alone)
    (qp, kp, vp, bp, gp), index = unpack_varlen([qf, kf, vf, bf, gf], cu_seqlens)
    o, ht = _chunk_fixed(qp, kp, vp, bp, gp, h0, fit_chunk(chunk_size, qp.shape[1]))
    return pack_varlen(o, index).to(v.dtype), (ht if output_final_state else None)
