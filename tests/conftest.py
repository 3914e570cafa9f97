"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist workers (gw0, gw1, ...) spread over the visible GPUs; "cuda" then means the worker's own
    torch.cuda.set_device(int(os.environ["PYTEST_XDIST_WORKER"][2:]) % torch.cuda.device_count())

import warnings

import pytest

# Megatron-Core warns at import that TE and apex are absent; that is the supported CPU configuration.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs on the H100 via benchmarks/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With PYTEST_FAILURE_LOG set, each failure's report is appended to that file as it happens (under xdist too),
    so a run cut off by a time limit still leaves the reason of every failure so far (benchmarks/gpu_check.sh)."""
    path = os.environ.get("PYTEST_FAILURE_LOG")
    # under xdist the controller gets every worker's report too: write once, there
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="module")
def megatron_world():
    """torch.distributed (gloo, world 1) and Megatron's parallel state at TP = PP = 1 in CPU mode, for one test
    module. It is torn down after the module, so the next module (or an in-process training run, which sets up its
    own) starts clean."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from linear_moe.cpu import enable_cpu_mode

    enable_cpu_mode()
    made_group = not dist.is_initialized()
    if made_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    made_state = not ps.model_parallel_is_initialized()
    if made_state:
        ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(42)
    yield
    if made_state:
        ps.destroy_model_parallel()
    if made_group:
        dist.destroy_process_group()


@pytest.fixture
def make_tc():
    """`layer_helpers.transformer_config` as a fixture."""
    from layer_helpers import transformer_config

    return transformer_config
