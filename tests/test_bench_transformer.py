"""benchmarks/bench_transformer.py runs at tiny sizes and reports every goal of the transformer example."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from growdense import protocol

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_transformer.py"


def test_bench_transformer_quick(tmp_path):
    out = tmp_path / "bench_transformer.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| measure |" in proc.stdout  # the markdown table
    data = json.loads(out.read_text())  # strict JSON: no NaN
    assert data["benchmark"] == "bench_transformer" and data["machine"]["torch_threads"] == 1
    results = data["results"]
    for key in ("step_half", "step_full", "growth"):
        assert results[key]["ratio"] > 0 and math.isfinite(results[key]["ratio"])
    assert len(data["verdicts"]) == 6 and all(isinstance(v["met"], bool) for v in data["verdicts"])
    alloc = data["allocations"]
    # In place: nothing of the model's size is allocated (only the staging chunks of the
    # non-contiguous random draws, protocol.DRAW_CHUNK float32 values at most each), and
    # every Parameter and optimizer-state tensor keeps its storage.
    assert alloc["growdense"]["largest_allocation"] <= protocol.DRAW_CHUNK * 4
    assert alloc["growdense"]["allocated_bytes"] < 0.1 * alloc["model_parameter_bytes"]
    assert alloc["growdense"]["same_storage"] == alloc["growdense"]["tensors"] > 0
    # Rebuilding allocates at least a new model (and its optimizer state) and keeps no storage.
    assert alloc["rebuild"]["allocated_bytes"] >= alloc["model_parameter_bytes"]
    assert alloc["rebuild"]["same_storage"] == 0
    check = data["function_check"]
    assert check["float32"]["max_abs_change"] <= 1e-6 and check["float64"]["max_abs_change"] <= 1e-12
