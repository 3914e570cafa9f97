"""Shared host-side helpers for the kernel families: input validation and varlen chunk bookkeeping.

Nothing here knows about Megatron. Validation runs before any launch and raises ValueError naming the argument.
"""
from __future__ import annotations

import itertools
import os

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(x: torch.Tensor, backend: str | None) -> bool:
    """Pick the Triton path on CUDA tensors, the pure-torch path on CPU; `backend` ("triton"|"torch") overrides.

    Under TRITON_INTERPRET=1 the Triton kernels also run on CPU tensors (slowly): tests ask for them explicitly.
    """
    if backend is None:
        return x.is_cuda
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend={backend!r} must be None, 'triton' or 'torch'")
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return backend == "triton"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch heuristics count programs per SM); 1 elsewhere."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def stable_sort_small(key: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.sort(key, stable=True)` of integer keys in [0, bound), sorted in the narrowest dtype that holds them:
    the GPU's radix sort makes one pass per key byte, so MoM's routing keys (tens of values) take one pass instead of
    eight. The sorted keys come back in key's dtype (they index other tensors)."""
    small = next(dt for dt, top in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31), (key.dtype, None))
                 if top is None or bound <= top)
    values, order = torch.sort(key.to(small), stable=True)
    return values.to(key.dtype), order


def fit_chunk(chunk_size: int, T: int, minimum: int = 1) -> int:
    """The torch paths' chunk for sequences of (padded) length T: a power of two no longer than they need (short
    sequences, such as MoM's per-memory segments, would otherwise pay for a full chunk's [BT, BT] products) and at
    least `minimum`; the result of the recurrence does not depend on it."""
    return max(minimum, min(chunk_size, 1 << max(T - 1, 0).bit_length()))


def dot_precision(x: torch.Tensor) -> str:
    """`input_precision` of the Triton dots whose operands are fp32: exact for fp32 inputs; for 16-bit inputs one
    tf32 pass (10-bit mantissa, above the 8 bits of the 16-bit tiles such products feed). Three passes (tf32x3) cost
    3x on the WY kernels, which dominate the delta rule at head dim 128, for accuracy the 16-bit operands downstream
    cannot keep. (Dots of 16-bit operands ignore it.)"""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Check `[B, T, H, K]` q/k and `[B, T, H, V]` v; return (B, T, H, K, V)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} must be one of float32, float16, bfloat16")
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape [B, T, H, K]")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must share [B, T, H] with q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    B, T, H, K = q.shape
    return B, T, H, K, v.shape[-1]


def check_per_step(name: str, x: torch.Tensor | None, B: int, T: int, H: int, last: int | None = None) -> None:
    """Check a per-step tensor (gate, beta) of shape `[B, T, H]` or `[B, T, H, last]`."""
    if x is None:
        return
    want = (B, T, H) if last is None else (B, T, H, last)
    if tuple(x.shape) != want:
        raise ValueError(f"{name} must have shape {list(want)}, got {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype={x.dtype} must be a float dtype")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, B: int, T: int) -> int:
    """Validate varlen offsets and return the number of sequences N (B when cu_seqlens is None).

    cu_seqlens is `[N + 1]` int32/int64, starts at 0, is non-decreasing (zero-length segments allowed) and ends at T.
    The monotonicity check reads the tensor on the host: callers on a sync-free hot path pass `check=False` upstream.
    """
    if cu_seqlens is None:
        return B
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch must be 1 (packed [1, T, ...]), got B={B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens.dtype={cu_seqlens.dtype} must be int32 or int64")
    return cu_seqlens.numel() - 1


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, T: int) -> None:
    """Host-side value checks (a device sync on GPU): first offset 0, non-decreasing, last offset T."""
    c = cu_seqlens.tolist()
    if c[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {c[0]}")
    if any(b < a for a, b in itertools.pairwise(c)):
        raise ValueError("cu_seqlens must be non-decreasing")
    if c[-1] != T:
        raise ValueError(f"cu_seqlens must end at T={T}, got {c[-1]}")


def check_state(name: str, s: torch.Tensor | None, N: int, H: int, K: int, V: int) -> None:
    """Check an initial state of shape `[N, H, K, V]`."""
    if s is None:
        return
    if tuple(s.shape) != (N, H, K, V):
        raise ValueError(f"{name} must have shape {[N, H, K, V]}, got {list(s.shape)}")


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """For varlen kernels: `[NT, 2]` int32 rows of (sequence index, chunk index within it), one per chunk.

    Built on the device with repeat_interleave; its length is data dependent, so this is one host sync per call.
    """
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    nchunks = (lens + chunk_size - 1) // chunk_size
    seq = torch.repeat_interleave(torch.arange(len(lens), device=cu_seqlens.device), nchunks)
    starts = torch.cumsum(nchunks, 0) - nchunks
    idx = torch.arange(seq.numel(), device=cu_seqlens.device) - starts[seq]
    return torch.stack([seq, idx], 1).to(torch.int32)


def segments(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) per sequence; a host read of cu_seqlens (for the reference and torch paths only)."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    c = cu_seqlens.tolist()
    return [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]


def unpack_varlen(xs: list[torch.Tensor | None], cu_seqlens: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Packed `[1, T, ...]` tensors -> zero-padded `[N, L, ...]` (L the longest segment), and the index that maps
    each packed token to its row in the flattened `[N * L]` padding (for `pack_varlen`).

    The torch paths run all segments as one batch this way; zero padding at a segment's end is inert for both
    recurrences (k = 0, beta = 0, log-decay 0 leave the state unchanged). L is read on the host.
    """
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    N, L = lens.numel(), max(int(lens.max()), 1) if lens.numel() else 1
    pos = torch.arange(L, device=cu.device)
    valid = pos[None] < lens[:, None]  # [N, L]
    src = torch.where(valid, cu[:-1, None] + pos, 0)
    out = [None if x is None else x[0][src] * valid.view(N, L, *([1] * (x.dim() - 2))).to(x.dtype) for x in xs]
    T = int(cu[-1])
    t = torch.arange(T, device=cu.device)
    seg = torch.searchsorted(cu, t, right=True) - 1
    return out, seg * L + (t - cu[seg])


def pack_varlen(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_varlen` for an output: `[N, L, ...]` -> packed `[1, T, ...]`."""
    return y.reshape(-1, *y.shape[2:])[index][None]
