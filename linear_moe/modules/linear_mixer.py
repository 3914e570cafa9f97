"""The shared body of the linear-recurrent mixers: head-sharded projections, short conv, recurrence, gated output.

A mixer subclass declares what one projection *unit* (a head, or a group of heads) holds, turns the projected parts
into the kernel's q, k, v and per-step gates, and names its kernel family. Everything that touches tensor and
sequence parallelism lives here, once:

- every per-head projection (q, k, v, output gate, beta, decay inputs) is ONE `ColumnParallelLinear` whose output
  rows are laid out unit by unit, so Megatron's contiguous dim-0 split hands each TP rank whole heads with all their
  parts. The global weight is a plain concatenation of the ranks' shards: checkpoints reshard across TP sizes with
  the stock axis-0 rule, and CPU initialisation (full weight, then split) is identical at every TP size;
- under sequence parallelism the column-parallel projections gather the sequence and `o_proj` (row-parallel)
  reduce-scatters it; every custom parameter is TP-sharded by head, so none needs a TP gradient all-reduce;
- conv weights, output-norm weights and per-head scalars (A_log, dt_bias, D) carry Megatron's tensor-parallel
  attributes (dim 0) and are written to dist checkpoints as TP-sharded tensors.
"""
from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import nn

from linear_moe.modules import inference
from linear_moe.modules.context_parallel import cp_halo, cp_local_cu_seqlens, cp_pieces, cp_scan, cp_unpieces
from linear_moe.modules.gated_norm import GatedRMSNorm
from linear_moe.modules.short_conv import ShortConvolution
from linear_moe.registry import MixerConfig

Tensor = torch.Tensor


class HeadwiseGatedRMSNorm(GatedRMSNorm):
    """GatedRMSNorm over each head's values with one weight row per head, `weight` [heads, dim].

    Per-head weights keep the norm TP-sharded with its heads; a weight shared by all heads would be replicated
    across TP ranks and need a gradient all-reduce that Megatron does not do outside sequence parallelism.
    """

    def __init__(self, heads: int, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.ones(heads, dim))


def shard_param_(param: Tensor, full: Tensor | None, rank: int, world: int) -> None:
    """Mark `param` TP-sharded along dim 0 and, given the `full` (all ranks') value, copy this rank's slice into it.

    Initialising the full tensor and slicing it keeps the weights identical at every TP size for one seed.
    """
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
    if full is not None:
        with torch.no_grad():
            param.copy_(full.chunk(world, dim=0)[rank])


