"""growdense's CUDA kernels, run on the CPU: no GPU needed.

Each ``tests/*_host_emulation.cpp`` compiles a kernel header of ``csrc/cuda/`` with the
host C++ compiler through ``tests/host_emulation.h`` (each CUDA thread a coroutine,
``__syncthreads`` a switch back to the block's scheduler) and compares every output
element with float64 loops:

- ``cuda_host_emulation.cpp`` (``linear_kernels.cuh``): the fused GEMM in its forward and
  backward uses, both tile shapes, ragged edges, capacity padding (NaN-filled inputs
  there must never be read, NaN-poisoned outputs there must be overwritten with zeros),
  every activation of ``csrc/activation.h`` (forward, the pre-activation it saves, its
  backward from the output or the pre-activation, against float64 formulas written
  independently in the test), the bias gradient, and the cuBLAS path's element-wise
  kernels;
- ``elbo_host_emulation.cpp`` (``elbo_kernels.cuh``, the fused negative ELBO): the
  forward's block reduction, grid-stride loops with grids smaller and larger than the
  work, D above and below the block size, L = 1 and 20, batch 1, float32, float64,
  bfloat16 and float16 logits, every gradient of the backward, and that gradients not
  asked for are not written.

They check the kernels' logic, not the GPU's arithmetic or speed; ``tests/test_cuda.py``
and ``tests/test_elbo.py`` do that on a GPU.
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
EMULATED = {  # test source -> the kernel header it runs
    "linear": ("cuda_host_emulation.cpp", "linear_kernels.cuh"),
    "elbo": ("elbo_host_emulation.cpp", "elbo_kernels.cuh"),
}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="the emulation's coroutines use glibc's ucontext")
@pytest.mark.parametrize("kernels", sorted(EMULATED))
def test_kernels_match_float64_loops_when_emulated(kernels: str, tmp_path: Path) -> None:
    source, header = EMULATED[kernels]
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    if not (ROOT / "csrc" / "cuda" / header).exists():
        pytest.skip("the CUDA sources are not in this checkout")
    torch_include = Path(torch.__file__).parent / "include"
    exe = tmp_path / f"{kernels}_host_emulation"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-w", f"-I{ROOT / 'csrc'}", "-isystem", str(torch_include),
         str(ROOT / "tests" / source), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-6000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert run.stdout.strip().endswith("0 failures")
