"""Retention (RetNet, Sun et al., 2023): linear attention with a fixed per-head decay gamma_h = 1 - 2^(-5-h)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from linear_moe.modules.linear_mixer import LinearMixer
from linear_moe.registry import MixerConfig, register_mixer


@register_mixer("retention", symbol="R")
class MultiScaleRetention(LinearMixer):
    """chunk_gla with the constant scalar log decay log(gamma_h) of each (global) head h."""

    op = "gla"

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        """Heads, dims, conv and output gate come from MixerConfig; the decays are fixed by head index."""

    def log_decay(self, device: torch.device) -> torch.Tensor:
        """log(1 - 2^(-5 - h)) for this rank's heads `[local_heads]`, fp32."""
        h = self.head_index(device).float()
        return torch.log1p(-torch.exp2(-5.0 - h))

    def prepare(self, parts, hidden_states):
        q, k, v = parts["q"], parts["k"], parts["v"]
        g = self.log_decay(q.device).expand(*q.shape[:2], self.local_heads)  # [B, T, H]
        return q, k, v, {"g": g}
