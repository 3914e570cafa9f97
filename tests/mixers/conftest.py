"""Megatron at world size 1 (gloo, CPU) for building mixer layers, and the kernel entry points the tests compare."""
from __future__ import annotations

import importlib
import os
import socket

import pytest
import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world 1) with Megatron's parallel state at TP = PP = 1, in CPU mode."""
    from megatron.core import parallel_state as ps

    from linear_moe.cpu import enable_cpu_mode

    enable_cpu_mode()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(42)


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
