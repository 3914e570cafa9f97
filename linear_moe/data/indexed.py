"""Megatron indexed datasets (PREFIX.bin/.idx from `linear_moe.data.preprocess`) read through Megatron's own
GPTDataset, built by BlendedMegatronDatasetBuilder (rank 0 first, then the other ranks from its cache when
torch.distributed is initialised; directly when it is not).
"""
from __future__ import annotations

from pathlib import Path

import torch

from linear_moe.config import Config
from linear_moe.data.tokenizer import build_tokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _split_sizes(cfg: Config, dp_size: int, sequence_lengths) -> list[int | None]:
    """Samples to build per split: train covers the whole run, valid every planned evaluation.

    A split without tokens gets None (one empty epoch): Megatron would loop forever looking for tokens. Raises
    ValueError when train, or valid with evaluation on, has no tokens.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    t = cfg.train
    evals = t.steps // t.eval_interval + 1 if t.eval_interval > 0 else 1
    wanted = [t.steps * t.global_batch_size, evals * t.eval_steps * t.micro_batch_size * dp_size, None]
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.data.split))
    n = len(sequence_lengths)
    sizes: list[int | None] = []
    for i, name in enumerate(("train", "valid", "test")):
        # The same document ranges as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
        lo, hi = (round(x * n) for x in matrix[i]) if matrix[i] is not None else (0, 0)
        tokens = int(sequence_lengths[lo:hi].sum())
        needed = i == 0 or (i == 1 and t.eval_interval > 0)
        if tokens == 0 and needed:
            raise ValueError(
                f"data.split={cfg.data.split!r} gives the {name} split no tokens ({hi - lo} of the {n} documents in "
                f"{cfg.data.path!r}); raise its weight or use more documents")
        sizes.append(wanted[i] if tokens else None)
    return sizes


class IndexedSamples:
    """A GPTDataset split indexed by global sample number (wrapping past its end), yielding the batch keys."""

    def __init__(self, dataset) -> None:
        if len(dataset) == 0:
            raise ValueError(f"{dataset.index_split.name} split of {dataset.dataset_path!r} holds no full sequence")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index % len(self.dataset)]
        return {k: sample[k] for k in BATCH_KEYS}


def build_indexed_datasets(cfg: Config, *, dp_size: int) -> tuple[IndexedSamples, IndexedSamples | None]:
    """(train, valid) splits of cfg.data.path; valid is None when evaluation is off and the split is empty.

    Must be called on every rank when torch.distributed is initialised (the builder synchronises with barriers).
    Index caches go to `<logging.dir>/data_cache`.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = cfg.data.path
    if not prefix or not IndexedDataset.exists(prefix):
        raise FileNotFoundError(
            f"data.path={prefix!r}: no {prefix}.bin/.idx; build them with "
            "`python -m linear_moe.data.preprocess --input FILE --output-prefix PREFIX`")
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    # The lengths are a view of the index mmap, which closes when its IndexedDataset is collected: keep it alive.
    low_level = IndexedDataset(prefix)
    sizes = _split_sizes(cfg, dp_size, low_level.sequence_lengths)
    del low_level
    gpt_cfg = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=([prefix], None),
        split=cfg.data.split,
        path_to_cache=str(Path(cfg.logging.dir) / "data_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # The models build their own causal mask; a [1, T, T] mask per sample would be wasted work.
        create_attention_mask=False,
    )
    # Every rank reads its own micro batches, so every rank holds the datasets.
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, gpt_cfg).build()
    valid = IndexedSamples(valid) if valid is not None and len(valid) else None
    return IndexedSamples(train), valid
