"""Context parallelism (CP) for linear-recurrent mixers and MoM: a split scan equal to the unsplit one, fwd and bwd.

How a mixer uses it, when its CP group (`pg_collection.cp`, else `parallel_state.get_context_parallel_group()`) has
more than one rank. The layout is Megatron's: "megatron" (zigzag: the sequence cut into 2 cp chunks, rank r holds
chunks r and 2cp-1-r) for unpacked batches, "thd" (each document cut that way; pass the padded global offsets) for
packed THD batches; "contiguous" (rank r holds one contiguous piece, any lengths) for other callers.

    # the short conv: the W-1 inputs before each local piece (dense) or local segment (packed)
    halo = cp_halo(x, cp, width=W - 1, layout=lay, cu_seqlens=cu)              # [segments, C, W-1]
    if cu is None:
        y = cp_unpieces(conv(cp_pieces(x, lay), initial_state=halo)[0], B, lay)
    else:
        y = conv(x, cu_seqlens=cp_local_cu_seqlens(cu, T_local, cp, lay), initial_state=halo)[0]
    # the recurrence: any fn(q, k, v, *extras, initial_state=, output_final_state=, cu_seqlens=, **kw) -> (o, S)
    fn = functools.partial(chunk_gla, scale=scale, backend=backend, check_inputs=False)
    o, state = cp_scan(fn, q, k, v, cp_group=cp, layout=lay, cu_seqlens=cu, g=g)  # cu: GLOBAL offsets or None

MoM, whose conv and recurrence run over per-(sequence, memory) segments of routed tokens, orders its local slots by
(piece j, sequence, memory), j being the token's local piece (`cp_token_piece`; for "thd" the segment parity of
`cp_local_cu_seqlens`), and passes the offsets as `local_cu_seqlens` `[J * N + 1]` to both `cp_halo` and `cp_scan`:
segment j * N + n is the part of global segment n in local piece j (often empty); J = 2 zigzag, 1 contiguous.

Method. Each recurrence is S_t = A_t S_{t-1} + B_t with A_t depending only on the inputs, and o_t = scale * S_t^T q_t.
One call of `fn` with v widened to [v | 0] and initial state [0 | I] returns, per piece, [b | P]: b the piece's final
state from zero and P its transition (the columns of S evolve independently). The (P, b) of every piece are
all-gathered (an autograd collective: its backward reduce-scatters), prefix-combined in sequence order into each
piece's true initial state, and the local pieces are rerun from it. Cost: one scan of width V + K plus one of width V
(about 3 unsplit scans when K = V) and one all-gather of [2, N, H, K, V + K] fp32 per call, plus its reduce-scatter
in the backward; with `rerun=False` (dense layouts only) the rerun is replaced by the linear correction
o = o_b + o_P S_in from the first call's outputs (about 2 scans; o_P is in v's dtype, so bf16 rounds it).
`fn` must return its initial state as the final state of a zero-length segment (the kernels here do).

Gradient contract. `initial_state` is replicated on every CP rank; each rank's gradient for it is that rank's share,
and their sum over the CP group is the unsplit gradient (as for the replicated weights, whose gradients Megatron
reduces over CP). The final state is returned only on the rank that holds the last piece (rank 0 for the zigzag
layouts, the last rank for "contiguous"); other ranks get None. Every CP rank must run the backward (the collective
is in it). No host syncs, except "contiguous" with cu_seqlens, whose piece offsets come from a small all-gather of
the local lengths (a collective, no host read).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

LAYOUTS = ("megatron", "thd", "contiguous")
# torch >= 2.10 names the flat collectives *_single and deprecates the *_tensor spellings
_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class _AllGather(torch.autograd.Function):
    """[*shape] -> [cp, *shape]; the backward sums each rank's gradient slices onto their owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if grad.is_cuda:
            gx = grad.new_empty(grad.shape[1:].numel())
            _reduce_scatter_flat(gx, grad.reshape(-1), group=ctx.group)
            gx = gx.view(grad.shape[1:])
        else:
            # gloo (CPU tensors) has no reduce-scatter; these tensors are small, so an all-reduce and a slice do
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            gx = grad[dist.get_rank(ctx.group)]
        return gx, None


class _Tie(torch.autograd.Function):
    """Return x unchanged; in backward, also send zeros to `dep`, so its graph (a collective) runs on every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dep: torch.Tensor) -> torch.Tensor:
        ctx.dep_shape, ctx.dep_dtype = dep.shape, dep.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(ctx.dep_shape, dtype=ctx.dep_dtype)


def all_gather_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather along a new leading dim: `[*shape]` -> `[cp, *shape]`."""
    return _AllGather.apply(x, group)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Plain all-gather along a new leading dim, through one flat buffer."""
    cp = dist.get_world_size(group)
    out = x.new_empty(cp * x.numel())
    _gather_flat(out, x.contiguous().reshape(-1), group=group)
    return out.view(cp, *x.shape)


def _check_layout(layout: str) -> int:
    """Number of local pieces J of a layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {', '.join(LAYOUTS)}")
    return 1 if layout == "contiguous" else 2


