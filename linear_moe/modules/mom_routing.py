"""Sync-free token routing for Mixture-of-Memories: top-k routing, dispatch into per-(sequence, memory) segments, combine.

Every routed slot (token, memory) gets a place in one packed order sorted by (sequence, memory) and, within a group,
by arrival. The order comes from ONE stable sort of a small integer key (in its narrowest dtype); group sizes from
a `scatter_add_` histogram of fixed size. The number of segments is fixed (sequences x memories, the shared memory
included; twice that for the routed memories when a capacity is set: kept head, dropped tail), so `cu_seqlens` has a
fixed shape and everything stays on the device: no `.item()`, no `nonzero`, no `unique`, no data-dependent shapes.

Data moves through kernels/mom_dispatch.py (hidden states projected into the packed slots) and kernels/mom_combine.py
(slot outputs back to tokens), fused in Triton on CUDA, whose backward passes write each element once (no atomic
accumulation), so they are deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from linear_moe.kernels import mom_combine
from linear_moe.kernels.common import stable_sort_small


@dataclass
class Dispatch:
    """Where each routed slot lives in the packed, segment-sorted order. N tokens, k' slots per token, S = N * k'."""

    slot_of: torch.Tensor
    """[N, k'] packed position of slot (token, j); j = k is the shared memory when there is one."""
    perm: torch.Tensor
    """[S] flat slot index (token * k' + j) of each packed position (the inverse of slot_of)."""
    src_tok: torch.Tensor
    """[S] token of each packed position."""
    memories: torch.Tensor
    """[N, k'] memory of slot (token, j) (column k = num_memories, the shared memory, when there is one)."""
    cu_seqlens: torch.Tensor
    """[num_segments + 1] int32 segment offsets into the packed order; empty segments are allowed."""
    load: torch.Tensor
    """[num_memories] routed slots per memory before any dropping (float32; the f_i of the balance loss)."""
    keep: torch.Tensor | None
    """[N, k] bool: the routed slot survived the capacity limit (None without a capacity)."""


class _HalfGemmFp32Logits(torch.autograd.Function):
    """16-bit x [N, h] @ w^T -> fp32 logits [N, M] in one GEMM with fp32 accumulation and output (CUDA).

    Products of 16-bit values are exact in fp32, so this equals F.linear(x.float(), w.float()) up to summation order,
    without the fp32 copy of x and the fp32 GEMMs. The backward's GEMMs run in x's dtype with fp32 accumulation, like
    every other 16-bit backward GEMM of the layer; dw comes out in fp32 before its cast to w's dtype."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, dlogits):
        x, w = ctx.saved_tensors
        dl = dlogits.to(x.dtype)
        dx = torch.mm(dl, w.to(x.dtype)) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dl.t(), x, out_dtype=torch.float32).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits x [..., h] @ weight [M, h]^T -> [..., M].

    16-bit inputs on CUDA take one 16-bit GEMM with fp32 output (no fp32 copies of the hidden states and of their
    gradient); elsewhere the fp32 GEMM of the upcast inputs."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
        return _HalfGemmFp32Logits.apply(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x.float(), weight.float())


def route(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, M] -> (probs [N, M] fp32, weights [N, k] fp32 renormalised to sum 1, memories [N, k] int64)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, memories = probs.topk(topk, dim=-1)
    return probs, weights / weights.sum(-1, keepdim=True), memories


def route_given(logits: torch.Tensor, memories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` with the memories already chosen (from the same logits, without gradient): (probs, weights), the
    values `route` gives, with the gradient through these logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights = probs.gather(1, memories)
    return probs, weights / weights.sum(-1, keepdim=True)


def build_dispatch(memories: torch.Tensor, seq_id: torch.Tensor, num_seqs: int, num_memories: int, shared: bool,
                   capacity: torch.Tensor | None = None) -> Dispatch:
    """Packed order of the routed slots, sorted by (sequence, memory), arrival order kept within a group.

    memories [N, k] int64 routed memories per token; seq_id [N] the sequence (or packed document) of each token, tokens of
    a sequence in order of arrival along N; capacity [num_seqs] int64: the most tokens a routed memory keeps per
    sequence (None: keep all). Segment layout: for each sequence, its routed memories 0..M-1 then the shared memory;
    with a capacity each routed memory has two segments, its kept head and its dropped tail.
    """
    N, k = memories.shape
    dev = memories.device
    M_tot = num_memories + int(shared)
    if shared:
        memories = torch.cat([memories, memories.new_full((N, 1), num_memories)], 1)
    kp = memories.shape[1]
    S = N * kp
    G = num_seqs * M_tot
    key = (seq_id[:, None] * M_tot + memories).reshape(S)
    sorted_key, perm = stable_sort_small(key, G)
    ar = torch.arange(S, device=dev)
    slot_of = torch.empty_like(perm).scatter_(0, perm, ar).view(N, kp)
    counts = torch.zeros(G, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    ends = counts.cumsum(0)
    starts = ends - counts
    pos = ar - starts[sorted_key]
    load = counts.view(num_seqs, M_tot)[:, :num_memories].sum(0).float()
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    if capacity is None:
        cu = torch.cat([zero, ends])
        keep = None
    else:
        cap = capacity.long()[:, None].expand(num_seqs, M_tot)
        if shared:
            # the shared memory never drops: its capacity is the whole sequence
            cap = torch.cat([cap[:, :num_memories], torch.full_like(cap[:, :1], S)], 1)
        cap = cap.reshape(G)
        kept = torch.minimum(counts, cap)
        cu = torch.cat([zero, torch.stack([starts + kept, ends], 1).reshape(2 * G)])
        # beyond capacity, in order of arrival: the tail of the group, so the kept head stays one contiguous segment
        dropped = pos >= cap[sorted_key]
        keep = (~dropped)[slot_of[:, :k]]
    return Dispatch(slot_of=slot_of, perm=perm, src_tok=perm // kp, memories=memories,
                    cu_seqlens=cu.to(torch.int32), load=load, keep=keep)


def combine(o: torch.Tensor, weights: torch.Tensor, d: Dispatch, backend: str | None = None) -> torch.Tensor:
    """Packed slot outputs o [S, ...] -> per token sum_j weights[n, j] * o[slot_of[n, j]], [N, ...] in o's dtype.

    weights [N, k'] (the shared memory's column is 1). kernels/mom_combine.py: fused in Triton on CUDA.
    """
    N = d.slot_of.shape[0]
    out = mom_combine.combine(o.reshape(o.shape[0], -1), weights, d.slot_of, backend=backend)
    return out.view(N, *o.shape[1:])


def renormalise_kept(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero dropped slots and renormalise each token's weights over its kept ones (all dropped -> all zero)."""
    w = weights * keep
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))


def capacity_per_sequence(seq_lens: torch.Tensor, capacity_factor: float, topk: int, num_memories: int
                          ) -> torch.Tensor:
    """ceil(capacity_factor * len * topk / num_memories) tokens per (sequence, memory), [num_seqs] int64."""
    return torch.ceil(seq_lens.double() * (capacity_factor * topk / num_memories)).long()


def load_balancing_loss(probs_sum: torch.Tensor, num_tokens: int | torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch balance loss M * sum_i f_i * P_i: f_i = load_i / sum(load) (no gradient), P_i = probs_sum_i / tokens."""
    M = probs_sum.numel()
    f = load / load.sum().clamp(min=1)
    return M * (f.detach() * probs_sum / num_tokens).sum()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the router distribution (nats)."""
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1).mean()
