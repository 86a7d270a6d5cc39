"""The prepared benchmark scripts fail cleanly where they cannot run."""

import subprocess
import sys

import pytest

from .conftest import ROOT


def test_gpu_check_stops_with_one_line_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run bench/gpu_check.py itself")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr, done.stderr
