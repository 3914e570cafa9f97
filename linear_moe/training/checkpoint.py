"""Atomic Megatron dist_checkpointing save and resume.

Layout: `<dir>/iter_0000010/` (a dist_checkpointing directory) and `<dir>/latest` (text: the iteration). A save goes
to `iter_XXXXXXX.tmp`, is renamed by rank 0 after every rank finished, and `latest` is replaced last, so a crash
never leaves `latest` pointing at a partial checkpoint. Model and optimizer are stored as sharded tensors keyed by
global layer number (experts by global expert number), so a checkpoint loads into another TP/PP/EP layout; the RNG
state is restored only when the parallel layout is the same.

Under EP > 1 Megatron splits the optimizer in two (dense and expert parameters), with one optimizer otherwise. Its
tensors are saved under the parameter names either way, so a checkpoint of one split loads into the other: the
tensors by name, the shared Adam step from the checkpoint, and the parameter groups of this run's optimizer (the
scheduler then restores their learning rate and weight decay).
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
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from linear_moe.config import ConfigError, to_dict

LATEST = "latest"
# Saved with every checkpoint and passed to the optimizer's sharded_state_dict: a split optimizer keys its state by
# parameter name like a single one (no 'chained_<i>.' prefix). Checkpoints without it are read as they were written.
METADATA = {"chained_optim_avoid_prefix": True}


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
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "ep": parallel_state.get_expert_model_parallel_world_size()}


def _rng_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": _tracker().get_states()}


def _tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def _sharded_state(model, optimizer, *, is_loading: bool, with_rng: bool, metadata: dict, rng=None,
                   optimizer_key: str = "optimizer") -> dict:
    state = {}
    for i, chunk in enumerate(model):
        # The unwrapped GPTModel: keys without DDP's "module." prefix, as load_state_dict expects them.
        state["model" if len(model) == 1 else f"model{i}"] = chunk.module.sharded_state_dict()
    state[optimizer_key] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
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
    state = _sharded_state(model, optimizer, is_loading=False, with_rng=True, metadata=METADATA, rng=_rng_state())
    state.update(step=step, consumed_samples=consumed_samples, scheduler=scheduler.state_dict(),
                 config=to_dict(cfg), layout=_layout())
    dist_checkpointing.save(state, str(tmp), content_metadata=METADATA)
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
    regroup = _optimizer_parts(common["optimizer"]) != len(optimizer.chained_optimizers)
    if regroup:
        step = _regrouping_step(root, optimizer, common)
        metadata = METADATA
        # The saved common state (parameter groups) does not fit this optimizer's: its tensors load under a key the
        # checkpoint does not hold, so that nothing of the saved structure merges into them.
        optimizer_key = "regrouped_optimizer"
    else:
        # Read as written: without content metadata, a split optimizer's keys start with 'chained_<i>.'.
        metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
        optimizer_key = "optimizer"
    template = _sharded_state(model, optimizer, is_loading=True, with_rng=same_layout, metadata=metadata,
                              optimizer_key=optimizer_key)
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(state["model" if len(model) == 1 else f"model{i}"])
    if regroup:
        regrouped = _filled(template[optimizer_key], state[optimizer_key])
        _set_common_step(regrouped, step)
        optimizer.load_state_dict(regrouped)
    else:
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


def _optimizer_parts(saved: dict) -> int:
    """How many optimizers a saved optimizer state holds: Megatron's chained optimizer keys them 0, 1, ... when it
    holds more than one."""
    return len(saved) if saved and all(isinstance(k, int) for k in saved) else 1


def _regrouping_step(root, optimizer, common: dict):
    """The shared Adam step of the checkpoint's optimizer, once its state is known to load into `optimizer`, which
    is split otherwise; ConfigError if it cannot."""
    saved = common["optimizer"]
    where = (f"checkpoint.load={str(root)!r}: its optimizer is split in {_optimizer_parts(saved)} (dense and expert "
             f"parameters apart, as under parallel.expert > 1), this run's in {len(optimizer.chained_optimizers)}")
    hint = "resume with the parallel.expert size it was saved with"
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    if _optimizer_parts(saved) > 1 and not metadata.get("chained_optim_avoid_prefix"):
        raise ConfigError(f"{where}, and it keys that state by part, not by parameter name; {hint}")
    if any(isinstance(o, DistributedOptimizer) for o in optimizer.chained_optimizers):
        raise ConfigError(f"{where}, which the distributed optimizer cannot regroup; {hint}")
    steps = list(_common_steps(saved))
    if not steps or any(not torch.equal(torch.as_tensor(s), torch.as_tensor(steps[0])) for s in steps):
        found = [torch.as_tensor(s).item() for s in steps]
        raise ConfigError(f"{where}, and its parts share no single Adam step (found {found}); {hint}")
    return steps[0]


def _filled(template, loaded):
    """`template` (a sharded state dict) with each sharded or non-persistent leaf replaced by its loaded value, found
    at the same place in `loaded` (which holds only those leaves); plain values are the template's own."""
    if isinstance(template, (ShardedBase, LocalNonpersistentObject)):
        return loaded
    if isinstance(template, dict):
        return {k: _filled(v, loaded[k]) if k in loaded else v for k, v in template.items()}
    if isinstance(template, list):
        return [_filled(v, w) for v, w in zip(template, loaded, strict=True)]
    return template


def _common_steps(tree):
    """Every value stored under Megatron's shared optimizer step key, 'common_step', in a nested state dict."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "common_step":
                yield v
            else:
                yield from _common_steps(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _common_steps(v)


def _set_common_step(tree, step) -> None:
    """Store `step` as the shared step of every torch optimizer state dict ('state' and 'param_groups') in `tree`."""
    if isinstance(tree, dict):
        if "state" in tree and "param_groups" in tree:
            tree["state"]["common_step"] = step
        for v in tree.values():
            _set_common_step(v, step)
    elif isinstance(tree, list):
        for v in tree:
            _set_common_step(v, step)


def saved_config(path: str | Path) -> dict:
    """The config tree (as a dict) saved with the checkpoint directory `path` (an `iter_*` directory)."""
    return dist_checkpointing.load_common_state_dict(str(path))["config"]


def load_model(path: str | Path, model) -> None:
    """Load only the model weights of checkpoint directory `path` (an `iter_*` directory) into an unwrapped
    GPTModel (generation, evaluation); any TP/PP/EP layout of the saved run loads (the tensors are resharded)."""
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"])
