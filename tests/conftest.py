"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402

# Megatron-Core warns at import that TE and apex are absent; that is the supported CPU configuration.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs on the H100 via benchmarks/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
