"""DeltaNet (Schlag et al., 2021; Yang et al., 2024): the delta rule with beta = sigmoid(b_proj(x))."""
from __future__ import annotations

from dataclasses import dataclass

from linear_moe.modules.linear_mixer import LinearMixer
from linear_moe.registry import MixerConfig, register_mixer


@register_mixer("deltanet", symbol="N")
class DeltaNet(LinearMixer):
    """S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with L2-normalised q, k; beta per head and step."""

    op = "delta_rule"

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        use_qk_l2norm: bool = True
        """L2-normalise q and k per head (keeps the delta rule's transition a contraction)."""

    def extra_sections(self):
        return [("beta", 1)]

    def prepare(self, parts, hidden_states):
        beta = parts["beta"].squeeze(-1).float().sigmoid()  # [B, T, H]
        return parts["q"], parts["k"], parts["v"], {
            "beta": beta, "use_qk_l2norm": self.mixer_config.use_qk_l2norm}
