"""ONE layer-spec builder and ONE block-spec builder: a layer pattern becomes Megatron layer specs.

Softmax attention is Megatron's own SelfAttention spec; every other mixer is the registered class with its resolved
config as a spec param. FFNs are Megatron's dense MLP or MoE layer. The block spec is sliced per pipeline stage (and
virtual stage) with Megatron's own offset helpers, so each stage builds only its layers.
"""
from __future__ import annotations

import dataclasses

from megatron.core.models.gpt import gpt_layer_specs as gls
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from linear_moe.config import ModelConfig
from linear_moe.registry import get_mixer


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 (optional; a broken install fails in many ways, not only ImportError)
        return False
    return True


def _base_submodules(ffn: str, model: ModelConfig, use_te: bool):
    moe = ffn == "moe"
    kw = {"num_experts": model.moe.num_experts if moe else None,
          "moe_grouped_gemm": model.moe.grouped_gemm if moe else False}
    if use_te:
        return gls.get_gpt_layer_with_transformer_engine_submodules(**kw)
    return gls.get_gpt_layer_local_submodules(normalization=model.normalization, **kw)


def _norm(model: ModelConfig, use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return gls.LocalSpecProvider().layer_norm(rms_norm=model.normalization == "RMSNorm", for_qk=False)


def layer_spec(mixer: str, ffn: str, model: ModelConfig, use_te: bool | None = None) -> ModuleSpec:
    """The TransformerLayer spec for one layer: mixer `mixer` (registry name) and FFN kind 'dense'|'moe'|'none'."""
    use_te = have_transformer_engine() if use_te is None else use_te
    sub = _base_submodules(ffn, model, use_te)
    cls = get_mixer(mixer)
    hook = getattr(cls, "layer_submodules", None)
    if hook is not None:
        # A mixer that is Megatron's own module (softmax attention) keeps Megatron's submodules.
        sub = hook(sub, model.mixer_config(mixer))
    else:
        # The TE attention spec fuses the input norm into linear_qkv; our mixers take normalised input, so they get
        # an explicit norm there.
        sub = dataclasses.replace(
            sub,
            input_layernorm=_norm(model, use_te) if use_te else sub.input_layernorm,
            self_attention=ModuleSpec(module=cls, params={"mixer_config": model.mixer_config(mixer)}),
            sharded_state_dict_keys_map={
                k: v for k, v in (sub.sharded_state_dict_keys_map or {}).items() if not k.startswith("input_")},
        )
    if ffn == "none":
        keys = {k: v for k, v in (sub.sharded_state_dict_keys_map or {}).items() if not k.startswith("pre_mlp")}
        sub = dataclasses.replace(sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp,
                                  sharded_state_dict_keys_map=keys)
    elif ffn == "moe" and use_te:
        sub = dataclasses.replace(sub, pre_mlp_layernorm=_norm(model, use_te))
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def block_spec(model: ModelConfig, config: TransformerConfig, vp_stage: int | None = None,
               pp_rank: int | None = None, use_te: bool | None = None) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage (and virtual stage): its slice of the layer pattern."""
    use_te = have_transformer_engine() if use_te is None else use_te
    specs = [layer_spec(mixer, ffn, model, use_te) for mixer, ffn in model.layers()]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + n], layer_norm=_norm(model, use_te))
