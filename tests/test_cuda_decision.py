"""The build's CUDA rule (cmake/GrowdenseCuda.cmake), run by ``cmake -P`` with made-up torch
and nvcc releases: no second torch, no compiler, no GPU needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULE = Path(__file__).resolve().parents[1] / "cmake" / "GrowdenseCuda.cmake"
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")


def decide(tmp_path: Path, mode: str, torch_cuda: str, nvcc: str = "/usr/local/cuda/bin/nvcc",
           release: str = "13.0", sources: str = "ON") -> tuple[int, str, str]:
    """(exit status, the decision ON/OFF, everything CMake printed)."""
    script = tmp_path / "decide.cmake"
    script.write_text(
        f'include("{RULE.as_posix()}")\n'
        f'growdense_decide_cuda("{mode}" "2.15.0" "{torch_cuda}" "{nvcc}" "{release}" {sources} with)\n'
        'message(NOTICE "decision=${with}")\n'
    )
    proc = subprocess.run([CMAKE, "-P", str(script)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    decision = out.split("decision=")[-1].strip() if "decision=" in out else ""
    return proc.returncode, decision, " ".join(out.split())  # CMake wraps long messages


def test_same_release_builds_the_kernels(tmp_path):
    for mode in ("AUTO", "", "ON"):
        assert decide(tmp_path, mode, "13.0", release="13.0")[:2] == (0, "ON")
    assert decide(tmp_path, "AUTO", "12.8", release="12.8.93")[:2] == (0, "ON")  # major.minor decides


@pytest.mark.parametrize("torch_cuda, nvcc", [("13.2", "13.0"), ("12.8", "13.0"), ("13.0", "12.6")])
def test_auto_with_another_release_builds_cpu_only_and_says_why(tmp_path, torch_cuda, nvcc):
    rc, decision, out = decide(tmp_path, "AUTO", torch_cuda, release=nvcc)
    assert (rc, decision) == (0, "OFF")
    assert "CPU-only extension" in out and f"CUDA {nvcc}" in out and f"CUDA {torch_cuda}" in out, out
    assert "CMake Warning" in out  # visible in pip's log, not a status line among many
    assert f"built with CUDA {torch_cuda}, and the CUDA headers" in out  # one sentence, not a CMake list


def test_on_with_another_release_is_an_error_naming_both_and_the_fix(tmp_path):
    rc, decision, out = decide(tmp_path, "ON", "13.2", release="13.0")
    assert rc != 0 and decision == ""
    assert "GROWDENSE_CUDA=ON but" in out and "CUDA 13.0" in out and "CUDA 13.2" in out
    assert "CUDA_HOME" in out and "GROWDENSE_CUDA=OFF" in out, out


@pytest.mark.parametrize("kw, why", [
    (dict(torch_cuda=""), "CPU-only build"),
    (dict(torch_cuda="13.0", nvcc=""), "nvcc was not found"),
    (dict(torch_cuda="13.0", sources="OFF"), "no CUDA sources"),
    (dict(torch_cuda="13.0", release=""), "could not be read"),
])
def test_other_reasons(tmp_path, kw, why):
    rc, decision, out = decide(tmp_path, "AUTO", **kw)
    assert (rc, decision) == (0, "OFF") and why in out
    rc, _, out = decide(tmp_path, "ON", **kw)
    assert rc != 0 and f"GROWDENSE_CUDA=ON but" in out and why in out
    rc, decision, out = decide(tmp_path, "OFF", **kw)
    assert (rc, decision) == (0, "OFF") and why not in out


def test_nvcc_release_is_read_from_its_version_text(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 13.2, V13.2.51'\n")
    fake.chmod(0o755)
    script = tmp_path / "release.cmake"
    script.write_text(f'include("{RULE.as_posix()}")\ngrowdense_nvcc_release("{fake}" r)\n'
                      'message(NOTICE "release=${r}")\ngrowdense_nvcc_release("/nonexistent/nvcc" r)\n'
                      'message(NOTICE "missing=${r}.")\n')
    proc = subprocess.run([CMAKE, "-P", str(script)], capture_output=True, text=True, timeout=60)
    assert "release=13.2" in proc.stderr and "missing=." in proc.stderr, proc.stderr
