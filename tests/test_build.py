"""The installed extension: build information, the torch-version guard, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import growdense
from growdense import _extension


def test_build_info_describes_this_build():
    info = growdense.build_info()
    assert info["version"] == growdense.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    assert info["with_cuda"] == (info["cuda_version"] is not None)
    assert growdense.cuda_available() == (info["with_cuda"] and torch.cuda.is_available())


def test_cpu_kernels_are_registered():
    for op in ("linear", "linear_forward", "linear_backward", "linear_reference", "linear_forward_reference",
               "linear_backward_reference", "normal_block_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"growdense::{op}", "CPU"), op


def test_torch_version_mismatch_is_a_clear_error():
    _extension.check_torch_version("2.14.1+cu130", "2.14.1")  # same release: fine
    with pytest.raises(ImportError, match=r"built against torch 2\.9\.0 but torch 2\.14\.1 is installed.*Rebuild"):
        _extension.check_torch_version("2.9.0", "2.14.1")


def test_info_command():
    out = subprocess.run(
        [sys.executable, "-m", "growdense", "info"], check=True, capture_output=True, text=True
    ).stdout
    info = json.loads(out)
    assert info["version"] == growdense.__version__
    assert info["cpu_normal_draws"] in ["torch"] + growdense.ops.cpu_capabilities()
