"""Test set-up: Triton's interpreter on machines without a GPU, and the `gpu` and `slow` markers."""

import os
import shutil
import subprocess


# TRITON_INTERPRET must be set before triton is imported by anything.
def _has_cuda_device() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_GPU = _has_cuda_device()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on a CPU-only machine)")
    config.addinivalue_line("markers", "slow: long sweeps, not run by CI (select with -m slow)")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
