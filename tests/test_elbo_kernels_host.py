"""The CUDA kernels of the fused negative ELBO, run on the CPU: no GPU needed.

``tests/elbo_host_emulation.cpp`` compiles ``csrc/cuda/elbo_kernels.cuh`` with the host
C++ compiler, runs each CUDA thread as a coroutine (``__syncthreads`` switches back to
the block's scheduler) and compares every output element with float64 loops: the
forward's block reduction, grid-stride loops with grids smaller and larger than the
work, D above and below the block size, L = 1 and 20, batch 1, float32, float64,
bfloat16 and float16 logits, every gradient of the backward, and that gradients not
asked for are not written. It checks the kernels' logic, not the GPU's arithmetic.
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
SOURCE = ROOT / "tests" / "elbo_host_emulation.cpp"
KERNELS = ROOT / "csrc" / "cuda" / "elbo_kernels.cuh"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="the emulation's coroutines use glibc's ucontext")
def test_elbo_kernels_match_float64_loops_when_emulated(tmp_path: Path) -> None:
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    if not KERNELS.exists():
        pytest.skip("the CUDA sources are not in this checkout")
    torch_include = Path(torch.__file__).parent / "include"
    exe = tmp_path / "elbo_host_emulation"
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