def packed_cu_seqlens(packed_seq_params: PackedSeqParams | None) -> Tensor | None:
    """The document offsets of a Megatron THD (packed) batch, padded offsets first; None when not packed."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q if cu is None else cu


class LinearMixer(MegatronModule):
    """Base of the linear mixers. Subclasses set the class attribute `op` and override a few hooks.

    Hooks (all optional except `op`):
      - `unit_sections()`  -> [(name, width)] of one projection unit; default q K, k K, v V, [g V], then `extra_sections`
      - `extra_sections()` -> [(name, width)] appended per head (beta, decay inputs); default none
      - `conv_width()`     -> leading channels of a unit that get the short conv; default 2K + V (q, k, v)
      - `prepare(parts, hidden_states)` -> (q, k, v, extras): the kernel inputs, extras are kernel keyword args
      - `recurrence(q, k, v, extras, ...)` -> (o, final_state): the one place the kernel is called
      - `finish(o, parts)` -> o: post-recurrence terms (Mamba2's D skip)
    Layout contract: parts, q, k, v, o are `[B, T, H_local, D]` (batch first, as the kernels want).
    """

    op: str = ""
    """Kernel family under `linear_moe.kernels` ('gla' or 'delta_rule')."""

    def __init__(self, config: TransformerConfig, submodules: Any = None, layer_number: int | None = None, *,
                 mixer_config: MixerConfig, pg_collection: ProcessGroupCollection | None = None, **_):
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.tp_size, self.tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        name = type(self).mixer_name
        cp = getattr(pg_collection, "cp", None)
        # Under context parallelism the short conv takes its halo, and the recurrence its initial state, from the
        # CP ranks that hold the earlier pieces of the sequence (modules/context_parallel.py).
        self.cp_group = cp if cp is not None and get_pg_size(cp) > 1 else None
        mc = mixer_config
        mc.resolve(config.hidden_size, config.num_attention_heads)
        if mc.num_heads % self.tp_size:
            raise ValueError(f"mixers.{name}.num_heads={mc.num_heads} must be divisible by the tensor-parallel "
                             f"size {self.tp_size}")
        self.mixer_config = mc
        self.layer_number = layer_number
        self.hidden_size = config.hidden_size
        self.num_heads, self.head_k_dim, self.head_v_dim = mc.num_heads, mc.head_dim, mc.value_dim
        self.local_heads = self.num_heads // self.tp_size
        self.backend = mc.backend
        self.scale = self.head_k_dim ** -0.5

        units, sections = self.num_units(), self.unit_sections()
        if units % self.tp_size:
            raise ValueError(f"mixers.{name}: {units} projection units must be divisible by the tensor-parallel "
                             f"size {self.tp_size}")
        self.local_units = units // self.tp_size
        self.section_names = [n for n, _ in sections]
        self.section_widths = [w for _, w in sections]
        self.unit_width = sum(self.section_widths)
        # the conv covers whole leading sections (q, k, v; Mamba2's x, B, C)
        ends = [sum(self.section_widths[:i + 1]) for i in range(len(sections))]
        if self.conv_width() not in ends:
            raise ValueError(f"conv_width()={self.conv_width()} must end on a section boundary of {sections}")
        self.conv_sections = ends.index(self.conv_width()) + 1
        self.in_proj = tensor_parallel.ColumnParallelLinear(
            self.hidden_size, units * self.unit_width, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_bias_add=True, tp_group=self.tp_group)

        self.conv = None
        if mc.use_short_conv:
            cw = self.conv_width()
            # The module's own init draws per local channel; keep it off the global stream so that the full-width
            # draw below (and everything after it) is the same at every TP size.
            with torch.random.fork_rng(devices=[]):
                self.conv = ShortConvolution(self.local_units * cw, mc.conv_size, activation="silu")
            W = mc.conv_size
            full = torch.empty(units * cw, W).uniform_(-W ** -0.5, W ** -0.5) if config.perform_initialization \
                else None
            shard_param_(self.conv.weight, full, self.tp_rank, self.tp_size)

        self.o_norm = HeadwiseGatedRMSNorm(self.local_heads, self.head_v_dim, eps=mc.norm_eps)
        shard_param_(self.o_norm.weight, None, self.tp_rank, self.tp_size)
        self.o_proj = tensor_parallel.RowParallelLinear(
            self.num_heads * self.head_v_dim, self.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, tp_group=self.tp_group)

    def num_units(self) -> int:
        """Projection units (TP splits them evenly): heads by default."""
        return self.num_heads

    def unit_sections(self) -> list[tuple[str, int]]:
        K, V = self.head_k_dim, self.head_v_dim
        out = [("q", K), ("k", K), ("v", V)]
        if self.mixer_config.use_output_gate:
            out.append(("g", V))
        return out + self.extra_sections()

    def extra_sections(self) -> list[tuple[str, int]]:
        return []

    def conv_width(self) -> int:
        return 2 * self.head_k_dim + self.head_v_dim

    def head_param(self, init: Callable[[int], Tensor] | None) -> nn.Parameter:
        """A per-head `[local_heads]` parameter, TP-sharded; `init(num_heads)` gives the full (all heads) value."""
        p = nn.Parameter(torch.zeros(self.local_heads, dtype=self.config.params_dtype))
        full = init(self.num_heads) if (init is not None and self.config.perform_initialization) else None
        shard_param_(p, full, self.tp_rank, self.tp_size)
        return p

    def head_index(self, device: torch.device) -> Tensor:
        """Global indices of this rank's heads `[local_heads]` (for per-head constants such as RetNet's decay)."""
        start = self.tp_rank * self.local_heads
        return torch.arange(start, start + self.local_heads, device=device)

    def kernel(self, kind: str = "chunk") -> Callable:
        """`linear_moe.kernels.<op>.<kind>_<op>`, imported on first use (kind: chunk, fused_recurrent, naive_recurrent)."""
        mod = importlib.import_module(f"linear_moe.kernels.{self.op}")
        return getattr(mod, f"{kind}_{self.op}")

    def project(self, hidden_states: Tensor, cu_seqlens: Tensor | None, conv_state: Tensor | None = None,
                fresh: bool = True) -> dict[str, Tensor]:
        """in_proj (+ short conv on the leading conv_width channels) -> named parts `[B, T, U_local, width]`.

        Decoding passes `conv_state` `[B, C_local, W-1]`: the conv continues from it (zeros when `fresh`) and it is
        updated in place."""
        x, _ = self.in_proj(hidden_states)  # [T, B, U_local * unit_width] (sequence gathered under SP)
        T, B, _ = x.shape
        x = x.transpose(0, 1).reshape(B, T, self.local_units, self.unit_width)
        if self.conv is None:
            return dict(zip(self.section_names, x.split(self.section_widths, dim=-1)))
        cw, n = self.conv_width(), self.conv_sections
        xc, xr = x.split([cw, self.unit_width - cw], dim=-1)
        if conv_state is not None:
            y = self.conv_cached(xc.reshape(B, T, -1), conv_state, fresh)
        elif self.cp_group is None:
            y, _ = self.conv(xc, cu_seqlens=cu_seqlens, backend=self.backend)
        else:
            y = self.cp_conv(xc.reshape(B, T, -1), cu_seqlens)
        y = y.view(B, T, self.local_units, cw)
        pieces = y.split(self.section_widths[:n], dim=-1) + xr.split(self.section_widths[n:], dim=-1)
        return dict(zip(self.section_names, pieces))

    def conv_cached(self, x: Tensor, conv_state: Tensor, fresh: bool) -> Tensor:
        """The short conv of `x` `[N, T, C]` continuing from `conv_state` `[N, C, W-1]` (zeros when `fresh`), which is
        overwritten with the new state; one token after a prefill is a `ShortConvolution.step`."""
        if x.shape[1] == 1 and not fresh:
            y, new = self.conv.step(x[:, 0], conv_state)
            y = y[:, None]
        else:
            y, new = self.conv(x, initial_state=None if fresh else conv_state, output_final_state=True)
        conv_state.copy_(new)
        return y

    def cp_conv(self, x: Tensor, cu_seqlens: Tensor | None) -> Tensor:
        """The short conv of this CP rank's tokens `[B, T_local, C]`, with the inputs before each local piece (or
        packed document piece) from the ranks that hold them; `cu_seqlens` are the global (padded) THD offsets."""
        lay = "megatron" if cu_seqlens is None else "thd"
        halo = cp_halo(x, self.cp_group, width=self.conv.kernel_size - 1, layout=lay, cu_seqlens=cu_seqlens)
        if cu_seqlens is None:
            return cp_unpieces(self.conv(cp_pieces(x, lay), initial_state=halo)[0], x.shape[0], lay)
        local_cu = cp_local_cu_seqlens(cu_seqlens, x.shape[1], self.cp_group, lay)
        return self.conv(x, cu_seqlens=local_cu, initial_state=halo)[0]

    def prepare(self, parts: dict[str, Tensor], hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Kernel inputs from the parts; default: q, k, v as projected, no gates."""
        return parts["q"], parts["k"], parts["v"], {}

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, extras: dict[str, Any], initial_state: Tensor | None = None,
                   output_final_state: bool = False, cu_seqlens: Tensor | None = None, kind: str = "chunk"
                   ) -> tuple[Tensor, Tensor | None]:
        """The recurrence over `[B, T, H_local, D]` inputs; the one kernel call (decoding steps pass
        kind='fused_recurrent').

        Under CP the inputs are this rank's pieces (Megatron's zigzag split, per document for THD) and `cu_seqlens`
        the global offsets; the split scan equals the unsplit one.
        """
        if self.cp_group is not None:
            fn = functools.partial(self.kernel("chunk"), scale=self.scale, backend=self.backend, check_inputs=False)
            return cp_scan(fn, q, k, v, cp_group=self.cp_group, layout="megatron" if cu_seqlens is None else "thd",
                           cu_seqlens=cu_seqlens, initial_state=initial_state,
                           output_final_state=output_final_state, **extras)
        return self.kernel(kind)(
            q, k, v, **extras, scale=self.scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, backend=self.backend)

    def finish(self, o: Tensor, parts: dict[str, Tensor]) -> Tensor:
        return o

    def output(self, o: Tensor, parts: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Per-head gated RMSNorm, then o_proj: `[B, T, H_local, V]` -> (`[T, B, hidden]`, bias or None)."""
        B, T = o.shape[:2]
        gate = parts.get("g") if self.mixer_config.use_output_gate else None
        y = self.o_norm(o, gate).reshape(B, T, -1).transpose(0, 1).contiguous()
        return self.o_proj(y)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, inference_context=None,
                packed_seq_params: PackedSeqParams | None = None, **_) -> tuple[Tensor, Tensor | None]:
        """hidden_states `[s, b, h]` (s local under SP) -> (out `[s, b, h]`, bias or None), causal by construction.

        With a THD `packed_seq_params` (b == 1) neither the conv nor the recurrence crosses a document border.
        """
        if inference_context is not None:
            if packed_seq_params is not None:
                raise ValueError(f"mixer {type(self).mixer_name!r}: decoding takes [s, b] batches, not packed (THD) "
                                 "input")
            return self.decode(hidden_states, inference_context)
        cu_seqlens = packed_cu_seqlens(packed_seq_params)
        parts = self.project(hidden_states, cu_seqlens)
        q, k, v, extras = self.prepare(parts, hidden_states)
        # the kernels take strided views (L2 norm reads them in place; the Triton entry points copy what they must)
        o, _ = self.recurrence(q, k, v, extras, cu_seqlens=cu_seqlens)
        return self.output(self.finish(o, parts), parts)

    def state_specs(self, dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Per-sequence decoding state: conv `[C_local, W-1]` (W-1 = 0 without conv), recurrent `[H_local, K, V]`."""
        C = self.local_units * self.conv_width()
        W1 = self.conv.kernel_size - 1 if self.conv is not None else 0
        return [((C, W1), dtype), ((self.local_heads, self.head_k_dim, self.head_v_dim), torch.float32)]

    def decode_inputs(self, hidden_states: Tensor, inference_context):
        """What every mixer's `decode` starts from: (`[s, b, h]` input with pads zeroed, pad mask `[b, s]` or None,
        this layer's state tensors (`state_specs`), fresh: whether this is the prefill)."""
        if self.cp_group is not None or self.config.sequence_parallel:
            raise NotImplementedError(f"mixer {type(self).mixer_name!r}: decoding supports neither context nor "
                                      "sequence parallelism")
        T, B, _ = hidden_states.shape
        pad = inference.pad_mask(inference_context, B, T)
        if pad is not None:
            # zero input at pads: the conv sees zeros there, as before a sequence start, and their projections
            # vanish (see inference.mask_pads for the gates)
            hidden_states = hidden_states.masked_fill(pad.t()[:, :, None], 0)
        states, fresh = inference.layer_state(
            inference_context, self.layer_number, B, self.state_specs(hidden_states.dtype), hidden_states.device)
        return hidden_states, pad, states, fresh

    def decode(self, hidden_states: Tensor, inference_context) -> tuple[Tensor, Tensor | None]:
        """Cached forward of `[s, b, h]` tokens: prefill at sequence offset 0, else continue from the stored state
        (modules/inference.py describes the state and the pad mask)."""
        hidden_states, pad, (conv_state, state), fresh = self.decode_inputs(hidden_states, inference_context)
        T = hidden_states.shape[0]
        parts = self.project(hidden_states, None, conv_state if self.conv is not None else None, fresh)
        q, k, v, extras = self.prepare(parts, hidden_states)
        if pad is not None:
            k, extras = inference.mask_pads(pad, k, extras)
        o, new = self.recurrence(q, k, v, extras,
                                 initial_state=None if fresh else state, output_final_state=True,
                                 kind="fused_recurrent" if T == 1 and not fresh else "chunk")
        state.copy_(new)
        return self.output(self.finish(o, parts), parts)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron linears shard themselves; every other tensor is TP-sharded where it carries the TP attribute."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out, plain = {}, {}
        for name, module in self.named_children():
            if hasattr(module, "sharded_state_dict"):
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
            else:
                plain.update(module.state_dict(prefix=f"{name}.", keep_vars=True))
        self._save_to_state_dict(plain, "", keep_vars=True)
        axis = {k: t.partition_dim for k, t in plain.items()
                if isinstance(t, Tensor) and getattr(t, "tensor_model_parallel", False)}
        out.update(make_sharded_tensors_for_checkpoint(plain, prefix, axis, sharded_offsets, tp_group=self.tp_group,
                                                       dp_cp_group=metadata["dp_cp_group"]))
        return out


def inverse_softplus(x: Tensor) -> Tensor:
    """softplus^-1, for dt_bias initialisation."""
    return x + torch.log(-torch.expm1(-x))


def mamba_dt_bias(heads: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Mamba's dt_bias init: softplus(dt_bias) log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return inverse_softplus(dt)
