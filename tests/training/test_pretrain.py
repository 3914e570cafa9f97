"""The pretrain loop in one process: the demo config trains, a resumed run equals an uninterrupted one, outputs are
written, and the CLI rejects bad input with exit code 2 before writing anything."""
from __future__ import annotations

import json

import pytest
import torch
from pretrain_helpers import demo_config_path, run_local

from linear_moe.cli import pretrain_main
from linear_moe.config import load_config
from linear_moe.training import telemetry


def test_demo_config_loads_and_validates():
    cfg = load_config(demo_config_path())
    cfg.validate(world_size=1)
    assert cfg.data.kind == "mqar"


def test_demo_config_trains_with_decreasing_loss(tmp_path):
    run = tmp_path / "run"
    result = run_local(["train.steps=12", "train.eval_interval=12", "train.eval_steps=1", "train.log_interval=4",
                        "logging.tensorboard=true", "logging.plot=true", "optim.lr=0.003", f"logging.dir={run}"])
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert set(result.evals[12]) >= {"loss"} and len(result.evals[12]) >= 2, result.evals
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "lr", "tokens_per_s", "ms_per_step", "load_balancing_loss"} <= train[0].keys()
    assert (run / "loss.png").stat().st_size > 0
    assert any((run / "tensorboard").iterdir())


def test_resume_equals_uninterrupted_run(tmp_path):
    ck = tmp_path / "ck"
    common = ["train.steps=4", "train.eval_interval=4", "train.eval_steps=1", f"checkpoint.save={ck}",
              "checkpoint.interval=2"]
    full = run_local([*common, f"logging.dir={tmp_path / 'a'}"])
    assert (ck / "latest").read_text().strip() == "4" and not list(ck.glob("*.tmp"))
    # As if the run had stopped right after its step-2 checkpoint.
    (ck / "latest").write_text("2\n")
    resumed = run_local([*common, f"checkpoint.load={ck}", f"logging.dir={tmp_path / 'b'}"])
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=0)
    assert resumed.evals[4] == pytest.approx(full.evals[4], rel=1e-6)


@pytest.mark.parametrize("args, field", [
    (["train.stepz=3"], "train.stepz"),
    (["train.steps=abc"], "train.steps"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], "world size"),
    (["checkpoint.load=/nonexistent/ck"], "checkpoint.load"),
    (["/nonexistent/config.yaml"], "/nonexistent/config.yaml"),
], ids=["unknown-key", "bad-type", "bad-combination", "world-size", "bad-checkpoint", "missing-file"])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, field):
    run = tmp_path / "run"
    code = pretrain_main([*args, f"logging.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert field in err and err.count("\n") == 1, err
    assert not run.exists()


def test_cli_print_config(capsys):
    assert pretrain_main(["--print-config", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "layer_pattern:" in out


def test_telemetry_accumulates_without_sync_and_resets():
    telemetry.clear()
    telemetry.record("mom_memory_load", 1, torch.tensor([0.25, 0.75]))
    telemetry.record("mom_memory_load", 1, torch.tensor(1.0))
    telemetry.record("mom_memory_load", 3, 2.0)
    assert telemetry.collect() == {("mom_memory_load", 1): (1.5, 2), ("mom_memory_load", 3): (2.0, 1)}
    assert telemetry.collect() == {}


def test_diverged_run_stops_with_one_clear_error(tmp_path, capsys):
    """A non-finite training loss ends the run at that step: exit 1, one line naming the step and the remedy."""
    rc = pretrain_main([str(demo_config_path()), "train.steps=3", "optim.lr=1e30", "optim.warmup_steps=0",
                        "train.log_interval=1", f"logging.dir={tmp_path}", "checkpoint.save=null",
                        "logging.tensorboard=false", "logging.plot=false", "logging.progress=false"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "diverged" in err and "step" in err
