"""Synthetic multi-query associative recall (MQAR), as in the Zoology benchmark (Arora et al., 2023).

Token ids: 0 is reserved (pad/separator, never emitted), keys are 1..K, values K+1..K+V. One sample of length T is
the first T+1 tokens of a stream, split as `tokens = s[:T]`, `labels = s[1:]`:

    k1 v1 k2 v2 ... kN vN | noise ... kq vq noise ... kq' vq' noise ...
    `------ context -----' `------------------ queries ------------------'

Each context key is queried exactly once, at an even offset of the query region drawn from Zoology's power law
(p(gap) ~ a * gap^(a-1), so most queries come soon after the context); its value follows at the next position, so
`labels[t]` is the value wherever `tokens[t]` is a query and `loss_mask` is 1 exactly there. The other positions are
noise drawn from every key and value except this sample's keys, so a context key in the query region is always a
scored query (or 0 with `random_non_queries: false`).

A sample depends only on (seed, stream, index): its generator is a Philox counter-based generator keyed by a
SeedSequence of the three, so any data-parallel rank and any resume point rebuild it exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from linear_moe.config import MQARConfig


class MQARDataset:
    """Samples of length `seq_length` by global index; `stream` separates sample spaces (0 train, 1 valid)."""

    def __init__(self, cfg: MQARConfig, seq_length: int, seed: int, stream: int = 0) -> None:
        n, k, v = cfg.num_kv_pairs, cfg.num_keys, cfg.num_values
        if n < 1:
            raise ValueError(f"data.mqar.num_kv_pairs={n} must be >= 1")
        if n > k:
            raise ValueError(f"data.mqar.num_kv_pairs={n} must be <= data.mqar.num_keys={k}")
        if n > v:
            raise ValueError(f"data.mqar.num_kv_pairs={n} must be <= data.mqar.num_values={v} (values are distinct)")
        if (seq_length - 2 * n) // 2 < n:
            raise ValueError(
                f"train.seq_length={seq_length} is too short for data.mqar.num_kv_pairs={n}; need at least {4 * n}")
        if not 0 < cfg.power_a <= 1:
            raise ValueError(f"data.mqar.power_a={cfg.power_a} must be in (0, 1]")
        self.cfg, self.seq_length, self.seed, self.stream = cfg, seq_length, seed, stream
        space = (seq_length - 2 * n) // 2
        a = cfg.power_a
        p = a * np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
        self._gap_p = p / p.sum()
        self._position_ids = torch.arange(seq_length, dtype=torch.int64)

    @property
    def vocab_size(self) -> int:
        """Ids used: 0 (reserved), keys and values."""
        return 1 + self.cfg.num_keys + self.cfg.num_values

    def _rng(self, index: int) -> np.random.Generator:
        key = np.random.SeedSequence([self.seed & (2**64 - 1), self.stream, index])
        return np.random.Generator(np.random.Philox(key))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            raise IndexError(f"MQAR sample index {index} must be >= 0")
        n, k, v, t = self.cfg.num_kv_pairs, self.cfg.num_keys, self.cfg.num_values, self.seq_length
        rng = self._rng(index)
        keys = rng.choice(k, size=n, replace=False) + 1
        values = rng.choice(v, size=n, replace=False) + 1 + k
        gaps = rng.choice(len(self._gap_p), size=n, replace=False, p=self._gap_p)

        s = np.zeros(t + 1, dtype=np.int64)
        s[0:2 * n:2] = keys
        s[1:2 * n:2] = values
        queries = 2 * n + 2 * gaps
        s[queries] = keys
        s[queries + 1] = values
        free = np.ones(t + 1, dtype=bool)
        free[:2 * n] = False
        free[queries] = False
        free[queries + 1] = False
        if self.cfg.random_non_queries:
            noise_pool = np.setdiff1d(np.arange(1, 1 + k + v), keys, assume_unique=True)
            s[free] = noise_pool[rng.integers(len(noise_pool), size=int(free.sum()))]

        s = torch.from_numpy(s)
        loss_mask = torch.zeros(t, dtype=torch.float32)
        loss_mask[torch.from_numpy(queries)] = 1.0
        return {"tokens": s[:t].clone(), "labels": s[1:].clone(), "loss_mask": loss_mask,
                "position_ids": self._position_ids.clone()}


def mqar_accuracy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Fraction of masked positions where argmax(logits) == label, as a 0-dim float tensor (no host sync).

    logits: [b, T, V]; batch: `labels` [b, T], `loss_mask` [b, T]. A batch without masked positions gives 0.
    """
    mask = batch["loss_mask"] > 0
    correct = ((logits.argmax(dim=-1) == batch["labels"]) & mask).sum()
    return correct.float() / mask.sum().clamp(min=1).float()
