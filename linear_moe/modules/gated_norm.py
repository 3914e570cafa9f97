"""Output normalisation of the linear mixers: RMSNorm over each head's values, then a swish gate."""
from __future__ import annotations

import torch
from torch import nn

from linear_moe.kernels.norms import gated_rmsnorm


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x) * weight * silu(gate) over the last dim (one head's values); gate None gives plain RMSNorm.

    Fused in Triton on CUDA (kernels/norms.py), in fp32 either way."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rmsnorm(x, self.weight, gate, self.eps)
