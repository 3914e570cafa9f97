"""Decoding state of the recurrent mixers, kept in Megatron's static inference context.

Each recurrent layer keeps its state in `inference_context.key_value_memory_dict[layer_number]`, where Megatron's own
Mamba layers keep theirs, so the softmax-attention layers of a hybrid model use Megatron's KV cache in the same
context. Entries are allocated for `max_batch_size` rows; a forward uses rows `batch_size_offset : + b`.

- linear mixers: (conv state `[max_batch, C_local, W-1]` in the activation dtype, recurrent state
  `[max_batch, H_local, K, V]` fp32); no conv: the conv entry has W-1 = 0 columns.
- MoM: (conv states `[max_batch, M_tot, C_local, W-1]`, recurrent states `[max_batch, M_tot, H_local, K, V]` fp32),
  M_tot = num_memories (+1 shared, last); a decoded token reads and writes only its top-k rows and the shared one.

A forward with `inference_context.sequence_len_offset == 0` is a prefill from the zero state (the chunked kernels,
which return the final state); a later forward continues from the stored state: one token is a fused recurrent step
plus `ShortConvolution.step`, several tokens are a chunked continuation. The caller advances `sequence_len_offset`.

Left padding. A batch of prompts of different lengths is left-padded; the caller sets
`inference_context.pad_mask` to a `[b, s]` bool tensor, True at the pad positions of the tokens of this forward
(None or unset: no padding; decode steps have none). Recurrent layers make pad tokens no-ops: their input is zeroed
(so the conv sees zeros, as before a sequence start) and their k, log-decay and beta are forced to 0, so the state
after the pads is the zero initial state exactly. Attention layers need the matching mask of pad keys in
`attention_mask` (see `linear_moe.generation.attention_mask`).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

PAD_MASK_ATTR = "pad_mask"
"""Name of the inference-context attribute holding the `[b, s]` pad mask of the current forward."""


def pad_mask(inference_context, batch: int, seq: int) -> Tensor | None:
    """The `[b, s]` bool pad mask of this forward (True at pads), or None when there is none."""
    mask = getattr(inference_context, PAD_MASK_ATTR, None)
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, seq) or mask.dtype != torch.bool:
        raise ValueError(f"inference_context.{PAD_MASK_ATTR} must be a bool tensor [b, s] = [{batch}, {seq}], got "
                         f"{mask.dtype} {list(mask.shape)}")
    return mask


def layer_state(inference_context, layer_number: int, batch: int, specs: list[tuple[tuple[int, ...], torch.dtype]],
                device: torch.device) -> tuple[list[Tensor], bool]:
    """This layer's state tensors for the rows of this forward, and whether this forward starts from zero.

    specs: one (per-row shape, dtype) per tensor; entries are allocated (zeros) on first use for
    `max_batch_size` rows and reused afterwards. The returned tensors are views: writing them updates the context.
    """
    store = inference_context.key_value_memory_dict
    rows = inference_context.max_batch_size
    entry = store.get(layer_number)
    if entry is None or any(t.shape[1:] != torch.Size(s) or t.dtype != d for t, (s, d) in zip(entry, specs)):
        entry = tuple(torch.zeros(rows, *s, dtype=d, device=device) for s, d in specs)
        store[layer_number] = entry
    start = inference_context.batch_size_offset
    if start + batch > rows:
        raise ValueError(f"batch rows {start}..{start + batch} exceed the inference context's max_batch_size={rows}")
    return [t[start:start + batch] for t in entry], inference_context.sequence_len_offset == 0


def mask_pads(pad: Tensor, k: Tensor, extras: dict) -> tuple[Tensor, dict]:
    """Force k and the per-step gates (log decay g, beta) to 0 at pad positions: `[B, T, ...]` tensors."""
    def zero(x: Tensor) -> Tensor:
        return x.masked_fill(pad.view(*pad.shape, *([1] * (x.dim() - 2))), 0)

    return zero(k), {n: zero(x) if n in ("g", "beta") and isinstance(x, Tensor) else x for n, x in extras.items()}
