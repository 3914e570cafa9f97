"""From the config tree to Megatron objects: the TransformerConfig and a stock GPTModel built from our block spec."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from linear_moe.config import Config
from linear_moe.specs import block_spec


def padded_vocab_size(cfg: Config) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of 128 * tensor-parallel size."""
    mult = 128 * cfg.parallel.tensor
    return ((cfg.model.vocab_size + mult - 1) // mult) * mult


def transformer_config(cfg: Config, *, cpu: bool | None = None) -> TransformerConfig:
    """Megatron's TransformerConfig for this run. On CPU the fused CUDA paths are switched off and fp32 is used."""
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    m, p, t = cfg.model, cfg.parallel, cfg.train
    has_moe = any(f == "moe" for _, f in m.layers())
    bf16 = t.precision == "bf16" and not cpu
    fp16 = t.precision == "fp16" and not cpu
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    kw = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups,
        "ffn_hidden_size": m.ffn_hidden_size or 4 * m.hidden_size,
        "normalization": m.normalization,
        "gated_linear_unit": m.gated_mlp,
        "activation_func": F.silu if m.gated_mlp else F.gelu,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": m.init_method_std,
        "tensor_model_parallel_size": p.tensor,
        "pipeline_model_parallel_size": p.pipeline,
        "virtual_pipeline_model_parallel_size": p.virtual_pipeline,
        # The interleaved schedule sends activations forward and gradients backward in one exchange; batched into one
        # batch_isend_irecv, with two pipeline ranks both messages go to the same peer on the same communicator and
        # are matched in posting order, which swaps them (same shapes, no error). Megatron's unbatched path sends the
        # two directions on different communicators and orders them by rank parity (Megatron-LM's VPP setting too).
        "batch_p2p_comm": p.virtual_pipeline is None,
        "context_parallel_size": p.context,
        "expert_model_parallel_size": p.expert,
        "sequence_parallel": p.sequence_parallel,
        "bf16": bf16,
        "fp16": fp16,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "use_cpu_initialization": True,
        "bias_dropout_fusion": not cpu,
        "apply_rope_fusion": False,
        # Megatron's fused softmax needs its compiled extension (built with apex / Megatron-LM); without it the
        # attention forward would fail on import, so the unfused torch softmax is used
        "masked_softmax_fusion": not cpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        "gradient_accumulation_fusion": False,
        # apex's persistent LayerNorm kernels; Megatron's torch norms (no TE) refuse the flag
        "persist_layer_norm": False,
        "variable_seq_lengths": False,
        # Layers differ along the pattern (mixer and FFN kind), so checkpoints key each layer by its global number
        # instead of stacking "same" weights of all layers into one tensor.
        "hetereogenous_dist_checkpoint": True,
    }
    if has_moe:
        kw.update(
            num_moe_experts=m.moe.num_experts,
            moe_router_topk=m.moe.topk,
            moe_aux_loss_coeff=m.moe.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_grouped_gemm=m.moe.grouped_gemm,
            moe_token_dispatcher_type=m.moe.token_dispatcher,
            moe_ffn_hidden_size=m.moe.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
            moe_shared_expert_intermediate_size=m.moe.shared_expert_size,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(**kw)


def build_model(cfg: Config, tc: TransformerConfig, *, pre_process: bool = True, post_process: bool = True,
                vp_stage: int | None = None) -> GPTModel:
    """A stock Megatron GPTModel whose decoder is our block spec for this (virtual) pipeline stage."""
    return GPTModel(
        config=tc,
        transformer_layer_spec=block_spec(cfg.model, tc, vp_stage=vp_stage),
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.train.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type=cfg.model.position_embedding,
        vp_stage=vp_stage,
    )
