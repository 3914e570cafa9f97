"""Causal depthwise short convolution that never mixes tokens across sequence or segment borders.

Packed input ([1, T, C] with `cu_seqlens`) is handled with a per-token position-in-segment mask, so MoM's per-memory
segments and packed documents see no leakage, with no host sync and no padding. Decoding keeps the last
`kernel_size - 1` inputs of each sequence as the conv state.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def positions_in_segment(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens: (segment id, position within its segment), each `[total]` int64, computed on device."""
    t = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens.long(), t, right=True) - 1
    return seg, t - cu_seqlens.long()[seg]


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
                seg_pos: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x `[B, T, C]` (or `[1, T, C]` packed with cu_seqlens `[N+1]`) -> (y same shape, state `[N, C, W-1]`).

        `initial_state` `[N, C, W-1]` holds the inputs before each sequence (decoding continuation); `seg_pos` may pass
        a precomputed `positions_in_segment` result to share it between several convs.
        """
        B, T, C = x.shape
        W = self.kernel_size
        if C != self.channels:
            raise ValueError(f"ShortConvolution expects {self.channels} channels, got x of shape {tuple(x.shape)}")
        w = self.weight.to(x.dtype)
        if cu_seqlens is None:
            pos = torch.arange(T, device=x.device).expand(B, T)
            seg = torch.arange(B, device=x.device)[:, None].expand(B, T)
        else:
            if B != 1:
                raise ValueError(f"with cu_seqlens x must be packed as [1, T, C], got B={B}")
            seg, pos = seg_pos if seg_pos is not None else positions_in_segment(cu_seqlens, T)
            seg, pos = seg[None], pos[None]
        y = x * w[:, W - 1]
        for j in range(1, W):
            # x_{t-j} contributes only if it lies in the same segment (pos >= j); otherwise it comes from the state.
            shifted = F.pad(x, (0, 0, j, 0))[:, :T]
            inside = (pos >= j)[..., None]
            term = torch.where(inside, shifted, torch.zeros((), dtype=x.dtype, device=x.device))
            if initial_state is not None:
                # state[:, :, W-1-k] holds the input k steps before the sequence start (k = 1..W-1)
                k = (j - pos).clamp(min=1, max=W - 1)
                from_state = initial_state.to(x.dtype)[seg, :, W - 1 - k]  # [B, T, C]
                term = torch.where(inside, term, from_state * (pos < j)[..., None])
            y = y + term * w[:, W - 1 - j]
        if self.activation == "silu":
            y = F.silu(y)
        state = self.final_state(x, cu_seqlens, initial_state) if output_final_state else None
        return y, state

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
