"""Fused recurrent delta rule in Triton: one program per (sequence, head, V-block), a loop over time with the state in
registers. Meant for decoding (few steps per call); the backward recomputes through the chunked torch path."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from linear_moe.kernels.common import use_triton
from linear_moe.kernels.delta_rule.naive import torch_chunk_delta_rule, validate_delta_rule_inputs
from linear_moe.kernels.norms import l2norm


@triton.jit
def fused_recurrent_delta_rule_fwd_kernel(
    q, k, v, beta, g, o, h0, ht, scale,
    cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    T = tl.load(cu_seqlens + n + 1).to(tl.int64) - bos
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    if USE_H0:
        b_h = tl.load(h0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([KP, BV], dtype=tl.float32)
    for t in range(T):
        p = (bos + t) * H + i_h
        b_q = tl.load(q + p * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + p).to(tl.float32)
        if USE_G:
            b_h *= tl.exp(tl.load(g + p).to(tl.float32))
        # delta between v_t and the decayed state's prediction, written back along k_t
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(o + p * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_h)


def fused_recurrent_delta_rule_fwd(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens,
                                   BV: int = 32):
    """Inputs flattened to [1, TT, H, D] contiguous, cu_seqlens given. Returns (o, final state or None)."""
    H, K = k.shape[2:]
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    BV = min(BV, triton.next_power_of_2(V))
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    fused_recurrent_delta_rule_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, beta, g, o, initial_state, ht, scale, cu_seqlens,
        H=H, K=K, V=V, KP=triton.next_power_of_2(K), BV=BV,
        USE_G=g is not None, USE_H0=initial_state is not None, STORE_HT=output_final_state,
    )
    return o, ht


class FusedRecurrentDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens):
        o, ht = fused_recurrent_delta_rule_fwd(q, k, v, beta, g, scale, initial_state, output_final_state,
                                               cu_seqlens)
        ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        # recompute through the differentiable chunked torch path; decoding rarely needs this
        saved = ctx.saved_tensors
        q, k, v, beta, g, h0 = (x.detach().requires_grad_() if x is not None else None for x in saved[:6])
        with torch.enable_grad():
            o, ht = torch_chunk_delta_rule(q, k, v, beta, g, scale=ctx.scale, initial_state=h0,
                                           output_final_state=True, cu_seqlens=saved[6], check_inputs=False)
            outs, grads = [o], [do]
            if dht is not None:
                outs.append(ht)
                grads.append(dht)
            inputs = [x for x in (q, k, v, beta, g, h0) if x is not None]
            got = iter(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
        dq, dk, dv, dbeta = (next(got) for _ in range(4))
        dg = next(got) if g is not None else None
        dh0 = next(got) if h0 is not None else None
        return dq, dk, dv, dbeta, dg, None, dh0, None, None


def fused_recurrent_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step (gated) delta rule; same arguments and results as `chunk_delta_rule`.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H] (g: log decay or None); initial_state [N, H, K, V];
    cu_seqlens [N + 1] with B == 1. Returns o [B, T, H, V] and the fp32 final state (or None).
    """
    B, T, H, K, V, _ = validate_delta_rule_inputs(q, k, v, beta, g, initial_state, cu_seqlens, check_inputs)
    if not use_triton(q, backend):
        return torch_chunk_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, check_inputs=False,
        )
    scale = K**-0.5 if scale is None else float(scale)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B + 1, device=q.device, dtype=torch.int32) * T
    q, k, v, beta = (x.reshape(1, B * T, *x.shape[2:]).contiguous() for x in (q, k, v, beta))
    g = g.reshape(1, B * T, H).contiguous() if g is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    o, ht = FusedRecurrentDeltaRuleFunction.apply(q, k, v, beta, g, scale, h0, output_final_state, cu_seqlens)
    return o.reshape(B, T, H, V), ht
