"""CPU mode: run stock Megatron-Core training (TP, SP, PP, VPP, DP, MoE) on CPU with gloo, for development and CI.

Megatron-Core assumes CUDA in a handful of places: `torch.cuda.current_device()` as a device, `torch.cuda.Stream()`
and `current_stream()` for overlap, the CUDA RNG in its RNG tracker, literal `device="cuda"` tensors in the
schedules and optimizers, and the causal mask. `enable_cpu_mode()` redirects exactly those, and only inside the
Megatron modules that make them: each listed module sees a `torch` whose `cuda` namespace and tensor factories map
CUDA to CPU; the rest of the process (and every other library) sees the real torch. Nothing in site-packages is
edited. It is a no-op when CUDA is available.
"""
from __future__ import annotations

import importlib
import logging
import types

import torch

log = logging.getLogger(__name__)

_ENABLED = False

# Megatron modules that use CUDA-only calls, each with the reason it is listed.
_MODULES = {
    # grad/param buffers are allocated on torch.cuda.current_device()
    "megatron.core.distributed.param_and_grad_buffer": "buffers on current_device(), current_stream() waits",
    "megatron.core.distributed.distributed_data_parallel": "communication Stream(), synchronize()",
    "megatron.core.distributed.finalize_model_grads": "reduction buffers on current_device()",
    # total_num_tokens = torch.zeros(..., device="cuda") in every schedule
    "megatron.core.pipeline_parallel.schedules": "literal device='cuda' token counter",
    "megatron.core.pipeline_parallel.p2p_communication": "shape tensors on current_device(), synchronize()",
    # found_inf / _scale tensors with device='cuda' (FP32Optimizer, MixedPrecisionOptimizer)
    "megatron.core.optimizer.optimizer": "literal device='cuda' scale and flag tensors",
    # grad-norm and clipping buffers with device='cuda' (the math itself falls back to Megatron's torch versions)
    "megatron.core.optimizer.clip_grads": "literal device='cuda' norm buffers",
    # the RNG tracker reads and seeds the CUDA generator; on CPU it keeps CPU generator states instead
    "megatron.core.tensor_parallel.random": "torch.cuda RNG state in the RNG tracker",
    # get_default_causal_mask builds the mask with device='cuda'
    "megatron.core.transformer.utils": "literal device='cuda' causal mask",
    "megatron.core.transformer.moe.router": "router buffers on current_device()",
    # MoEAlltoAllTokenDispatcher creates torch.cuda.Stream() at init
    "megatron.core.transformer.moe.token_dispatcher": "dtoh Stream() and current_stream()",
    "megatron.core.transformer.moe.moe_utils": "record_stream(current_stream())",
    "megatron.core.transformer.moe.moe_layer": "current_stream() waits",
    "megatron.core.transformer.moe.moe_logging": "tracker tensors on current_device()",
    "megatron.core.transformer.moe.experts": "expert buffers on current_device()",
    "megatron.core.models.gpt.gpt_model": "tensors on current_device()",
    # checkpoint writer staging: tensor.to("cpu", non_blocking=True) then torch.cuda.synchronize()
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize() after staging",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "failure flag on current_device()",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness flags on current_device(), synchronize()",
    # TP/SP collectives allocate their gather/scatter outputs on current_device()
    "megatron.core.tensor_parallel.mappings": "collective output buffers on current_device()",
    "megatron.core.tensor_parallel.layers": "SP all-gather buffers for the weight-gradient matmul",
    "megatron.core.tensor_parallel.utils": "split/gather buffers on current_device()",
    # the shared expert's overlap uses its own Stream()
    "megatron.core.transformer.moe.shared_experts": "Stream() and current_stream() waits",
    # GlobalMemoryBuffer (attention's matmul buffer) allocates on current_device()
    "megatron.core.utils": "GlobalMemoryBuffer on current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq on current_device()",
    # the static inference KV cache is allocated on current_device()
    "megatron.core.transformer.attention": "inference KV cache on current_device()",
}


def _cpu_device(device):
    """Map a CUDA device spec (str, int, torch.device) to CPU; leave anything else as it is."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _Stream:
    """A no-op stand-in for torch.cuda.Stream / Event: CPU work is synchronous, so waits and records do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _Stream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _Stream)

    def __hash__(self):
        return 0


def _cuda_namespace() -> types.ModuleType:
    """torch.cuda as the listed Megatron modules see it in CPU mode; unknown attributes fall through to torch.cuda."""
    ns = _FallThrough("torch.cuda", torch.cuda)
    ns.current_device = lambda: torch.device("cpu")
    ns.current_stream = lambda *a, **k: _Stream()
    ns.default_stream = lambda *a, **k: _Stream()
    ns.Stream = _Stream
    ns.Event = _Stream
    ns.stream = lambda *a, **k: _Stream()
    ns.synchronize = lambda *a, **k: None
    ns.is_current_stream_capturing = lambda: False
    # The RNG tracker keeps one generator state per name; on CPU those are states of the CPU generator.
    ns.get_rng_state = lambda *a, **k: torch.get_rng_state()
    ns.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    ns.manual_seed = lambda seed: torch.manual_seed(seed)
    ns.random = _FallThrough("torch.cuda.random", torch.cuda.random)
    ns.random.get_rng_state = ns.get_rng_state
    return ns


class _FallThrough(types.ModuleType):
    """A module namespace whose overrides win and whose other attributes come from `base`."""

    def __init__(self, name: str, base):
        super().__init__(name)
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)


