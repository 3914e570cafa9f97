"""Multi-process gloo runs on CPU equal a single process with the same weights, step by step over several optimizer
steps: TP2 (every mixer family), TP2+SP, DP2, CP2, PP2, PP2 with virtual stages, TP2xPP2, EP2 and EP2 inside
TP2+SP. Runs whose ranks
draw other initial weights than one process (pipeline stages seed their own streams, EP ranks draw only their own
experts) start from a world-size-1 checkpoint of step 2. Checkpoints reshard: a TP2 checkpoint resumes as PP2, a
CP2 checkpoint as one process, the world-size-1 checkpoint as EP2 (experts split over the ranks, the optimizer split
in a dense and an expert part) and an EP2 checkpoint as one process, and the next steps equal the uninterrupted
run."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from pretrain_helpers import linear_pattern, run_distributed, run_local

from linear_moe.config import ConfigError
from linear_moe.training import checkpoint

STEPS = 4
# TP splits matmul reductions over ranks, and DP and EP sum gradients over ranks, so sums run in another order: fp32
# round-off, compounded through a few Adam steps, stays far below this.
RTOL = 1e-5
# Dense FFNs (Megatron refuses MoE with TP but without SP in training): MoM, gated DeltaNet, GLA and attention.
DENSE_PATTERN = "X- D- G- *-"


def _assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step, value in want.items():
        assert abs(got[step] - value) <= RTOL * abs(value), (step, got[step], value)


def _reference(tmp, overrides=()):
    """World size 1: the losses and a checkpoint after step 2 that the pipeline runs resume from."""
    return _saving_run(1, tmp, *overrides)


def _saving_run(world, tmp, *overrides):
    """A run that also saves a checkpoint of step 2 (and `latest` pointing at it): (losses, checkpoint dir)."""
    ck = tmp / "ck"
    args = [f"train.steps={STEPS}", f"checkpoint.save={ck}", "checkpoint.interval=2", f"logging.dir={tmp / 'run'}",
            *overrides]
    losses = run_local(args).losses if world == 1 else run_distributed(world, args, tmp)
    (ck / "latest").write_text("2\n")
    return losses, ck


def _run(world, tmp_path, *overrides):
    return run_distributed(world, [f"train.steps={STEPS}", f"logging.dir={tmp_path / 'run'}", *overrides], tmp_path)


def _after(losses: dict[int, float], step: int) -> dict[int, float]:
    return {s: v for s, v in losses.items() if s > step}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def reference_dense(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("ref_dense"), [f"model.layer_pattern={DENSE_PATTERN}"])


@pytest.fixture(scope="module")
def reference_linear(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("ref_linear"), [f"model.layer_pattern={linear_pattern()}"])


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    return _saving_run(2, tmp_path_factory.mktemp("tp2"), "parallel.tensor=2", f"model.layer_pattern={DENSE_PATTERN}")


@pytest.fixture(scope="module")
def ep2_run(reference, tmp_path_factory):
    """EP2 resumed from the world-size-1 checkpoint of step 2, saving a checkpoint of step 3 (and `latest` at it)."""
    tmp = tmp_path_factory.mktemp("ep2")
    ck = tmp / "ck"
    losses = _run(2, tmp, f"checkpoint.load={reference[1]}", "parallel.expert=2", f"checkpoint.save={ck}",
                  "checkpoint.interval=3")
    (ck / "latest").write_text("3\n")
    return losses, ck


@pytest.fixture(scope="module")
def cp2_run(tmp_path_factory):
    return _saving_run(2, tmp_path_factory.mktemp("cp2"), "parallel.context=2",
                       f"model.layer_pattern={linear_pattern()}")


def test_tp2_matches_single_process(reference_dense, tp2_run):
    _assert_close(tp2_run[0], reference_dense[0])


@pytest.mark.parametrize("overrides", [
    pytest.param(["parallel.tensor=2", "parallel.sequence_parallel=true"], id="TP2-SP"),
    pytest.param([], id="DP2"),
])
def test_matches_single_process(reference, tmp_path, overrides):
    want, _ = reference
    _assert_close(_run(2, tmp_path, *overrides), want)


def test_cp2_matches_single_process(reference_linear, cp2_run):
    _assert_close(cp2_run[0], reference_linear[0])


@pytest.mark.parametrize("overrides", [
    pytest.param(["parallel.pipeline=2"], id="PP2"),
    pytest.param(["parallel.pipeline=2", "parallel.virtual_pipeline=2"], id="PP2-VPP2"),
])
def test_matches_single_process_from_same_weights(reference, tmp_path, overrides):
    want, ck = reference
    _assert_close(_run(2, tmp_path, f"checkpoint.load={ck}", *overrides), _after(want, 2))


def test_tp2_pp2_matches_single_process_from_same_weights(reference_dense, tmp_path):
    want, ck = reference_dense
    got = _run(4, tmp_path, f"checkpoint.load={ck}", "parallel.tensor=2", "parallel.pipeline=2",
               f"model.layer_pattern={DENSE_PATTERN}")
    _assert_close(got, _after(want, 2))


def test_tp2_checkpoint_resumes_as_pp2(reference_dense, tp2_run, tmp_path):
    _, ck = tp2_run
    got = _run(2, tmp_path, f"checkpoint.load={ck}", "parallel.pipeline=2", f"model.layer_pattern={DENSE_PATTERN}")
    _assert_close(got, _after(reference_dense[0], 2))


def test_cp2_checkpoint_resumes_as_one_process(reference_linear, cp2_run, tmp_path):
    _, ck = cp2_run
    got = run_local([f"train.steps={STEPS}", f"logging.dir={tmp_path / 'run'}", f"checkpoint.load={ck}",
                     f"model.layer_pattern={linear_pattern()}"]).losses
    _assert_close(got, _after(reference_linear[0], 2))


def test_ep2_tp2_sp_matches_single_process_from_same_weights(reference, tmp_path):
    """Experts over 2 ranks inside a TP2 + SP group of 4 processes: the all-to-all dispatcher gathers the sequence
    shards of its TP group in uneven pieces (tokens per expert rank)."""
    want, ck = reference
    got = _run(4, tmp_path, f"checkpoint.load={ck}", "parallel.expert=2", "parallel.tensor=2",
               "parallel.sequence_parallel=true")
    _assert_close(got, _after(want, 2))


def test_ep2_matches_single_process_from_same_weights(reference, ep2_run):
    _assert_close(ep2_run[0], _after(reference[0], 2))


def test_ep2_checkpoint_resumes_as_one_process(reference, ep2_run, tmp_path):
    _, ck = ep2_run
    got = run_local([f"train.steps={STEPS}", f"logging.dir={tmp_path / 'run'}", f"checkpoint.load={ck}"]).losses
    _assert_close(got, _after(reference[0], 3))


def _saved_split(*steps: float) -> dict:
    """The common (non-tensor) part of a saved optimizer split in len(steps) parts, with these Adam steps."""
    return {i: {"state": {"common_step": torch.tensor(step)}, "param_groups": []} for i, step in enumerate(steps)}


@pytest.mark.parametrize("common, parts, message", [
    pytest.param({"optimizer": _saved_split(2.0, 2.0)}, [object()], "not by parameter name", id="keyed-by-part"),
    pytest.param({"optimizer": _saved_split(2.0, 3.0), "content_metadata": checkpoint.METADATA}, [object()],
                 "no single Adam step (found [2.0, 3.0])", id="unequal-steps"),
    pytest.param({"optimizer": _saved_split(2.0, 2.0), "content_metadata": checkpoint.METADATA},
                 [DistributedOptimizer.__new__(DistributedOptimizer)], "distributed optimizer", id="distributed"),
])
def test_optimizer_split_otherwise_that_cannot_load_is_one_clear_error(common, parts, message):
    with pytest.raises(ConfigError, match="checkpoint.load='ck': its optimizer is split in 2") as e:
        checkpoint._regrouping_step("ck", SimpleNamespace(chained_optimizers=parts), common)
    assert message in str(e.value) and "parallel.expert" in str(e.value)
