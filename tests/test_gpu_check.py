"""tools/checks/gpu_check.py: exits 0 without CUDA, and its comparison catches what it must."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.checks import gpu_check

pytestmark = pytest.mark.gpu
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_it_says_so_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "tools.checks.gpu_check"], capture_output=True, text=True,
                            cwd=REPOSITORY, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "no CUDA device" in result.stdout


CPU = [((0, 1), 10.0), ((0, 2), 5.0), ((1, 0), 4.999), ((1, 3), -2.0)]


def test_comparison_accepts_rounding_and_ties_only():
    rounded = [(row, value * (1 + 1e-4)) for row, value in CPU]
    assert gpu_check.compare_lists("hits", rounded, CPU, 2e-3) == []
    tie_swapped = [CPU[0], CPU[2], CPU[1], CPU[3]]  # 5.0 and 4.999 are equal within 2e-3 × 10
    assert gpu_check.compare_lists("hits", tie_swapped, CPU, 2e-3) == []
    assert gpu_check.compare_lists("hits", tie_swapped, CPU, 1e-5), "a swap of distinct scores must be caught"
    other_row_same_score = [CPU[0], ((7, 7), 5.0), CPU[2], CPU[3]]  # a tie with a row the CPU ranked lower
    assert gpu_check.compare_lists("hits", other_row_same_score, CPU, 2e-3) == []
    off = [CPU[0], ((0, 2), 5.1), CPU[2], CPU[3]]
    assert "hits #1" in gpu_check.compare_lists("hits", off, CPU, 2e-3)[0]
    assert gpu_check.compare_lists("hits", CPU[:3], CPU, 2e-3) == ["hits: 3 entries against 4"]


def test_a_failed_mode_is_reported_not_raised():
    failure = gpu_check._guarded(lambda: 1 / 0)
    assert isinstance(failure, gpu_check.Failure) and "ZeroDivisionError" in failure
    counts = {"sequences": 4}
    problems = gpu_check.compare({"counts": counts, "index": failure, "exhaustive q0 hits": CPU},
                                 {"counts": counts, "index q0 hits": CPU, "exhaustive q0 hits": CPU}, 2e-3)
    assert problems == ["index failed on device: ZeroDivisionError: division by zero",
                        "index q0 hits: answered on one side only"]

