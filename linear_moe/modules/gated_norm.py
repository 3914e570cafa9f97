"""Output normalisation of the linear mixers: RMSNorm over each head's values, then a swish gate."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x) * weight * silu(gate) over the last dim (one head's values); gate None gives plain RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if gate is not None:
            y = y * F.silu(gate.float())
        return y.to(x.dtype)
