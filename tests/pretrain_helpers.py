"""Shared by tests/training and tests/parallel: run the real pretrain loop on a small config, in this process or in
spawned gloo processes (torchrun's environment variables, set by hand)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from linear_moe.cli import DEMO_CONFIG
from linear_moe.config import load_config
from linear_moe.registry import registered

# Small enough for 2 CPU cores; two layers per pipeline stage.
SMALL = ["model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "model.moe.num_experts=4", "model.moe.ffn_hidden_size=64", "train.seq_length=32",
         "train.micro_batch_size=2", "train.global_batch_size=8", "train.log_interval=1", "train.eval_interval=0",
         "logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "optim.warmup_steps=1",
         "checkpoint.save=null"]


def hybrid_pattern(moe: bool = True) -> str:
    """Attention + MoE next to the mixer under test: MoM once registered, else a linear mixer, else attention."""
    mixers = registered()
    m = next((mixers[n].mixer_symbol for n in ("mom", "gla") if n in mixers), "*")
    return f"{m}- *E {m}- *E" if moe else f"{m}- *- {m}- *-"


def linear_pattern() -> str:
    """MoM, GLA and gated DeltaNet with dense and MoE FFNs and no softmax attention: Megatron's local attention has no
    context parallelism (with Transformer Engine on a GPU attention uses Megatron's own CP)."""
    return "X- GE X- DE"


def demo_config_path() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / DEMO_CONFIG


def config(overrides: list[str]):
    """The demo config, made small, with the hybrid test pattern (later overrides win)."""
    return load_config(demo_config_path(), [*SMALL, f"model.layer_pattern={hybrid_pattern()}", *overrides])


def run_local(overrides: list[str]):
    """One process, world size 1."""
    from linear_moe.training import pretrain

    return pretrain(config(overrides))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    # Two processes on two cores: one thread each keeps them from fighting.
    torch.set_num_threads(1)
    result = run_local(overrides)
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": result.losses, "evals": result.evals}))


def run_distributed(world: int, overrides: list[str], tmp_path: Path) -> dict[int, float]:
    """`world` gloo processes; returns rank 0's train loss per step."""
    out = tmp_path / f"result_{_free_port()}.json"
    mp.start_processes(_worker, args=(world, _free_port(), overrides, str(out)), nprocs=world, join=True,
                       start_method="spawn")
    return {int(k): v for k, v in json.loads(out.read_text())["losses"].items()}
