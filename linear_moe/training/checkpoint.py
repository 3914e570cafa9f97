"""Atomic Megatron dist_checkpointing save and resume.

Layout: `<dir>/iter_0000010/` (a dist_checkpointing directory) and `<dir>/latest` (text: the iteration). A save goes
to `iter_XXXXXXX.tmp`, is renamed by rank 0 after every rank finished, and `latest` is replaced last, so a crash
never leaves `latest` pointing at a partial checkpoint. Model and optimizer are stored as sharded tensors keyed by
global layer number, so a checkpoint loads into another TP/PP layout; the RNG state is restored only when the
parallel layout is the same.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from linear_moe.config import ConfigError, to_dict

LATEST = "latest"


def iter_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def find_latest(root: str | Path) -> Path:
    """The checkpoint directory `latest` points at; ConfigError naming checkpoint.load if there is none."""
    root = Path(root)
    hint = "point checkpoint.load at a directory written by checkpoint.save, or set checkpoint.load=null"
    if not root.is_dir():
        raise ConfigError(f"checkpoint.load={str(root)!r}: directory not found; {hint}")
    latest = root / LATEST
    if not latest.is_file():
        raise ConfigError(f"checkpoint.load={str(root)!r}: no {LATEST!r} file, so not a checkpoint directory; {hint}")
    text = latest.read_text().strip()
    try:
        step = int(text)
    except ValueError:
        raise ConfigError(f"checkpoint.load={str(root)!r}: {LATEST!r} holds {text!r}, not a step number") from None
    path = iter_dir(root, step)
    if not (path / "metadata.json").is_file():
        raise ConfigError(f"checkpoint.load={str(root)!r}: {LATEST!r} names step {step} but {path} is missing or "
                          "incomplete")
    return path


def _layout() -> dict:
    return {"world": dist.get_world_size(),
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size()}


def _rng_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": _tracker().get_states()}


def _tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def _sharded_state(model, optimizer, *, is_loading: bool, with_rng: bool, rng=None) -> dict:
    state = {}
    for i, chunk in enumerate(model):
        # The unwrapped GPTModel: keys without DDP's "module." prefix, as load_state_dict expects them.
        state["model" if len(model) == 1 else f"model{i}"] = chunk.module.sharded_state_dict()
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading)
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return state


def save(root: str | Path, step: int, *, model, optimizer, scheduler, cfg, consumed_samples: int) -> Path:
    """Save a checkpoint of step `step` atomically under `root` (all ranks call this)."""
    final = iter_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False, with_rng=True, rng=_rng_state())
    state.update(step=step, consumed_samples=consumed_samples, scheduler=scheduler.state_dict(),
                 config=to_dict(cfg), layout=_layout())
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = Path(root) / (LATEST + ".tmp")
        latest_tmp.write_text(f"{step}\n")
        os.replace(latest_tmp, Path(root) / LATEST)
    dist.barrier()
    return final


def load(root: str | Path, *, model, optimizer, scheduler) -> dict:
    """Load the latest checkpoint under `root` into model, optimizer and scheduler (all ranks call this).

    Returns {'step', 'consumed_samples', 'rng_restored'}.
    """
    path = find_latest(root)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_layout = common.get("layout") == _layout()
    template = _sharded_state(model, optimizer, is_loading=True, with_rng=same_layout)
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(state["model" if len(model) == 1 else f"model{i}"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        rng = state["rng_state"]
        random.setstate(rng["random"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        _tracker().set_states(rng["tracker"])
    return {"step": int(state["step"]), "consumed_samples": int(state["consumed_samples"]),
            "rng_restored": same_layout}


def saved_config(path: str | Path) -> dict:
    """The config tree (as a dict) saved with the checkpoint directory `path` (an `iter_*` directory)."""
    return dist_checkpointing.load_common_state_dict(str(path))["config"]


def load_model(path: str | Path, model) -> None:
    """Load only the model weights of checkpoint directory `path` (an `iter_*` directory) into an unwrapped
    GPTModel (generation, evaluation); any TP/PP layout of the saved run loads (the tensors are resharded)."""
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"])
