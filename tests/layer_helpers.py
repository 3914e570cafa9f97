"""Shared by the layer-level tests: a small fp32 CPU TransformerConfig."""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_config(**kw) -> TransformerConfig:
    """A small fp32 CPU TransformerConfig; keywords override."""
    base = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "use_cpu_initialization": True,
            "add_bias_linear": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
            "gradient_accumulation_fusion": False, "bias_dropout_fusion": False, "masked_softmax_fusion": False,
            "persist_layer_norm": False, "params_dtype": torch.float32}
    return TransformerConfig(**{**base, **kw})
