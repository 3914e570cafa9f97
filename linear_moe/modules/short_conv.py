"""Causal depthwise short convolution that never mixes tokens across sequence or segment borders.

Training on CUDA runs the Triton kernel of kernels/short_conv.py. The torch path here serves CPU, initial states
(CP halos, decoding) and final states: packed input ([1, T, C] with `cu_seqlens`) runs as one depthwise conv over
the packed tokens, then the few outputs near each segment start are corrected (a fixed [segments, W-1] set), so
MoM's per-memory segments and packed documents see no leakage, with no host sync, no padding and no extra pass over
all tokens. Decoding keeps the last `kernel_size - 1` inputs of each sequence as the conv state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.kernels.common import use_triton
from linear_moe.kernels.short_conv import short_conv


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time with SiLU, `weight` [C, W]. Under TP the caller passes its local channels."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu"):
        super().__init__()
        if activation not in (None, "silu"):
            raise ValueError(f"activation={activation!r} must be None or 'silu'")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        nn.init.uniform_(self.weight, -kernel_size ** -0.5, kernel_size ** -0.5)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x `[B, T, C]` (or `[1, T, C]` packed with cu_seqlens `[N+1]`) -> (y `[B, T, C]`, state `[N, C, W-1]`).

        x may also be a strided `[B, T, U, D]` view (C = U * D), as split out of a projection. `initial_state`
        `[N, C, W-1]` holds the inputs before each sequence (decoding continuation, CP halos). Training (no state in
        or out) on CUDA runs the Triton kernel (kernels/short_conv.py), which reads x in place; `backend` as there.
        """
        if x.shape[2:].numel() != self.channels:
            raise ValueError(f"ShortConvolution expects {self.channels} channels, got x of shape {tuple(x.shape)}")
        if initial_state is None and not output_final_state and use_triton(x, backend):
            return short_conv(x, self.weight, cu_seqlens=cu_seqlens, activation=self.activation,
                              backend="triton"), None
        x = x.reshape(*x.shape[:2], -1)
        B, T, C = x.shape
        W = self.kernel_size
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"with cu_seqlens x must be packed as [1, T, C], got B={B}")
        w = self.weight.to(x.dtype)
        xt = x.transpose(1, 2)  # [B, C, T]
        if cu_seqlens is None and initial_state is not None:
            # whole sequences: the state simply precedes them
            xt = torch.cat([initial_state.to(x.dtype), xt], dim=2)
        else:
            xt = F.pad(xt, (W - 1, 0))
        # one depthwise causal conv over everything (cuDNN), then fix the tokens near segment starts
        y = F.conv1d(xt, w[:, None, :], groups=C).transpose(1, 2) if T else x * w[:, 0]  # [B, T, C]
        if cu_seqlens is not None and W > 1 and T:
            y = self._fix_segment_starts(y, x[0], w, cu_seqlens, initial_state)
        if self.activation == "silu":
            y = F.silu(y)
        state = self.final_state(x, cu_seqlens, initial_state) if output_final_state else None
        return y, state

    def _fix_segment_starts(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, cu_seqlens: torch.Tensor,
                            initial_state: torch.Tensor | None) -> torch.Tensor:
        """Recompute the outputs of the first W-1 tokens of each segment from the segment's own inputs and history
        (its initial state, else zeros) and write them over what the packed conv read across the border.

        A fixed-size [N, W-1] set: no host sync, no pass over all tokens, and exact (the overwritten values never
        depend on another segment's tokens, not even through rounding)."""
        W, T, C = self.kernel_size, x.shape[0], x.shape[1]
        N = cu_seqlens.numel() - 1
        starts, lens = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        p = torch.arange(W - 1, device=x.device)
        t = starts[:, None] + p  # [N, W-1] token positions
        valid = p < lens[:, None]
        j = torch.arange(W, device=x.device)  # steps back, 0..W-1
        inside = p[:, None] >= j[None, :]  # [W-1, W]: x_{t-j} lies in the segment
        xp = F.pad(x, (0, 0, 1, 0))  # row 0 is zeros, where out-of-range reads land
        src = torch.where(valid[:, :, None] & inside[None], t[:, :, None] - j + 1, 0)
        window = xp[src.clamp(max=T)]  # [N, W-1, W, C]
        if initial_state is not None:
            back = (j[None, :] - p[:, None]).clamp(min=1, max=W - 1)  # steps before the segment start
            own = initial_state.to(x.dtype)[:, :, W - 1 - back].permute(0, 2, 3, 1)  # [N, W-1, W, C]
            window = torch.where(inside[None, :, :, None], window, own)
        out = (window * w[:, W - 1 - j].t()).sum(2)  # [N, W-1, C]
        # rows past a segment's end write to their own scratch rows beyond T, so every index is unique
        scratch = T + torch.arange(N * (W - 1), device=x.device).view(N, W - 1)
        idx = torch.where(valid, t, scratch).reshape(-1)
        y = F.pad(y, (0, 0, 0, N * (W - 1))).index_copy(1, idx, out.reshape(1, -1, C).to(y.dtype))
        return y[:, :T]

    def final_state(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None,
                    initial_state: torch.Tensor | None) -> torch.Tensor:
        """The last W-1 inputs of each sequence `[N, C, W-1]` (older ones from initial_state, else zeros)."""
        B, T, C = x.shape
        W = self.kernel_size
        if cu_seqlens is None:
            ends = torch.full((B,), T, device=x.device, dtype=torch.long)
            starts = torch.zeros_like(ends)
            flat, rows = x.reshape(B * T, C), torch.arange(B, device=x.device) * T
        else:
            starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
            flat, rows = x[0], torch.zeros_like(starts)
        N = ends.numel()
        k = torch.arange(W - 1, 0, -1, device=x.device)  # steps back from the end: W-1, ..., 1
        idx = ends[:, None] - k[None]  # [N, W-1]
        inside = idx >= starts[:, None]
        # row 0 of the padded copy is a zero row, where out-of-segment (and empty-input) reads land
        padded = F.pad(flat, (0, 0, 1, 0))
        gathered = padded[torch.where(inside, rows[:, None] + idx + 1, 0)]  # [N, W-1, C]
        if initial_state is not None:
            back = (starts[:, None] - idx).clamp(min=1, max=W - 1)  # how far before the start
            old = initial_state.to(x.dtype).gather(2, (W - 1 - back)[:, None, :].expand(N, C, W - 1))
            out = torch.where(inside[:, None, :], gathered.transpose(1, 2), old)
        else:
            out = gathered.transpose(1, 2) * inside[:, None, :]
        return out.contiguous()

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: x `[N, C]`, state `[N, C, W-1]` -> (y `[N, C]`, new state)."""
        window = torch.cat([state.to(x.dtype), x[:, :, None]], dim=2)  # [N, C, W]
        y = (window * self.weight.to(x.dtype)).sum(-1)
        if self.activation == "silu":
            y = F.silu(y)
        return y, window[:, :, 1:].contiguous()