def _piece_of(rank: int, j: int, cp: int, layout: str) -> int:
    """Global piece index (in sequence order) of local piece j on CP rank `rank`."""
    if layout == "contiguous":
        return rank
    return rank if j == 0 else 2 * cp - 1 - rank


def _global_order(cp: int, layout: str) -> list[int]:
    """For each global piece p in sequence order, the flat index rank * J + j that holds it."""
    J = _check_layout(layout)
    where = [0] * (cp * J)
    for r in range(cp):
        for j in range(J):
            where[_piece_of(r, j, cp, layout)] = r * J + j
    return where


def _contiguous_start(T_local: int, device, group) -> torch.Tensor:
    """Global offset of this rank's piece under the contiguous layout (a 0-dim device tensor; a collective)."""
    lengths = _all_gather(torch.tensor([T_local], device=device, dtype=torch.long), group)[:, 0]
    return lengths[: dist.get_rank(group)].sum()


def cp_local_cu_seqlens(cu_seqlens: torch.Tensor, T_local: int, cp_group, layout: str = "megatron") -> torch.Tensor:
    """Global packed offsets `[N + 1]` -> this rank's local offsets, one segment per (local piece, sequence).

    "megatron": the packed row is cut into 2 cp chunks, this rank holds chunks r and 2cp-1-r; the result is
    `[2N + 1]`, piece-major (segment j * N + n). "thd": each sequence is cut into 2 cp chunks (lengths divisible by
    2 cp, as Megatron's per-document split requires); `[2N + 1]`, sequence-major (segment 2n + j), as the tokens lie.
    "contiguous": the rank holds one contiguous piece; `[N + 1]`. Segments outside the piece are empty.
    """
    J = _check_layout(layout)
    cp, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    cu = cu_seqlens.long()
    if layout == "thd":
        mid = (cu[:-1] + cu[1:]) // (2 * cp)
        starts = torch.stack([cu[:-1] // cp, mid], -1).flatten()
        return torch.cat([starts, cu[-1:] // cp]).to(cu_seqlens.dtype)
    if layout == "contiguous":
        start = _contiguous_start(T_local, cu.device, cp_group)
        return (cu - start).clamp(0, T_local).to(cu_seqlens.dtype)
    if T_local % 2:
        raise ValueError(f"layout='megatron' needs an even local length (T divisible by 2*cp), got {T_local}")
    L = T_local // 2
    parts = [(cu - _piece_of(r, j, cp, layout) * L).clamp(0, L) + j * L for j in range(J)]
    return torch.cat([parts[0]] + [p[1:] for p in parts[1:]]).to(cu_seqlens.dtype)


def cp_token_piece(T_local: int, layout: str = "megatron", device=None) -> torch.Tensor:
    """Local piece index j of each local token `[T_local]` for the dense layouts (MoM's sort key)."""
    J = _check_layout(layout)
    if layout == "thd":
        raise ValueError("cp_token_piece covers the dense layouts; for 'thd' use cp_local_cu_seqlens")
    return (torch.arange(T_local, device=device) >= T_local // 2).long() if J == 2 else torch.zeros(
        T_local, dtype=torch.long, device=device)


def cp_pieces(x: torch.Tensor, layout: str = "megatron") -> torch.Tensor:
    """Dense `[B, T_local, ...]` -> `[B * J, T_local / J, ...]`, one row per local piece (row b * J + j)."""
    J = _check_layout(layout)
    B, T = x.shape[:2]
    if T % J:
        raise ValueError(f"layout={layout!r} needs the local length divisible by {J}, got {T}")
    return x.reshape(B * J, T // J, *x.shape[2:])


def cp_unpieces(x: torch.Tensor, B: int, layout: str = "megatron") -> torch.Tensor:
    """Inverse of `cp_pieces`."""
    return x.reshape(B, -1, *x.shape[2:])


def cp_scan(
    fn: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *extras: torch.Tensor | None,
    cp_group,
    layout: str = "megatron",
    cu_seqlens: torch.Tensor | None = None,
    local_cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    rerun: bool = True,
    **fn_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence `fn` over a sequence split across the CP group; equal to the unsplit `fn`.

    q, k `[B, T_local, H, K]`, v `[B, T_local, H, V]`, extras (beta, g, ... or None) `[B, T_local, H, ...]`, all in
    the layout's local order. `fn_kwargs` go to `fn` by keyword (g=, beta=); there, as among the extras, a tensor
    whose leading dims are `[B, T_local]` is per step and split with q, anything else passes unchanged. `fn(q, k, v, *extras, initial_state=, output_final_state=True, cu_seqlens=)` must
    return (o, final state `[N, H, K, V]` fp32) and treat zero-length segments as identity. Pass either the global
    `cu_seqlens` `[N + 1]` (B = 1, see `cp_local_cu_seqlens`) or MoM's `local_cu_seqlens` `[J * N + 1]`
    (piece-major), or neither (dense). initial_state `[N, H, K, V]`, replicated. Returns (o_local, final state on the
    last piece's owner, else None).
    """
    J = _check_layout(layout)
    cp, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    if cu_seqlens is not None and local_cu_seqlens is not None:
        raise ValueError("pass cu_seqlens (global) or local_cu_seqlens (MoM), not both")
    if cp == 1 and local_cu_seqlens is None:
        return fn(q, k, v, *extras, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, **fn_kwargs)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dense = cu_seqlens is None and local_cu_seqlens is None
    if dense:
        # one batch row per local piece, row b * J + j
        S, piece_major, local_cu = B, False, None

        def split(x):
            per_step = isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[:2] == (B, T)
            return cp_pieces(x, layout) if per_step else x

        q, k, v = cp_pieces(q, layout), cp_pieces(k, layout), cp_pieces(v, layout)
        extras = tuple(split(e) for e in extras)
        fn_kwargs = {name: split(x) for name, x in fn_kwargs.items()}
    else:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed as B=1, got B={B}")
        if local_cu_seqlens is not None:
            local_cu, piece_major = local_cu_seqlens, True
        else:
            local_cu, piece_major = cp_local_cu_seqlens(cu_seqlens, T, cp_group, layout), layout != "thd"
        if (local_cu.numel() - 1) % J:
            raise ValueError(f"local cu_seqlens must hold J={J} segments per sequence, got {local_cu.numel() - 1}")
        S = (local_cu.numel() - 1) // J
    if initial_state is not None and initial_state.shape != (S, H, K, V):
        raise ValueError(f"initial_state must be {[S, H, K, V]}, got {list(initial_state.shape)}")

    def to_jS(x):  # local segment order -> [J, S, ...]
        return x.unflatten(0, (J, S)) if piece_major else x.unflatten(0, (S, J)).transpose(0, 1)

    def from_jS(x):
        return x.flatten(0, 1) if piece_major else x.transpose(0, 1).flatten(0, 1)

    n = J * S
    eye = torch.eye(K, dtype=torch.float32, device=q.device).expand(n, H, K, K)
    init = torch.cat([eye.new_zeros(n, H, K, V), eye], -1)
    v_aug = torch.cat([v, v.new_zeros(*v.shape[:-1], K)], -1)
    o_aug, state = fn(q, k, v_aug, *extras, initial_state=init, output_final_state=True, cu_seqlens=local_cu,
                      **fn_kwargs)
    # [P, S, H, K, V + K] in global sequence order
    pieces = all_gather_autograd(to_jS(state.float()), cp_group).flatten(0, 1)[_global_order(cp, layout)]
    b, P = pieces[..., :V], pieces[..., V:]
    h = initial_state.float() if initial_state is not None else b.new_zeros(S, H, K, V)
    s_in = []
    for p in range(cp * J):
        s_in.append(h)
        h = P[p] @ h + b[p]
    h_local = from_jS(torch.stack([s_in[_piece_of(r, j, cp, layout)] for j in range(J)]))  # [n, H, K, V]
    if pieces.requires_grad:
        # the first piece's rank may not depend on the gathered pieces, yet must join the backward collective
        h_local = _Tie.apply(h_local, pieces)
    if dense and not rerun:
        corr = torch.einsum("nthk,nhkv->nthv", o_aug[..., V:].float(), h_local)
        o = (o_aug[..., :V].float() + corr).to(o_aug.dtype)
    else:
        o, _ = fn(q, k, v, *extras, initial_state=h_local, output_final_state=False, cu_seqlens=local_cu,
                  **fn_kwargs)
    if dense:
        o = cp_unpieces(o, B, layout)
    owner = cp - 1 if layout == "contiguous" else 0
    return o, (h if output_final_state and r == owner else None)


def cp_halo(
    x: torch.Tensor,
    cp_group,
    width: int = 3,
    layout: str = "megatron",
    cu_seqlens: torch.Tensor | None = None,
    local_cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `width` inputs before each local piece, as a short conv's `initial_state` `[segments, C, width]`.

    x `[B, T_local, C]`. Dense: one entry per `cp_pieces` row (b * J + j). With the global `cu_seqlens` (B = 1): one
    per segment of `cp_local_cu_seqlens`, with inputs of other sequences zeroed. With MoM's `local_cu_seqlens`
    (B = 1, piece-major as in `cp_scan`): one per local segment, from the same global segment's earlier pieces. Zeros before a sequence's start;
    pieces shorter than `width` are bridged (the halo may come from several earlier pieces). Differentiable.
    """
    J = _check_layout(layout)
    cp, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    B, T, C = x.shape
    W, dev = width, x.device
    flat = x.reshape(B * T, C)
    if cu_seqlens is not None and local_cu_seqlens is not None:
        raise ValueError("pass cu_seqlens (global) or local_cu_seqlens (MoM), not both")
    by_stream = cu_seqlens is None or layout == "thd"
    if local_cu_seqlens is not None:
        lcu = local_cu_seqlens.long()
        S = (lcu.numel() - 1) // J
        lo, hi = lcu[:-1].view(J, S), lcu[1:].view(J, S)
        gstart = torch.zeros_like(lo)
    elif by_stream:
        # halo streams = sequences; local pieces as token ranges [lo, hi) of shape [J, S]
        if cu_seqlens is None:
            L = T // J
            S = B
            lo = (torch.arange(B, device=dev) * T)[None] + (torch.arange(J, device=dev) * L)[:, None]
            hi = lo + L
        else:
            local_cu = cp_local_cu_seqlens(cu_seqlens, T, cp_group, layout).long()
            S = (local_cu.numel() - 1) // J
            lo, hi = local_cu[:-1].view(S, J).T, local_cu[1:].view(S, J).T
        gstart = torch.zeros_like(lo)
    else:
        # one stream, the packed row; sequences are told apart by global positions
        local_cu = cp_local_cu_seqlens(cu_seqlens, T, cp_group, layout).long()
        S = 1
        if layout == "contiguous":
            lo, hi = torch.zeros(1, 1, dtype=torch.long, device=dev), torch.full((1, 1), T, device=dev)
            gstart = _contiguous_start(T, dev, cp_group).view(1, 1)
        else:
            L = T // 2
            lo = torch.arange(J, device=dev)[:, None] * L
            hi = lo + L
            gstart = torch.tensor([[_piece_of(r, j, cp, layout) * L] for j in range(J)], device=dev)
    w = torch.arange(W, device=dev)
    idx = hi[..., None] - W + w  # [J, S, W]
    valid = idx >= lo[..., None]
    tails = flat[idx.clamp(min=0)] * valid[..., None]  # [J, S, W, C]
    # global position of each tail entry, -1 where the piece is shorter than W
    pos = torch.where(valid, gstart[..., None] + idx - lo[..., None], -1)
    order = _global_order(cp, layout)
    tails = all_gather_autograd(tails, cp_group).flatten(0, 1)[order]  # [P, S, W, C]
    pos = _all_gather(pos, cp_group).flatten(0, 1)[order]  # [P, S, W]
    Pn = tails.shape[0]
    ok = pos >= 0
    # compact each stream's valid tail entries (in order), then take the last W before each piece
    keep = torch.argsort((~ok).transpose(0, 1).reshape(S, Pn * W).int(), dim=1, stable=True)  # [S, P*W]
    comp = tails.transpose(0, 1).reshape(S, Pn * W, C).gather(1, keep[..., None].expand(S, Pn * W, C))
    comp_pos = pos.transpose(0, 1).reshape(S, Pn * W).gather(1, keep)
    count = ok.sum(-1)  # [P, S]
    before = count.cumsum(0) - count
    hidx = (before[..., None] - W + w).transpose(0, 1).reshape(S, Pn * W)  # [S, P*W]
    inside = hidx >= 0
    halo = comp.gather(1, hidx.clamp(min=0)[..., None].expand(S, Pn * W, C)) * inside[..., None]
    hpos = torch.where(inside, comp_pos.gather(1, hidx.clamp(min=0)), -1)
    halo = halo.view(S, Pn, W, C).transpose(0, 1)  # [P, S, W, C]
    hpos = hpos.view(S, Pn, W).transpose(0, 1)
    mine = [_piece_of(r, j, cp, layout) for j in range(J)]
    halo, hpos = halo[mine], hpos[mine]  # [J, S, W, C]
    if local_cu_seqlens is not None:
        out = halo.flatten(0, 1)  # piece-major, as the segments
    elif by_stream:
        # local order: row b * J + j (dense) or segment 2n + j (thd)
        out = halo.transpose(0, 1).flatten(0, 1)
    else:
        cu = cu_seqlens.long()
        # [J, N, W]: an entry belongs to segment n when it lies at or after the segment's start
        same = hpos[:, 0, None, :] >= cu[:-1][None, :, None]
        out = (halo[:, 0, None] * same[..., None]).flatten(0, 1)  # [J*N, W, C], piece-major
    return out.transpose(1, 2).contiguous()
