"""Gated linear attention (Yang et al., 2024): a data-dependent decay per key channel from a low-rank gate."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core import tensor_parallel

from linear_moe.modules.linear_mixer import LinearMixer
from linear_moe.registry import MixerConfig, register_mixer


@register_mixer("gla", symbol="G")
class GatedLinearAttention(LinearMixer):
    """g_t = logsigmoid(W_up W_down x_t + b) / gate_logit_normalizer, one decay per head and key channel."""

    op = "gla"

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        gate_low_rank_dim: int = 16
        """Rank of the low-rank gate projection (must be divisible by the tensor-parallel size)."""
        gate_logit_normalizer: float = 16.0
        """Divides logsigmoid of the gate logits; larger keeps decays nearer 1 (slower forgetting)."""

        def resolve(self, hidden_size: int, num_attention_heads: int) -> None:
            super().resolve(hidden_size, num_attention_heads)
            if self.gate_low_rank_dim < 1:
                raise ValueError(f"gate_low_rank_dim={self.gate_low_rank_dim} must be >= 1")
            if self.gate_logit_normalizer <= 0:
                raise ValueError(f"gate_logit_normalizer={self.gate_logit_normalizer} must be > 0")

    def __init__(self, config, submodules=None, layer_number=None, *, mixer_config, pg_collection=None, **kw):
        super().__init__(config, submodules, layer_number, mixer_config=mixer_config, pg_collection=pg_collection,
                         **kw)
        r = mixer_config.gate_low_rank_dim
        if r % self.tp_size:
            raise ValueError(f"mixers.gla.gate_low_rank_dim={r} must be divisible by the tensor-parallel size "
                             f"{self.tp_size}")
        # The rank-r bottleneck is needed whole by every head: column-parallel with a gathered output, so its
        # gradient is split back per rank. Under SP it also gathers the sequence, like in_proj.
        self.gk_down = tensor_parallel.ColumnParallelLinear(
            self.hidden_size, r, config=config, init_method=config.init_method, bias=False, gather_output=True,
            skip_bias_add=True, tp_group=self.tp_group)
        # Its input is already full-sequence and replicated: no SP gather here, only the TP dgrad all-reduce.
        up_config = copy.copy(config)
        up_config.sequence_parallel = False
        self.gk_up = tensor_parallel.ColumnParallelLinear(
            r, self.num_heads * self.head_k_dim, config=up_config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False, tp_group=self.tp_group)

    def prepare(self, parts, hidden_states):
        q, k, v = parts["q"], parts["k"], parts["v"]
        gk, _ = self.gk_up(self.gk_down(hidden_states)[0])  # [T, B, H_local * K]
        gk = gk.transpose(0, 1).reshape(q.shape)
        g = F.logsigmoid(gk.float()) / self.mixer_config.gate_logit_normalizer  # [B, T, H, K]
        return q, k, v, {"g": g}
