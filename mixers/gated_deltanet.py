"""Gated DeltaNet (Yang et al., 2025): the delta rule with a Mamba2-style data-dependent scalar decay per head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linear_moe.modules.linear_mixer import LinearMixer, mamba_dt_bias
from linear_moe.registry import MixerConfig, register_mixer


@register_mixer("gated_deltanet", symbol="D")
class GatedDeltaNet(LinearMixer):
    """g = -exp(A_log) * softplus(a_proj(x) + dt_bias), beta = sigmoid(b_proj(x)), q/k L2-normalised."""

    op = "delta_rule"

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        A_init_min: float = 1.0
        """A = exp(A_log) is initialised uniform in [A_init_min, A_init_max] per head."""
        A_init_max: float = 16.0
        """Upper end of the A initialisation range."""

        def resolve(self, hidden_size: int, num_attention_heads: int) -> None:
            super().resolve(hidden_size, num_attention_heads)
            if not 0 < self.A_init_min <= self.A_init_max:
                raise ValueError(f"A_init_min={self.A_init_min} and A_init_max={self.A_init_max} must satisfy "
                                 "0 < A_init_min <= A_init_max")

    def __init__(self, config, submodules=None, layer_number=None, *, mixer_config, pg_collection=None, **kw):
        super().__init__(config, submodules, layer_number, mixer_config=mixer_config, pg_collection=pg_collection,
                         **kw)
        lo, hi = mixer_config.A_init_min, mixer_config.A_init_max
        self.A_log = self.head_param(lambda h: torch.empty(h).uniform_(lo, hi).log())
        self.dt_bias = self.head_param(mamba_dt_bias)

    def extra_sections(self):
        return [("beta", 1), ("a", 1)]

    def prepare(self, parts, hidden_states):
        a = parts["a"].squeeze(-1).float()  # [B, T, H]
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        beta = parts["beta"].squeeze(-1).float().sigmoid()
        return parts["q"], parts["k"], parts["v"], {"beta": beta, "g": g, "use_qk_l2norm": True}
