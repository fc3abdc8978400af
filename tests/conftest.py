"""Test set-up: Triton's interpreter on machines without a GPU, and the `gpu` and `slow` markers."""

import os

import pytest
import torch  # (imports no triton)

# TRITON_INTERPRET must be set before triton is imported by anything. One test of "is there a GPU" for this and for
# the gpu marker's skip below: nvidia-smi here once, and a GPU container without nvidia-smi ran the -m gpu tests'
# Triton kernels in the interpreter.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on a CPU-only machine)")
    config.addinivalue_line("markers", "slow: long sweeps, not run by CI (select with -m slow)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
