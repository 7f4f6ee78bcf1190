"""bench_train.py --peers has the GEMM floor as a row, and its floor runs the step's products."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_growdense_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_study_products_are_the_vae_layers_gemms():
    bench = _load("bench_train")
    products = bench.study_products(batch=128, samples=20)
    # enc1, enc2, two heads on 128 rows; the decoder's three layers on 20 x 128 rows
    assert [p[0] for p in products] == [128] * 4 + [2560] * 3
    assert [(p[1], p[2]) for p in products] == [(784, 256), (256, 128), (128, 20), (128, 20), (20, 128),
                                                (128, 256), (256, 784)]
    assert [p[3] for p in products] == [False] + [True] * 6  # the images need no gradient


def test_gemm_floor_step_computes_every_product_into_its_buffers():
    bench = _load("bench_train")
    calls = []
    real_mm = torch.mm

    def counting_mm(a, b, out=None):
        calls.append((tuple(a.shape), tuple(b.shape), out is not None))
        return real_mm(a, b, out=out)

    step = bench.gemm_floor_step(batch=4, samples=2, device="cpu", seed=0)
    torch.mm = counting_mm
    try:
        step(None)
    finally:
        torch.mm = real_mm
    # 7 forward products, 7 weight gradients, 6 input gradients (not of the images), all with out=
    assert len(calls) == 20 and all(out for *_, out in calls)
    flops = sum(2 * a[0] * a[1] * b[1] for a, b, _ in calls)
    expected = sum(2 * rows * n_in * n_out * (3 if need_dx else 2)
                   for rows, n_in, n_out, need_dx in bench.study_products(batch=4, samples=2))
    assert flops == expected


def test_peers_quick_has_the_floor_row_and_the_float32_goals(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_train.py"), "--peers", "--quick", "--threads", "1", "--no-compile",
         "--fp32-only", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"GEMM floor fp32", "plain fp32", "plain fp32 fused Adam", "growdense fp32",
                                    "growdense fp32 fused Adam"}
    assert data["over_gemm_floor"]["GEMM floor fp32"] == 1.0
    assert all(v > 0 for v in data["over_gemm_floor"].values())
    goals, med = data["goals"], {k: v["median_s"] for k, v in data["summary"].items()}
    assert goals["fp32 GEMM floor"]["goal"] == 1.2
    # each side of the goals is the faster of its two Adam flavours in this run
    assert goals["fp32 best peer"]["against"] == min(("plain fp32", "plain fp32 fused Adam"), key=med.get)
    assert goals["fp32 GEMM floor"]["side"] == min(("growdense fp32", "growdense fp32 fused Adam"), key=med.get)
    assert "GEMM floor" in proc.stdout


def test_keep_freed_memory_is_idempotent():
    from growdense.experiments.training import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first
    if sys.platform.startswith("linux") and Path("/lib/x86_64-linux-gnu/libc.so.6").exists():
        assert first is True
