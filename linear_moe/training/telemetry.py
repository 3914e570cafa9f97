"""Per-layer telemetry that mixers may record during forward, e.g. routing entropy or memory usage.

`record(name, layer_number, value)` only adds a detached tensor to a running sum: no host sync, no collective. The
training loop reduces the sums over ranks at log time (`collect()`), logs their means and writes them to tensorboard.
"""
from __future__ import annotations

import torch

# (name, layer_number) -> [running sum (tensor), count]
_SUMS: dict[tuple[str, int], list] = {}


def record(name: str, layer_number: int | None, value: torch.Tensor | float) -> None:
    """Add one observation of `name` for layer `layer_number` (1-based, global); a tensor is detached, not synced."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float()
        value = value.mean() if value.numel() != 1 else value.reshape(())
    else:
        value = torch.tensor(float(value))
    key = (name, int(layer_number or 0))
    slot = _SUMS.get(key)
    if slot is None:
        _SUMS[key] = [value.clone(), 1]
    else:
        slot[0] += value
        slot[1] += 1


def collect() -> dict[tuple[str, int], tuple[float, int]]:
    """This rank's sums since the last call, as floats (syncs here, at log time), and reset them."""
    out = {k: (float(s), n) for k, (s, n) in _SUMS.items()}
    _SUMS.clear()
    return out


def clear() -> None:
    _SUMS.clear()
