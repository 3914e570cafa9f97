"""Shared by the generation tests: a tiny fp32 GPTModel per layer pattern on CPU at world size 1.

A plain module, not a conftest.py: test modules elsewhere import `conftest` by name, and a second conftest.py on the
path would shadow theirs. Test modules import the fixtures from here.
"""
from __future__ import annotations

import pytest
import torch

from linear_moe.config import load_config

# Tiny dims keep 300-step decodes fast; head_dim 8 for every linear mixer.
TINY = ["model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64", "model.vocab_size=64",
        "model.moe.num_experts=4", "model.moe.ffn_hidden_size=32", "train.seq_length=64", "train.precision=fp32",
        "train.micro_batch_size=2", "train.global_batch_size=2", "logging.progress=false",
        "logging.tensorboard=false", "logging.plot=false", "checkpoint.save=null",
        "data.mqar.num_keys=16", "data.mqar.num_values=16", "data.mqar.num_kv_pairs=4"]


def tiny_config(pattern: str, overrides: tuple[str, ...] = ()):
    layers = len(pattern.replace(" ", "")) // 2
    return load_config(None, [*TINY, f"model.layer_pattern={pattern}", f"model.num_layers={layers}", *overrides])


@pytest.fixture(scope="module")
def world():
    """torch.distributed + Megatron parallel state at world size 1 (CPU mode), as `linear-moe-generate` sets it."""
    from megatron.core import parallel_state as ps

    from linear_moe.training import initialize, shutdown

    # Hundreds of tiny single-token steps: one thread avoids OpenMP hand-offs that dominate (and thrash on a
    # loaded machine) at these sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    created = None
    if not ps.model_parallel_is_initialized():
        created = initialize(tiny_config("G-"))
    yield
    if created is not None:
        shutdown(created)
    torch.set_num_threads(threads)


def build_model(pattern: str, *overrides: str):
    """A fresh tiny GPTModel in eval mode (seed 42) and its config; needs the `world` fixture."""
    from linear_moe.model import build_model as build
    from linear_moe.model import transformer_config

    cfg = tiny_config(pattern, overrides)
    torch.manual_seed(42)
    return cfg, build(cfg, transformer_config(cfg, cpu=True)).eval()
