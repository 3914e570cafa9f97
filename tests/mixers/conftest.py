"""Helpers for the mixer tests: a small CPU TransformerConfig and the kernel entry points the tests compare.

The world-size-1 Megatron setup is the shared `megatron_world` fixture of tests/conftest.py."""
from __future__ import annotations

import importlib

import pytest
import torch


def transformer_config(**kw):
    """A small fp32 CPU TransformerConfig; keywords override."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "use_cpu_initialization": True,
            "add_bias_linear": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
            "gradient_accumulation_fusion": False, "bias_dropout_fusion": False, "masked_softmax_fusion": False,
            "persist_layer_norm": False, "params_dtype": torch.float32}
    base.update(kw)
    return TransformerConfig(**base)


@pytest.fixture
def make_tc():
    """`transformer_config` as a fixture, for test modules that should not import from a conftest by name."""
    return transformer_config


def kernel_entry(op: str, kind: str):
    """`linear_moe.kernels.<op>.<kind>_<op>`, or None while that kernel family has not landed."""
    try:
        return getattr(importlib.import_module(f"linear_moe.kernels.{op}"), f"{kind}_{op}")
    except (ImportError, AttributeError):
        return None