def _factory(fn):
    def wrapped(*args, device=None, **kwargs):
        return fn(*args, device=_cpu_device(device), **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


def _uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
    """all_gather into pieces of different lengths along dim 0 (Megatron's SP gather of the MoE dispatcher's
    per-rank tokens), which gloo refuses: gather zero-padded pieces of the longest length, then trim."""
    lens = [t.shape[0] for t in tensor_list]
    if len(set(lens)) == 1:
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    padded = tensor.new_zeros(max(lens), *tensor.shape[1:])
    padded[:tensor.shape[0]] = tensor
    bufs = [torch.empty_like(padded) for _ in lens]
    torch.distributed.all_gather(bufs, padded, group=group)
    for out, buf, n in zip(tensor_list, bufs, lens, strict=True):
        out.copy_(buf[:n])
    return _Done() if async_op else None


def _uneven_reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
    """reduce_scatter of pieces of different lengths (the backward of the gather above), which gloo refuses: sum the
    zero-padded pieces over the group, keep this rank's."""
    lens = [t.shape[0] for t in input_list]
    rank = torch.distributed.get_rank(group)
    if len(set(lens)) == 1:
        return torch.distributed.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
    stacked = input_list[0].new_zeros(len(lens), max(lens), *output.shape[1:])
    for i, t in enumerate(input_list):
        stacked[i, :lens[i]] = t
    torch.distributed.all_reduce(stacked, op=op, group=group)
    output.copy_(stacked[rank, :lens[rank]])
    return _Done() if async_op else None


class _Done:
    """The handle of a collective that has already completed."""

    def wait(self):
        return True


def _torch_namespace() -> types.ModuleType:
    """`torch` for the listed Megatron modules: CUDA device specs in tensor factories become CPU, and the collectives
    gloo cannot do on uneven pieces are done on padded ones."""
    ns = _FallThrough("torch", torch)
    ns.cuda = _cuda_namespace()
    ns.distributed = _FallThrough("torch.distributed", torch.distributed)
    ns.distributed.all_gather = _uneven_all_gather
    ns.distributed.reduce_scatter = _uneven_reduce_scatter
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like"):
        setattr(ns, name, _factory(getattr(torch, name)))
    return ns


def _patch_rng_tracker(random_mod) -> None:
    """The tracker's private get/set helpers index torch.cuda.default_generators; on CPU use the CPU generator."""
    random_mod._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _patch_torch_norm() -> None:
    """WrappedTorchNorm asserts `not sequence_parallel`; torch's norms are fine with SP once their params carry the
    `sequence_parallel` flag, which makes finalize_model_grads all-reduce their grads over the TP group."""
    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__
    if getattr(original, "_linear_moe_cpu", False):
        return

    class _NoSP:
        def __init__(self, config):
            self._config = config

        sequence_parallel = False

        def __getattr__(self, name):
            return getattr(self._config, name)

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        norm = original(cls, _NoSP(config), hidden_size, eps, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm

    __new__._linear_moe_cpu = True
    torch_norm.WrappedTorchNorm.__new__ = __new__


def _patch_tied_embedding_setup() -> None:
    """With PP and tied embeddings, LanguageModule moves the shared weight with `weight.data.cuda()` before its
    first/last-stage all-reduce; during that one call `Tensor.cuda` leaves the tensor where it is."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_linear_moe_cpu", False):
        return

    def setup_embeddings_and_output_layer(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = cuda

    setup_embeddings_and_output_layer._linear_moe_cpu = True
    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _patch_rope_cp_index() -> None:
    """Under CP, `get_pos_emb_on_this_cp_rank` builds its chunk index with `pin_memory=True` and `.cuda()`; the rotary
    embedding modules that import it get the same function with the index on the embedding's device."""
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    original = rope_utils.get_pos_emb_on_this_cp_rank
    if getattr(original, "_linear_moe_cpu", False):
        return

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        cp_size, cp_rank = cp_group.size(), cp_group.rank()
        idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
        pos_emb = pos_emb.index_select(seq_dim, idx)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])

    get_pos_emb_on_this_cp_rank._linear_moe_cpu = True
    for mod in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        mod.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def _patch_alltoall_splits() -> None:
    """The all-to-all MoE dispatcher turns its split sizes into numpy arrays with `maybe_move_tensor_to_cpu`, which
    converts only CUDA tensors; on CPU they stay tensors, which `all_to_all_single` rejects. Convert them here too."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_linear_moe_cpu", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._linear_moe_cpu = True
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def is_cpu_mode() -> bool:
    return _ENABLED


def enable_cpu_mode() -> bool:
    """Redirect Megatron-Core's CUDA-only calls to CPU. Idempotent; does nothing (returns False) when CUDA exists."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    ns = _torch_namespace()
    for name in _MODULES:
        mod = importlib.import_module(name)
        mod.torch = ns
    _patch_rng_tracker(importlib.import_module("megatron.core.tensor_parallel.random"))
    _patch_torch_norm()
    _patch_tied_embedding_setup()
    _patch_rope_cp_index()
    _patch_alltoall_splits()
    # Decays multiply into fp32 subnormals deep inside a chunk; on x86 CPUs each subnormal operation is ~100x slower,
    # which stalls training steps for seconds. GPUs flush them already.
    torch.set_flush_denormal(True)
    _ENABLED = True
    log.debug("CPU mode: redirected CUDA calls in %d Megatron modules", len(_MODULES))
    return True
