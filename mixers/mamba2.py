"""Mamba2 (Dao & Gu, 2024) in its SSD form: a scalar-decay gated linear attention with q = C, k = B, v = x * dt.

Per head h: S_t = exp(-exp(A_log_h) dt_t) S_{t-1} + B_t (dt_t x_t)^T, y_t = S_t^T C_t + D_h x_t, dt_t =
softplus(dt_raw_t + dt_bias_h). In MixerConfig terms head_dim is the SSM state size N (the q/k dim) and
value_dim = head_dim * expand_v is Mamba's head dim P. The output norm is the per-head gated RMSNorm shared by all
linear mixers (normalise, then gate with silu(z)), not Mamba2's gate-then-normalise grouped norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linear_moe.modules.linear_mixer import LinearMixer, mamba_dt_bias
from linear_moe.registry import MixerConfig, register_mixer


@register_mixer("mamba2", symbol="M")
class Mamba2(LinearMixer):
    """in_proj -> (x, B, C, z, dt) per group of heads, short conv on x/B/C, chunk_gla with a scalar decay, D skip."""

    op = "gla"

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        num_groups: int | None = None
        """Groups of heads sharing B and C (Mamba2's ngroups); null: one per head. Must divide num_heads and be
        divisible by the tensor-parallel size."""
        A_init_min: float = 1.0
        """A = exp(A_log) is initialised uniform in [A_init_min, A_init_max] per head."""
        A_init_max: float = 16.0
        """Upper end of the A initialisation range."""

        def resolve(self, hidden_size: int, num_attention_heads: int) -> None:
            super().resolve(hidden_size, num_attention_heads)
            if self.num_groups is None:
                self.num_groups = self.num_heads
            if self.num_groups < 1 or self.num_heads % self.num_groups:
                raise ValueError(f"num_groups={self.num_groups} must be >= 1 and divide num_heads={self.num_heads}")
            if not 0 < self.A_init_min <= self.A_init_max:
                raise ValueError(f"A_init_min={self.A_init_min} and A_init_max={self.A_init_max} must satisfy "
                                 "0 < A_init_min <= A_init_max")

    def __init__(self, config, submodules=None, layer_number=None, *, mixer_config, pg_collection=None, **kw):
        mixer_config.resolve(config.hidden_size, config.num_attention_heads)
        self.heads_per_group = mixer_config.num_heads // mixer_config.num_groups
        super().__init__(config, submodules, layer_number, mixer_config=mixer_config, pg_collection=pg_collection,
                         **kw)
        self.scale = 1.0
        lo, hi = mixer_config.A_init_min, mixer_config.A_init_max
        self.A_log = self.head_param(lambda h: torch.empty(h).uniform_(lo, hi).log())
        self.dt_bias = self.head_param(mamba_dt_bias)
        self.D = self.head_param(torch.ones)

    def num_units(self):
        return self.mixer_config.num_groups

    def unit_sections(self):
        hp, N = self.heads_per_group * self.head_v_dim, self.head_k_dim
        out = [("x", hp), ("B", N), ("C", N)]
        if self.mixer_config.use_output_gate:
            out.append(("g", hp))
        return out + [("dt", self.heads_per_group)]

    def conv_width(self):
        return self.heads_per_group * self.head_v_dim + 2 * self.head_k_dim

    def prepare(self, parts, hidden_states):
        Bsz, T = parts["x"].shape[:2]
        H, P = self.local_heads, self.head_v_dim
        x = parts["x"].reshape(Bsz, T, H, P)
        parts["x"] = x
        if "g" in parts:
            parts["g"] = parts["g"].reshape(Bsz, T, H, P)
        # one B and C per group, shared by its heads
        k = parts["B"].repeat_interleave(self.heads_per_group, dim=2)  # [B, T, H, N]
        q = parts["C"].repeat_interleave(self.heads_per_group, dim=2)
        dt = F.softplus(parts["dt"].reshape(Bsz, T, H).float() + self.dt_bias.float())  # [B, T, H]
        g = -self.A_log.float().exp() * dt
        v = (x.float() * dt[..., None]).to(x.dtype)
        return q, k, v, {"g": g}

    def finish(self, o, parts):
        x = parts["x"]
        return (o.float() + x.float() * self.D.float()[:, None]).to(o.dtype)
