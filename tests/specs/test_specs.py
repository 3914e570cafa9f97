"""A layer pattern becomes the right Megatron specs, sliced per pipeline (and virtual) stage, and the block runs."""
from __future__ import annotations

import functools

import pytest
import torch
from layer_helpers import transformer_config
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from linear_moe.config import ModelConfig
from linear_moe.registry import get_mixer
from linear_moe.specs import block_spec, layer_spec

pytestmark = pytest.mark.usefixtures("megatron_world")


ZOO = "L- RE G0 NE D- ME *- *E"
MIXERS = ["linear_attention", "retention", "gla", "deltanet", "gated_deltanet", "mamba2", "attention", "attention"]
FFNS = ["dense", "moe", "none", "moe", "dense", "moe", "dense", "moe"]


def zoo_model(**kw) -> ModelConfig:
    m = ModelConfig(hidden_size=32, num_layers=8, layer_pattern=ZOO, num_attention_heads=4, **kw)
    m.moe.num_experts, m.moe.topk, m.moe.ffn_hidden_size = 4, 2, 64
    return m


def moe_config(**kw):
    return transformer_config(num_layers=8, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64,
                              moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32",
                              moe_aux_loss_coeff=0.01, ffn_hidden_size=64, **kw)


def ffn_class(spec) -> type:
    """The module class behind an FFN spec: a class, a ModuleSpec, or Megatron's `MLP.as_mlp_submodule` partial."""
    if isinstance(spec, type):
        return spec
    if isinstance(spec, functools.partial):
        return getattr(spec.func, "__self__", spec.func)
    return spec.module


def test_pattern_parses():
    assert zoo_model().layers() == list(zip(MIXERS, FFNS))


@pytest.mark.parametrize("i", range(8), ids=[f"{m}-{f}" for m, f in zip(MIXERS, FFNS)])
def test_layer_spec(i):
    model = zoo_model()
    spec = layer_spec(MIXERS[i], FFNS[i], model, use_te=False)
    assert spec.module is TransformerLayer
    sub = spec.submodules
    if MIXERS[i] == "attention":
        assert sub.self_attention.module is SelfAttention
    else:
        assert sub.self_attention.module is get_mixer(MIXERS[i])
        assert sub.self_attention.params["mixer_config"] is model.mixers[MIXERS[i]]
    ffn = {"dense": MLP, "moe": MoELayer, "none": IdentityOp}[FFNS[i]]
    assert ffn_class(sub.mlp) is ffn
    if FFNS[i] == "none":
        assert sub.pre_mlp_layernorm is IdentityOp


@pytest.mark.parametrize("vpp", [None, 2], ids=["pp2", "pp2-vpp2"])
def test_block_spec_slices_per_stage(vpp):
    """Each (pipeline rank, virtual stage) gets exactly its contiguous slice of the pattern, and nothing else."""
    model = zoo_model()
    tc = moe_config(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp,
                    pipeline_dtype=torch.float32)
    want = [get_mixer(m) for m in MIXERS]
    stages = [(0, None), (1, None)] if vpp is None else [(0, 0), (1, 0), (0, 1), (1, 1)]
    per = 8 // len(stages)
    for n, (pp_rank, vp_stage) in enumerate(stages):
        spec = block_spec(model, tc, vp_stage=vp_stage, pp_rank=pp_rank, use_te=False)
        got = [s.submodules.self_attention.module for s in spec.layer_specs]
        expect = [SelfAttention if w.mixer_name == "attention" else w for w in want[n * per:(n + 1) * per]]
        assert got == expect, (pp_rank, vp_stage)


def test_stage_layers_build():
    """The layers of one stage's spec build as Megatron layers (here stage 1 of 2: D-, ME, *-, *E)."""
    model = zoo_model()
    tc_pp = moe_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    spec = block_spec(model, tc_pp, pp_rank=1, use_te=False)
    tc = moe_config()
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    layers = [build_module(s, config=tc, layer_number=5 + i, pg_collection=pgs) for i, s in enumerate(spec.layer_specs)]
    assert [type(layer.self_attention) for layer in layers] == [
        get_mixer("gated_deltanet"), get_mixer("mamba2"), SelfAttention, SelfAttention]
    assert [type(layer.mlp) for layer in layers] == [MLP, MoELayer, MLP, MoELayer]


def test_zoo_block_forward_backward():
    """The whole zoo (every mixer, dense, MoE and no FFN) as one stock TransformerBlock: finite output and grads."""
    model = zoo_model()
    tc = moe_config()
    block = TransformerBlock(tc, block_spec(model, tc, use_te=False),
                             pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    s, b = 16, 2
    x = torch.randn(s, b, 32, requires_grad=True)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    out = block(x, attention_mask=mask)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (s, b, 32) and out.isfinite().all()
    out.square().mean().backward()
    for n, p in block.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), n


def test_gpu_run_config_builds_without_te_or_apex():
    """The TransformerConfig of a GPU run (bf16, fusions on where they exist) builds the hybrid model with Megatron's
    torch norms and softmax when neither Transformer Engine nor apex is installed: no flag asks for their kernels."""
    import importlib.util

    from linear_moe.config import load_config
    from linear_moe.model import build_model
    from linear_moe.model import transformer_config as run_config

    cfg = load_config(None, ["model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64",
                             "model.vocab_size=256", "model.layer_pattern=X- *E", "model.num_layers=2",
                             "model.moe.num_experts=2", "model.moe.ffn_hidden_size=32", "train.precision=bf16",
                             "model.mixers.mom.head_dim=16"])
    tc = run_config(cfg, cpu=False)
    assert tc.bf16 and not tc.persist_layer_norm
    assert tc.masked_softmax_fusion == (importlib.util.find_spec("scaled_masked_softmax_cuda") is not None)
    model = build_model(cfg, tc)
    assert sum(p.numel() for p in model.parameters()) > 0
