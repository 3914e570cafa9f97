"""Training data: the interface the pretrain loop uses.

`build_data_iterators` gives each data-parallel rank its slice of every global batch with the semantics of
Megatron's MegatronPretrainingSampler: micro batch j (counted over the whole run) covers the global samples
`consumed_samples + j * mbs * dp_size + dp_rank * mbs + i`, i < mbs. A sample depends only on its global index, so any
rank layout and any resume point reproduce the uninterrupted stream.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from linear_moe.config import Config
from linear_moe.data.mqar import MQARDataset, mqar_accuracy

__all__ = ["build_data_iterators", "evaluate_batch", "mqar_accuracy", "vocab_size_needed"]

Batch = dict[str, torch.Tensor]

# Stream ids of the MQAR sample spaces.
MQAR_TRAIN, MQAR_VALID = 0, 1


class _Samples(Protocol):
    def __getitem__(self, index: int) -> Batch: ...


def _micro_batches(samples: _Samples, *, start: int, mbs: int, dp_rank: int, dp_size: int) -> Iterator[Batch]:
    """Infinite micro batches of this rank, stacked from samples by global index (MegatronPretrainingSampler)."""
    stride = mbs * dp_size
    base = start + dp_rank * mbs
    while True:
        items = [samples[base + i] for i in range(mbs)]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}
        base += stride


def _no_validation(cfg: Config) -> Iterator[Batch]:
    """Stands in for the valid iterator when evaluation is off and the valid split is empty; fails if drawn from."""
    raise RuntimeError(f"data.split={cfg.data.split!r} leaves no validation documents in {cfg.data.path!r}; "
                       "raise the valid weight to evaluate")
    yield


def build_data_iterators(cfg: Config, *, dp_rank: int, dp_size: int,
                         consumed_samples: int = 0) -> tuple[Iterator[Batch], Iterator[Batch]]:
    """(train, valid) infinite iterators of this rank's micro batches: `tokens`, `labels`, `position_ids` int64 and
    `loss_mask` float32, each [train.micro_batch_size, train.seq_length], on the CPU.

    train starts at global sample `consumed_samples`; valid always starts at 0 of its own sample space (the MQAR
    validation stream, or the indexed dataset's valid split). With torch.distributed initialised, every rank must
    call this (Megatron's dataset builder synchronises ranks for kind 'indexed').
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
    t = cfg.train
    if cfg.data.kind == "mqar":
        train = MQARDataset(cfg.data.mqar, t.seq_length, t.seed, MQAR_TRAIN)
        valid = MQARDataset(cfg.data.mqar, t.seq_length, t.seed, MQAR_VALID)
    elif cfg.data.kind == "indexed":
        from linear_moe.data.indexed import build_indexed_datasets

        train, valid = build_indexed_datasets(cfg, dp_size=dp_size)
    else:
        raise ValueError(f"data.kind={cfg.data.kind!r} must be 'mqar' or 'indexed'")
    kw = {"mbs": t.micro_batch_size, "dp_rank": dp_rank, "dp_size": dp_size}
    train_iter = _micro_batches(train, start=consumed_samples, **kw)
    valid_iter = _micro_batches(valid, start=0, **kw) if valid is not None else _no_validation(cfg)
    return train_iter, valid_iter


def evaluate_batch(cfg: Config, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """Task metrics of one eval micro batch as 0-dim tensors on the logits' device (no host sync).

    logits: [b, T, V] full-vocabulary logits. MQAR: {"mqar_accuracy"}; indexed: {} (the loop reports eval loss).
    """
    if cfg.data.kind == "mqar":
        return {"mqar_accuracy": mqar_accuracy(logits, batch)}
    return {}


def vocab_size_needed(cfg: Config) -> int:
    """The smallest model.vocab_size that holds every id the data can produce."""
    if cfg.data.kind == "mqar":
        q = cfg.data.mqar
        return 1 + q.num_keys + q.num_values
    from linear_moe.data.tokenizer import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer).vocab_size
