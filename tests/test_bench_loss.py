"""bench_loss.py runs (``--quick``) and writes well-formed JSON; its two sides compute the same loss."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_loss_quick(tmp_path):
    out = tmp_path / "bench_loss.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_loss.py"), "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| L | logits |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "bench_loss"
    assert {(r["L"], r["logits_dtype"]) for r in data["results"]} == {
        (20, "float32"), (20, "bfloat16"), (1, "float32"), (1, "bfloat16")}
    assert all(r["speedup"] > 0 and r["fused_median_s"] > 0 for r in data["results"])


def test_bench_loss_sides_compute_the_same_loss():
    spec = importlib.util.spec_from_file_location("_growdense_bench_loss", BENCH / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import growdense.ops

    g = torch.Generator().manual_seed(0)
    logits, x = torch.randn(3, 4, 784, generator=g), torch.rand(4, 784, generator=g).round()
    mu, logvar = torch.randn(4, 20, generator=g), torch.randn(4, 20, generator=g)
    # float32 sums of 3 x 784 terms: 1e-5 relative
    torch.testing.assert_close(growdense.ops.negative_elbo(logits, x, mu, logvar),
                               module.formula(logits, x, mu, logvar), rtol=1e-5, atol=0)
