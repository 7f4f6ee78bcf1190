"""The CPU sources compile for Arm (aarch64): NEON (the baseline) and SVE with 256-bit vectors.

No Arm machine runs these tests, so this is the Arm half of "every CPU path": the C++
sources are compiled for ``aarch64-linux-gnu`` with zig's clang (the ``ziglang`` wheel,
a self-contained cross compiler), with the flags and definitions ``CMakeLists.txt`` gives
each capability, against the installed torch's headers. A probe compiled with each
capability's flags asserts that ``at::vec::Vectorized<float>`` is that capability's (4
floats: NEON's 128-bit registers; 8: SVE at 256 bits), so a flag that stopped selecting
the intended path fails here instead of silently compiling the scalar fallback.
Skipped where ``ziglang`` is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = "aarch64-linux-gnu"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ziglang") is None,
                                reason="needs the ziglang wheel (an aarch64 cross compiler)")

PROBE = r"""
#include <ATen/cpu/vec/vec.h>
#if !defined(__aarch64__) || !defined(__ARM_NEON)
#error "not compiling for aarch64 with NEON"
#endif
#if defined(CPU_CAPABILITY_SVE) && !defined(__ARM_FEATURE_SVE)
#error "CPU_CAPABILITY_SVE without SVE enabled"
#endif
static_assert(at::vec::Vectorized<float>::size() == EXPECT_FLOATS, "at::vec is not this capability's");
"""


def _cmake_list(name: str) -> list[str]:
    """The items of ``set(<name> ...)`` in CMakeLists.txt."""
    text = (ROOT / "CMakeLists.txt").read_text()
    found = re.search(rf"set\({re.escape(name)}\s+([^)]*)\)", text)
    assert found, f"CMakeLists.txt sets no {name}"
    return found.group(1).split()


def _zig_flags(flags: list[str]) -> list[str]:
    """CMake's GCC-style architecture flags as zig's clang driver spells them (``-mcpu``, not ``-march``)."""
    out = []
    for flag in flags:
        if flag.startswith("-march=armv8-a"):
            out.append("-mcpu=generic" + flag[len("-march=armv8-a"):])
        else:
            out.append(flag)
    return out


def _capabilities() -> dict[str, tuple[list[str], list[str], int]]:
    """``{name: (compiler flags, definitions, floats per vector)}`` for the aarch64 capabilities."""
    sve_flags = _cmake_list("_cpu_flags_SVE256")
    bits = next(int(f.split("=")[1]) for f in sve_flags if f.startswith("-msve-vector-bits="))
    return {
        "DEFAULT": ([], [], 4),
        "SVE256": (_zig_flags(sve_flags), _cmake_list("_cpu_defs_SVE256"), bits // 32),
    }


def _includes() -> list[str]:
    from torch.utils import cpp_extension

    paths = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    return [arg for p in paths for arg in ("-isystem", p)]


def _compile(source: Path, out: Path, flags: list[str], defines: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ziglang", "c++", "-target", TARGET, "-std=c++20", "-O1", "-fPIC",
           *flags, *(f"-D{d}" for d in defines), "-D_GLIBCXX_USE_CXX11_ABI=1",
           f"-I{ROOT / 'csrc'}", *_includes(), "-c", str(source), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0, f"{what} does not compile for {TARGET}:\n" + "\n".join(errors[:20] or [result.stderr[-3000:]])


def _is_aarch64_object(path: Path) -> bool:
    head = path.read_bytes()[:20]
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # e_machine EM_AARCH64


@pytest.mark.parametrize("name", ["DEFAULT", "SVE256"])
def test_kernels_compile_for_each_arm_capability(name, tmp_path):
    flags, defs, floats = _capabilities()[name]
    defines = [f"CPU_CAPABILITY={name}", f"CPU_CAPABILITY_{name}", *defs]
    probe = tmp_path / "probe.cpp"
    probe.write_text(PROBE)
    _check(_compile(probe, tmp_path / "probe.o", flags, [*defines, f"EXPECT_FLOATS={floats}"]),
           f"the at::vec probe ({name}, {floats} floats per vector)")
    out = tmp_path / f"kernels_{name}.o"
    _check(_compile(ROOT / "csrc/cpu/vec/kernels.cpp", out, flags, defines), f"csrc/cpu/vec/kernels.cpp ({name})")
    assert _is_aarch64_object(out)


def test_probe_fails_without_the_capability_flags(tmp_path):
    """The probe can fail: SVE's definitions without SVE's flags do not compile."""
    _, defs, floats = _capabilities()["SVE256"]
    probe = tmp_path / "probe.cpp"
    probe.write_text(PROBE)
    result = _compile(probe, tmp_path / "probe.o", [], ["CPU_CAPABILITY=SVE256", "CPU_CAPABILITY_SVE256", *defs,
                                                         f"EXPECT_FLOATS={floats}"])
    assert result.returncode != 0


def test_cpu_sources_compile_for_arm(tmp_path):
    """Every C++ source of the CPU build (the ops, autograd, the capability dispatch with SVE256 built in)."""
    sources = sorted(
        p for p in [*ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/cpu/*.cpp"), *ROOT.glob("csrc/autograd/*.cpp")]
        if p.name != "build_info.cpp"  # the Python module's version strings, given by CMake
    )
    assert sources
    defines = ["GROWDENSE_CPU_HAVE_DEFAULT", "GROWDENSE_CPU_HAVE_SVE256"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: (p, _compile(p, tmp_path / f"{p.parent.name}_{p.stem}.o", [], defines)),
                                sources))
    for path, result in results:
        _check(result, str(path.relative_to(ROOT)))
        assert _is_aarch64_object(tmp_path / f"{path.parent.name}_{path.stem}.o")
