"""The CUDA part of the build: the extension holds the CUDA kernels when the build said so.

These run without a GPU: registering a kernel needs only the library, not a device.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import growdense

OPS = ("linear", "linear_forward", "linear_backward", "normal_block_")
# The plain-loop references stay CPU-only: the CUDA kernels are compared against them.
CPU_ONLY_OPS = ("linear_reference", "linear_forward_reference", "linear_backward_reference")


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"growdense::{op}", "CUDA")


def test_cuda_kernels_are_registered_exactly_when_built() -> None:
    built = growdense.build_info()["with_cuda"]
    for op in OPS:
        assert _has_cuda_kernel(op) == built, op
    for op in CPU_ONLY_OPS:
        assert not _has_cuda_kernel(op), op


def test_build_with_cuda_when_ci_asks_and_can() -> None:
    """CI sets GROWDENSE_CUDA=ON where nvcc is present; the build must then hold the kernels."""
    can = Path("/usr/local/cuda/bin/nvcc").exists() and bool(torch.version.cuda)
    if not (can and os.environ.get("GROWDENSE_CUDA") == "ON"):
        pytest.skip("not a CUDA build environment with GROWDENSE_CUDA=ON")
    info = growdense.build_info()
    assert info["with_cuda"], info
    assert info["cuda_version"] == torch.version.cuda


def test_cuda_build_names_its_architectures() -> None:
    info = growdense.build_info()
    if not info["with_cuda"]:
        pytest.skip("built without CUDA kernels")
    assert info["cuda_archs"], info
