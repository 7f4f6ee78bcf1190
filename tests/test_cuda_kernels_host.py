"""The CUDA kernels of the linear ops, run on the CPU: no GPU needed.

``tests/cuda_host_emulation.cpp`` compiles ``csrc/cuda/linear_kernels.cuh`` with the
host C++ compiler, runs each CUDA thread as a coroutine (``__syncthreads`` switches back
to the block's scheduler) and compares every output element with float64 loops: the
fused GEMM in its forward and backward uses, both tile shapes, ragged edges, capacity
padding (NaN-filled inputs there must never be read, NaN-poisoned outputs there must be
overwritten with zeros), every activation of ``csrc/activation.h`` (forward, the
pre-activation it saves, its backward from the output or the pre-activation, against
float64 formulas written independently in the test), the bias gradient, and the cuBLAS
path's element-wise kernels. It checks the kernels' logic, not the GPU's arithmetic or speed;
``tests/test_cuda.py`` does that on a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cuda_host_emulation.cpp"
KERNELS = ROOT / "csrc" / "cuda" / "linear_kernels.cuh"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="the emulation's coroutines use glibc's ucontext")
def test_linear_kernels_match_float64_loops_when_emulated(tmp_path: Path) -> None:
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    if not KERNELS.exists():
        pytest.skip("the CUDA sources are not in this checkout")
    torch_include = Path(torch.__file__).parent / "include"
    exe = tmp_path / "cuda_host_emulation"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-w", f"-I{ROOT / 'csrc'}", "-isystem", str(torch_include),
         str(SOURCE), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-6000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert run.stdout.strip().endswith("0 failures")
