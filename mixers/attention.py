"""Softmax attention: Megatron-Core's own SelfAttention (TE or local core attention), registered as is."""
from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from linear_moe.registry import MixerConfig, register_mixer


@register_mixer("attention", symbol="*")
class SoftmaxAttention:
    """Registry entry for Megatron's SelfAttention; heads come from model.num_attention_heads."""

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        """No extra settings: attention is configured through the model section (heads, query groups, RoPE)."""

    @staticmethod
    def layer_submodules(sub: TransformerLayerSubmodules, mixer_config: Config) -> TransformerLayerSubmodules:
        return sub
