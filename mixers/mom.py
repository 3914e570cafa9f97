"""Mixture-of-Memories (MoM, Du et al., 2025, arXiv 2502.13685): a router sends each token to k of M linear memories.

Per token: router logits (fp32 softmax) pick k memories whose weights are renormalised to sum 1. q is one projection
shared by all memories; k, v, beta and the decay input are projected per memory (the always-on shared memory has its
own); A_log and dt_bias are shared per head. A memory sees only the tokens routed to it, in order: per (sequence,
memory) its tokens form one segment, and both the short conv and the recurrence run per segment, never across segment
or document borders. A token's output is the routing-weighted sum of its k memories' outputs plus the shared
memory's output, then the per-head gated RMSNorm and o_proj.

The forward pass is sync-free (no host reads, fixed shapes):
1. `mom_routing.build_dispatch` orders the routed slots by (sequence, memory) with one stable sort and builds
   `cu_seqlens` of a fixed size on the device (sequences x (M + 1) segments; empty ones allowed).
2. Each token is projected once for q, the output gate and the shared memory (one GEMM), and for its k routed
   memories only (ONE grouped GEMM over the routed pairs sorted by memory, offsets on the device): k / M of the
   routed FLOPs of projecting every token for every memory. The weights stay one column-parallel in_proj whose
   head-major unit layout keeps TP and checkpoints on the stock rules (see LinearMixer); the forward takes its dense
   and per-memory rows as copies, which the backward reuses. Where torch's grouped GEMM would read its offsets on
   the host (CUDA dtypes other than bf16, GPUs other than sm90 / sm100) every token is projected for every memory
   instead. On one TP rank the router's rows join the dense GEMM: its fp32 logits route without gradient and take
   their gradient through that GEMM (kernels/mom_dispatch.py); under TP each rank runs the router on its own.
3. One fused dispatch (kernels/mom_dispatch.py) copies q and each slot's own memory projections into the packed
   order (its backward writes each projection gradient once, no atomics); the short conv and ONE varlen kernel call
   run over all routed and shared segments together.
4. The outputs are combined by a weighted gather-sum per token (deterministic backward, no atomics).

Load balancing: Switch loss `M * sum_i f_i * P_i` scaled by aux_loss_coeff (optionally a router z-loss), attached
with Megatron's MoEAuxLossAutoScaler and logged through its aux-loss tracker.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from linear_moe.kernels import mom_dispatch
from linear_moe.kernels.common import use_triton
from linear_moe.kernels.norms import L2NORM_EPS, l2norm
from linear_moe.kernels.short_conv import short_conv
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.parallel_state import get_data_parallel_group
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from torch import nn

from linear_moe.modules import inference
from linear_moe.modules import mom_routing as routing
from linear_moe.modules.context_parallel import cp_halo, cp_local_cu_seqlens, cp_scan, cp_token_piece
from linear_moe.modules.linear_mixer import LinearMixer, mamba_dt_bias, packed_cu_seqlens
from linear_moe.registry import MixerConfig, register_mixer

try:
    from linear_moe.training import telemetry
except ImportError:
    telemetry = None

Tensor = torch.Tensor


@register_mixer("mom", symbol="X")
class MixtureOfMemories(LinearMixer):
    """MoM layer on the LinearMixer body (in_proj, short conv, per-head gated norm, o_proj, TP/SP, checkpoints).

    in_proj unit (one per head): q K, [g V], then per memory m = 0..M (M = the shared memory): k K, v V, a 1,
    [beta 1]. The router `Linear(hidden -> M)` is replicated across TP ranks.
    """

    @dataclass(kw_only=True)
    class Config(MixerConfig):
        num_memories: int = 4
        """M, the number of routed memories."""
        topk: int = 2
        """Memories per token (k); their routing weights are renormalised to sum 1."""
        shared_memory: bool = True
        """Add an always-on memory whose output is added unweighted."""
        memory_kind: Literal["gated_delta", "gla"] = "gated_delta"
        """Recurrence of each memory: gated delta rule, or gated linear attention (same scalar per-head decay)."""
        aux_loss_coeff: float = 0.01
        """Scale of the Switch load-balancing loss M * sum_i f_i P_i; 0 disables it."""
        aux_loss_type: Literal["layer", "global"] = "layer"
        """'layer': f_i from this micro-batch; 'global': f_i from the loads summed over the data-parallel group."""
        z_loss_coeff: float = 0.0
        """Scale of the router z-loss mean(logsumexp(logits)^2); 0 disables it."""
        capacity_factor: float | None = None
        """None: no dropping. Else each routed memory keeps at most ceil(capacity_factor * len * topk / M) tokens per
        sequence (document), in order of arrival; later tokens are dropped from that memory and their routing weights
        renormalised over the memories that kept them (a token dropped everywhere gets only the shared output)."""

        def resolve(self, hidden_size: int, num_attention_heads: int) -> None:
            super().resolve(hidden_size, num_attention_heads)
            if self.num_memories < 1:
                raise ValueError(f"mixers.mom.num_memories={self.num_memories} must be >= 1")
            if self.topk < 1:
                raise ValueError(f"mixers.mom.topk={self.topk} must be >= 1")
            if self.topk > self.num_memories:
                raise ValueError(f"mixers.mom.topk={self.topk} must be <= num_memories={self.num_memories}")
            if self.memory_kind not in ("gated_delta", "gla"):
                raise ValueError(f"mixers.mom.memory_kind={self.memory_kind!r} must be 'gated_delta' or 'gla'")
            if self.aux_loss_type not in ("layer", "global"):
                raise ValueError(f"mixers.mom.aux_loss_type={self.aux_loss_type!r} must be 'layer' or 'global'")
            if self.aux_loss_coeff < 0 or self.z_loss_coeff < 0:
                raise ValueError(f"mixers.mom.aux_loss_coeff={self.aux_loss_coeff} and z_loss_coeff="
                                 f"{self.z_loss_coeff} must be >= 0")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                raise ValueError(f"mixers.mom.capacity_factor={self.capacity_factor} must be > 0 or null")

    def __init__(self, config, submodules=None, layer_number=None, *, mixer_config, pg_collection=None, **kw):
        mc = mixer_config
        mc.resolve(config.hidden_size, config.num_attention_heads)
        self.op = "delta_rule" if mc.memory_kind == "gated_delta" else "gla"
        self.num_memories, self.topk, self.shared = mc.num_memories, mc.topk, mc.shared_memory
        self.total_memories = mc.num_memories + int(mc.shared_memory)
        super().__init__(config, submodules, layer_number, mixer_config=mc, pg_collection=pg_collection, **kw)
        if self.cp_group is not None and mc.capacity_factor is not None:
            raise ValueError(f"mixers.mom.capacity_factor={mc.capacity_factor} is not supported with context "
                             f"parallelism (parallel.context={dist.get_world_size(self.cp_group)}): a token's place in "
                             "a memory's capacity depends on tokens other CP ranks hold; set mixers.mom.capacity_factor"
                             "=null or parallel.context=1")
        self.A_log = self.head_param(lambda h: torch.empty(h).uniform_(1.0, 16.0).log())
        self.dt_bias = self.head_param(mamba_dt_bias)
        self.router = nn.Linear(config.hidden_size, mc.num_memories, bias=False, dtype=config.params_dtype,
                                device="cpu" if config.use_cpu_initialization else torch.cuda.current_device())
        if config.perform_initialization:
            config.init_method(self.router.weight)
        # Under SP each rank routes its own sequence shard, so the replicated router's weight gradient is partial
        # there and Megatron all-reduces it (like a norm weight). Without SP it is all-reduced through the logits.
        self.router.weight.sequence_parallel = config.sequence_parallel

    def memory_sections(self) -> list[tuple[str, int]]:
        """One memory's part of a projection unit."""
        K, V = self.head_k_dim, self.head_v_dim
        return [("k", K), ("v", V), ("a", 1)] + ([("beta", 1)] if self.op == "delta_rule" else [])

    def unit_sections(self) -> list[tuple[str, int]]:
        out = [("q", self.head_k_dim)]
        if self.mixer_config.use_output_gate:
            out.append(("g", self.head_v_dim))
        return out + [(f"{n}{m}", w) for m in range(self.total_memories) for n, w in self.memory_sections()]

    # The pieces below are shared by the fast forward and the tests' per-segment reference.

    def router_logits(self, hidden_states: Tensor) -> Tensor:
        """fp32 router logits `[s, b, M]` of the tokens this rank holds (its sequence shard under SP)."""
        return routing.router_logits(hidden_states, self.router.weight)

    def project_dispatch(self, hidden_states: Tensor, slot_of: Tensor, memories: Tensor, logits: Tensor | None = None
                         ) -> mom_dispatch.DispatchedTokens:
        """Hidden states `[s, b, h]` (s local under SP) -> gate `[N, H, V]` or None and the packed slots' q `[S, H, K]`,
        k `[S, H, K]`, v `[S, H, V]`, a and beta (or None) `[S, H]`; slot_of, memories `[N, k']` (the shared memory
        included). Each token is projected for q, the gate, the shared memory and its k routed memories only (one
        GEMM, one grouped GEMM: kernels/mom_dispatch.py), not for all M.

        `logits` `[N, M]`: the router's, computed without gradient from these hidden states (one TP rank only); the
        returned logits take the router's gradient through the dense GEMM."""
        if self.config.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(hidden_states, True, group=self.tp_group)
        else:
            # the column-parallel projection's input: its gradient is summed over the TP ranks
            x = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        # in_proj's weight in its unit layout (`unit_sections`), which keeps TP and checkpoints on the stock rules
        return mom_dispatch.project(x.reshape(-1, x.shape[-1]), self.in_proj.weight, slot_of, memories,
                                    heads=self.local_heads, k_dim=self.head_k_dim, v_dim=self.head_v_dim,
                                    num_memories=self.num_memories, has_gate=self.mixer_config.use_output_gate,
                                    has_beta=self.op == "delta_rule", shared=self.shared,
                                    router=None if logits is None else (self.router.weight, logits),
                                    backend=self.backend)

    def memory_inputs(self, q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor | None,
                      cu_seqlens: Tensor | None = None, conv_state: Tensor | None = None, fresh: bool = True
                      ) -> tuple[Tensor, ...]:
        """Packed slots -> kernel inputs: q, k `[S, H, K]`, v `[S, H, V]`, a and beta (or None) `[S, H]` of segments
        `cu_seqlens` (None: one segment) -> q, k, v `[1, S, H, D]` (conv, L2 norm of q and k), g `[1, S, H]` log
        decay, beta or None.

        Decoding passes `conv_state` `[segments, C, W-1]`, continued from (zeros when `fresh`) and overwritten; with
        `cu_seqlens` None each slot is then its own segment of one token (a decoding step)."""
        K, V = self.head_k_dim, self.head_v_dim
        S, H = q.shape[:2]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        gates = (g[None], beta.float().sigmoid()[None] if beta is not None else None)
        if self.conv is not None and conv_state is None and self.cp_group is None and use_triton(q, self.backend):
            # training on the GPU: one kernel per piece reads the dispatched slots and writes the conv output, L2
            # normalised per head for q and k
            w = self.conv.weight.view(H, 2 * K + V, -1)

            def conv(x: Tensor, lo: int, hi: int, eps: float | None) -> Tensor:
                return short_conv(x[None], w[:, lo:hi].reshape(H * (hi - lo), -1), cu_seqlens=cu_seqlens,
                                  activation=self.conv.activation, l2norm_eps=eps,
                                  backend="triton").view(1, S, H, hi - lo)

            return conv(q, 0, K, L2NORM_EPS), conv(k, K, 2 * K, L2NORM_EPS), conv(v, 2 * K, 2 * K + V, None), *gates
        qkv = torch.cat([q, k, v], dim=-1).reshape(1, S, H * (2 * K + V))
        if self.conv is not None and conv_state is not None:
            if cu_seqlens is None:
                y, new = self.conv.step(qkv[0], conv_state)
                qkv = y[None]
            else:
                qkv, new = self.conv(qkv, cu_seqlens=cu_seqlens, initial_state=None if fresh else conv_state,
                                     output_final_state=True)
            conv_state.copy_(new)
        elif self.conv is not None:
            halo = None
            if self.cp_group is not None and cu_seqlens is not None:
                # each local segment's conv continues its (sequence, memory) segment from earlier CP pieces
                halo = cp_halo(qkv, self.cp_group, width=self.conv.kernel_size - 1, local_cu_seqlens=cu_seqlens)
            qkv, _ = self.conv(qkv, cu_seqlens=cu_seqlens, initial_state=halo, backend=self.backend)
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(1, S, H, 2 * K + V).split([K, K, V], dim=-1)
        return l2norm(q, backend=self.backend), l2norm(k, backend=self.backend), v.contiguous(), *gates

    def scan(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, cu_seqlens: Tensor) -> Tensor:
        """ONE chunked kernel call over all packed segments `[1, S, H, D]` -> o `[1, S, H, V]`.

        check_inputs=False: cu_seqlens is built on the device and correct by construction; checking it is a host sync.
        """
        extras = {"beta": beta} if beta is not None else {}
        if self.cp_group is not None:
            # cu_seqlens are piece-major (see `sequences`): the split scan's `local_cu_seqlens`
            fn = functools.partial(self.kernel("chunk"), scale=self.scale, backend=self.backend, check_inputs=False)
            return cp_scan(fn, q, k, v, cp_group=self.cp_group, layout="megatron", local_cu_seqlens=cu_seqlens, g=g,
                           **extras)[0]
        o, _ = self.kernel("chunk")(q, k, v, g=g, **extras, scale=self.scale, cu_seqlens=cu_seqlens,
                                    backend=self.backend, check_inputs=False)
        return o

    def finish_tokens(self, o: Tensor, gate: Tensor | None, T: int, B: int) -> tuple[Tensor, Tensor | None]:
        """Per-token memory mix `[N, H, V]` -> per-head gated RMSNorm -> o_proj -> (`[s, b, h]`, bias or None)."""
        return self.o_proj(self.o_norm(o, gate).reshape(T, B, -1))

    def sequences(self, T: int, B: int, packed_seq_params: PackedSeqParams | None, device: torch.device
                  ) -> tuple[Tensor, int, Tensor | None]:
        """(sequence id `[N]` of each token in [s, b] order, number of sequences, their lengths); packed THD
        batches count documents as sequences.

        Under context parallelism a sequence's local tokens lie in two pieces j (Megatron's zigzag split, per
        document for THD); the ids are then j * n + sequence over 2n "sequences" (lengths None), so the dispatch's
        segments come piece-major, (piece, sequence, memory): exactly `cp_scan`'s `local_cu_seqlens`.
        """
        cu = packed_cu_seqlens(packed_seq_params)
        if cu is None:
            seq = torch.arange(T * B, device=device) % B
            if self.cp_group is None:
                return seq, B, torch.full((B,), T, device=device)
            j = cp_token_piece(T, "megatron", device).repeat_interleave(B)
            return j * B + seq, 2 * B, None
        if B != 1:
            raise ValueError(f"packed (THD) input must have batch 1, got hidden_states with b={B}")
        cu = cu.to(device=device, dtype=torch.long)
        n = cu.numel() - 1
        if self.cp_group is not None:
            # local segments of the global (padded) offsets, document-major: segment 2 * document + piece
            local = cp_local_cu_seqlens(cu, T, self.cp_group, "thd")
            seg = torch.searchsorted(local[1:], torch.arange(T, device=device), right=True).clamp(max=2 * n - 1)
            return (seg % 2) * n + seg // 2, 2 * n, None
        seq = torch.searchsorted(cu[1:], torch.arange(T, device=device), right=True).clamp(max=n - 1)
        return seq, n, cu[1:] - cu[:-1]

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, inference_context=None,
                packed_seq_params: PackedSeqParams | None = None, **_) -> tuple[Tensor, Tensor | None]:
        """hidden_states `[s, b, h]` (s local under SP) -> (out `[s, b, h]`, None); documents of a THD batch never mix."""
        if inference_context is not None:
            if packed_cu_seqlens(packed_seq_params) is not None:
                raise ValueError("mixer 'mom': decoding takes [s, b] batches, not packed (THD) input")
            return self.decode(hidden_states, inference_context)
        mc, M = self.mixer_config, self.num_memories
        # On one TP rank the router rides on the dense projection GEMM (its gradient too, see project_dispatch): the
        # logits that route are computed without gradient, and the projection returns them with it.
        fused_router = self.tp_size == 1
        if fused_router:
            with torch.no_grad():
                logits = self.router_logits(hidden_states)
        else:
            logits_local = self.router_logits(hidden_states)
            if self.config.sequence_parallel:
                logits = tensor_parallel.gather_from_sequence_parallel_region(logits_local, True, group=self.tp_group)
            else:
                # the heads of every TP rank use these logits: their gradient must be summed over ranks
                logits = tensor_parallel.copy_to_tensor_model_parallel_region(logits_local, group=self.tp_group)
        T, B = logits.shape[:2]
        N = T * B
        seq_id, num_seqs, seq_lens = self.sequences(T, B, packed_seq_params, logits.device)
        with torch.no_grad():
            memories = routing.route(logits.reshape(N, M), self.topk)[2]
        capacity = None
        if mc.capacity_factor is not None:
            capacity = routing.capacity_per_sequence(seq_lens, mc.capacity_factor, self.topk, M)
        d = routing.build_dispatch(memories, seq_id, num_seqs, M, self.shared, capacity)

        p = self.project_dispatch(hidden_states, d.slot_of, d.memories, logits.reshape(N, M) if fused_router else None)
        if fused_router:
            logits = logits_local = p.logits.view(T, B, M)
        probs, weights = routing.route_given(logits.reshape(N, M), memories)
        if d.keep is not None:
            weights = routing.renormalise_kept(weights, d.keep)
        qk, kk, vk, g, beta = self.memory_inputs(p.q, p.k, p.v, p.a, p.beta, d.cu_seqlens)
        gate = p.gate
        # [S, H, V]; a view, so its backward passes the gradient on as it is (o[0]'s fills a zero tensor and copies)
        o = self.scan(qk, kk, vk, g, beta, d.cu_seqlens).squeeze(0)
        if self.shared:
            weights = torch.cat([weights, weights.new_ones(N, 1)], dim=1)
        out, bias = self.finish_tokens(routing.combine(o, weights, d, self.backend), gate, T, B)

        if self.training and torch.is_grad_enabled():
            out = self._attach_router_losses(out, logits_local, d.load, N)
        if telemetry is not None:
            self._telemetry(probs, d)
        return out, bias

    def state_specs(self, dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Per-sequence decoding state of every memory (shared last): conv `[M_tot, C, W-1]`, recurrent
        `[M_tot, H, K, V]` fp32."""
        H, K, V = self.local_heads, self.head_k_dim, self.head_v_dim
        W1 = self.conv.kernel_size - 1 if self.conv is not None else 0
        return [((self.total_memories, H * (2 * K + V), W1), dtype), ((self.total_memories, H, K, V), torch.float32)]

    def decode(self, hidden_states: Tensor, inference_context) -> tuple[Tensor, Tensor | None]:
        """Cached forward of `[s, b, h]` tokens (modules/inference.py: state layout, pad mask).

        Several tokens (a prefill, or a continuation) run the training dispatch with each (sequence, memory)
        segment's conv and recurrent state as initial state, and store the final ones. One token after a prefill
        gathers the states of its top-k memories and the shared one, takes one fused recurrent step over those
        b * k' rows and scatters them back: other memories' states are not touched. No host sync, no Python loop.
        The capacity limit (a training option) is not applied when decoding.
        """
        M, Mt = self.num_memories, self.total_memories
        H, K, V = self.local_heads, self.head_k_dim, self.head_v_dim
        hidden_states, pad, (conv_state, state), fresh = self.decode_inputs(hidden_states, inference_context)
        T, B, _ = hidden_states.shape
        conv_rows, state_rows = conv_state.reshape(B * Mt, *conv_state.shape[2:]), state.reshape(B * Mt, H, K, V)
        logits = self.router_logits(hidden_states)
        N = T * B
        dev = hidden_states.device
        _, weights, memories = routing.route(logits.reshape(N, M), self.topk)
        if self.shared:
            weights = torch.cat([weights, weights.new_ones(N, 1)], dim=1)
        if T == 1 and not fresh:
            # rows b * M_tot + memory of the routed memories and the shared one; distinct per token
            mems = torch.cat([memories, memories.new_full((B, 1), M)], 1) if self.shared else memories
            kp = mems.shape[1]
            tok = torch.arange(B, device=dev).repeat_interleave(kp)
            rows = tok * Mt + mems.reshape(-1)
            cs = conv_rows.index_select(0, rows)
            # slots in token order: slot b * k' + j is token b's j-th memory
            gate, *slots, _ = self.project_dispatch(hidden_states, torch.arange(B * kp, device=dev).view(B, kp), mems)
            qk, kk, vk, g, beta = self.memory_inputs(*slots, None, conv_state=cs if self.conv is not None else None,
                                                     fresh=False)
            if self.conv is not None:
                conv_rows.index_copy_(0, rows, cs)
            extras = {"g": g, "beta": beta} if beta is not None else {"g": g}
            if pad is not None:
                kk, extras = inference.mask_pads(pad.reshape(1, B)[:, tok], kk, extras)
            # one step of each of the b * k' rows: [b * k', 1, H, D]
            extras = {n: x.transpose(0, 1) for n, x in extras.items()}
            o, new = self.kernel("fused_recurrent")(
                qk.transpose(0, 1), kk.transpose(0, 1), vk.transpose(0, 1), **extras,
                scale=self.scale, initial_state=state_rows.index_select(0, rows), output_final_state=True,
                backend=self.backend, check_inputs=False)
            state_rows.index_copy_(0, rows, new)
            o = torch.bmm(weights.to(o.dtype).unsqueeze(1), o.reshape(B, kp, H * V)).view(B, H, V)
        else:
            seq_id = torch.arange(N, device=dev) % B
            d = routing.build_dispatch(memories, seq_id, B, M, self.shared)
            gate, *slots, _ = self.project_dispatch(hidden_states, d.slot_of, d.memories)
            qk, kk, vk, g, beta = self.memory_inputs(*slots, d.cu_seqlens, conv_state=conv_rows if self.conv is not None
                                                     else None, fresh=fresh)
            extras = {"beta": beta} if beta is not None else {}
            if pad is not None:
                kk, extras = inference.mask_pads(pad.t().reshape(1, N)[:, d.src_tok], kk, {"g": g, **extras})
                g = extras.pop("g")
            # segments are (sequence, memory) in order: row b * M_tot + m of the states
            o, new = self.kernel("chunk")(
                qk, kk, vk, g=g, **extras, scale=self.scale, cu_seqlens=d.cu_seqlens,
                initial_state=None if fresh else state_rows, output_final_state=True, backend=self.backend,
                check_inputs=False)
            state_rows.copy_(new)
            o = routing.combine(o[0], weights, d, self.backend)
        return self.finish_tokens(o, gate, T, B)

    def _attach_router_losses(self, out: Tensor, logits_local: Tensor, load: Tensor, num_tokens: int) -> Tensor:
        """Balance (and z-) losses from the rank-local logits, so their gradient is counted once across TP ranks."""
        mc, M = self.mixer_config, self.num_memories
        logits_local = logits_local.reshape(-1, M)
        sp = self.config.sequence_parallel
        num_layers = self.config.num_layers
        cp, track = self.cp_group, {}
        if cp is not None:
            # The micro-batch's sequences are spread over the CP ranks: loads are summed over them and each rank's
            # loss is its tokens' share, so the shares sum to the full-sequence loss (Megatron's MoE router does the
            # same; the schedule scales the aux-loss gradient by the CP size, DDP then averages over CP).
            num_tokens = num_tokens * dist.get_world_size(cp)
            track = {"reduce_group": cp}
        if mc.aux_loss_coeff > 0:
            probs_sum = logits_local.softmax(-1).sum(0)
            if sp:
                probs_sum = tensor_parallel.reduce_from_tensor_model_parallel_region(probs_sum, group=self.tp_group)
            if mc.aux_loss_type == "global" and dist.is_initialized():
                group = get_data_parallel_group(with_context_parallel=True)
                if dist.get_world_size(group) > 1:
                    load = load.clone()
                    dist.all_reduce(load, group=group)
            elif cp is not None:
                load = load.clone()
                dist.all_reduce(load, group=cp)
            balance = routing.load_balancing_loss(probs_sum, num_tokens, load)
            out = MoEAuxLossAutoScaler.apply(out, mc.aux_loss_coeff * balance)
            if self.layer_number is not None:
                save_to_aux_losses_tracker("mom_load_balancing_loss", balance.detach(), self.layer_number, num_layers,
                                           **track)
        if mc.z_loss_coeff > 0:
            z = logits_local.logsumexp(-1).pow(2).sum()
            if sp:
                z = tensor_parallel.reduce_from_tensor_model_parallel_region(z, group=self.tp_group)
            z = z / num_tokens
            out = MoEAuxLossAutoScaler.apply(out, mc.z_loss_coeff * z)
            if self.layer_number is not None:
                save_to_aux_losses_tracker("mom_z_loss", z.detach(), self.layer_number, num_layers, **track)
        return out

    @torch.no_grad()
    def _telemetry(self, probs: Tensor, d: routing.Dispatch) -> None:
        """Load fraction per memory, router entropy and dropped fraction; tensors stay on the device."""
        frac = d.load / d.load.sum().clamp(min=1)
        for i in range(self.num_memories):
            telemetry.record(f"mom/load_{i}", self.layer_number, frac[i])
        telemetry.record("mom/router_entropy", self.layer_number, routing.router_entropy(probs))
        if d.keep is not None:
            telemetry.record("mom/dropped_fraction", self.layer_number, 1 - d.keep.float().mean())
