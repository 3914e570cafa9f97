"""Linear attention (Katharopoulos et al., 2020): the ungated recurrence S_t = S_{t-1} + phi(k_t) v_t^T."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F

from linear_moe.modules.linear_mixer import LinearMixer
from linear_moe.registry import MixerConfig, register_mixer


@register_mixer("linear_attention", symbol="L")
class LinearAttention(LinearMixer):
    """q/k feature map, then chunk_gla with no decay."""

    op = "gla"

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        feature_map: Literal["identity", "elu"] = "identity"
        """Feature map on q and k: 'identity' or 'elu' (elu(x) + 1, positive features)."""

    def prepare(self, parts, hidden_states):
        q, k = parts["q"], parts["k"]
        if self.mixer_config.feature_map == "elu":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        return q, k, parts["v"], {}
