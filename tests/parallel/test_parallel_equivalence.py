"""Multi-process gloo runs on CPU equal a single process with the same weights, step by step over several optimizer
steps: TP2 (every mixer family), TP2+SP, DP2, CP2, PP2, PP2 with virtual stages and TP2xPP2. Runs whose ranks
draw other initial weights than one process (pipeline stages seed their own streams) start from a world-size-1
checkpoint of step 2. (EP2 is not here: its ranks draw only their own experts, and an EP1 checkpoint does not resume
under EP2, whose chained optimizer names its state 'chained_0.optimizer...'.) Checkpoints reshard: a TP2 checkpoint resumes as PP2
and a CP2 checkpoint as one process, and the next steps equal the uninterrupted run."""
from __future__ import annotations

import pytest
from pretrain_helpers import linear_pattern, run_distributed, run_local

STEPS = 4
# TP splits matmul reductions over ranks, so sums run in another order: fp32 round-off, compounded through a few Adam
# steps, stays far below this.
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
