"""The benchmarks run (``--quick``), write well-formed JSON, and compare like with like."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import growdense.ops

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """A module of benchmarks/ under a private name (sys.path and sys.modules stay as they are)."""
    spec = importlib.util.spec_from_file_location(f"_growdense_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("common")
_realloc = _load("realloc_vae")
ReallocVAE, expanded, negative_elbo = _realloc.ReallocVAE, _realloc.expanded, _realloc.negative_elbo


def run_quick(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| " in proc.stdout  # printed a markdown table
    data = json.loads(out.read_text())  # strict JSON: no NaN
    assert data["benchmark"] == script
    machine = data["machine"]
    assert machine["torch_threads"] == 1 and machine["torch"] == torch.__version__
    assert machine["load_average_end"] is None or len(machine["load_average_end"]) == 3
    return data


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and math.isfinite(x)


def test_bench_layer_quick(tmp_path):
    data = run_quick("bench_layer", tmp_path)
    rows = data["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd", "step"}
    assert {r["active_over_capacity"] for r in rows} == {"1/1", "1/2", "1/8"}
    for r in rows:
        assert positive(r["median_s"]) and positive(r["baseline_median_s"]) and positive(r["time_ratio"])
        assert r["capacity_in"] == r["in"] * int(r["active_over_capacity"][2:])
        if r["mode"] != "step":
            assert positive(r["tflops"]) and positive(r["fraction_of_peak"])
    assert any(r["side"] == "GrowLinear, growdense Adam" for r in rows)
    assert any("goal" in r and isinstance(r["goal_met"], bool) for r in rows)


def test_bench_growth_quick(tmp_path):
    data = run_quick("bench_growth", tmp_path)
    rows = data["rows"]
    sides = {r["side"] for r in rows}
    assert sides == {"floor", "growdense", "growdense, layer only", "reallocate"}
    for r in rows:
        assert positive(r["median_s"]) and positive(r["ratio_to_floor"])
        if r["side"].startswith("growdense") or r["side"] == "floor":
            assert r["new_bytes"] == 0  # in place: nothing allocated
        else:
            assert r["new_bytes"] >= r["layer_bytes"]  # a whole new layer


def test_bench_normal_quick(tmp_path):
    data = run_quick("bench_normal", tmp_path)
    assert data["draws"] == growdense.ops.cpu_normal_draws()
    assert len(data["results"]) == 2
    for r in data["results"]:
        assert r["same_values_and_generator_state"] is True  # torch's values, bit for bit
        assert positive(r["growdense_s"]) and positive(r["torch_s"]) and positive(r["speedup"])


def test_bench_train_quick(tmp_path):
    data = run_quick("bench_train", tmp_path)
    summary = data["summary"]
    assert positive(summary["throughput_ratio_total"])
    assert len(summary["growdense_growth_s"]) == len(summary["growth_epochs"]) > 0
    widths = [(e["h1"], e["h2"]) for e in data["epochs"]]
    assert widths[0] == (32, 16) and widths[1] == (64, 32)
    for e in data["epochs"]:
        assert positive(e["growdense_images_per_s"]) and positive(e["reallocate_images_per_s"])


def test_bench_epoch_quick(tmp_path):
    data = run_quick("bench_epoch", tmp_path)
    rows = {r["side"]: r for r in data["rows"]}
    assert set(rows) == {"reproduce", "plain", "per-step .item()"}
    assert rows["plain"]["ratio_to_plain"] == 1.0
    for r in rows.values():
        assert positive(r["median_epoch_s"]) and positive(r["ratio_to_plain"]) and r["epochs"] == 2
    assert data["images"] == 1024


def test_interleaved_timing_and_summaries():
    calls = []
    samples = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      warmup=1, reps=4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(samples["a"]) == len(samples["b"]) == 4
    assert common.paired_ratio([2, 4, 6], [1, 2, 3]) == 2
    table = common.markdown_table(["x", "y"], [[1, 2]])
    assert table.splitlines() == ["| x | y |", "|---|---|", "| 1 | 2 |"]


def test_new_bytes_counts_new_tensors_only():
    x = torch.zeros(100)
    with common.NewBytes() as nb:
        x.add_(1)  # in place
        x[:10].mul_(2)  # a view
    assert nb.bytes == 0
    with common.NewBytes() as nb:
        torch.empty(1000)
    assert nb.bytes == 4000 and nb.largest == 4000


def test_expanded_keeps_old_weights_and_he_initialises_the_rest():
    torch.manual_seed(0)
    old = torch.nn.Linear(30, 20)
    new = expanded(old, 50, 40)
    assert new.weight.shape == (40, 50)
    assert torch.equal(new.weight[:20, :30], old.weight) and torch.equal(new.bias[:20], old.bias)
    assert not new.bias[20:].any()
    fresh = torch.cat([new.weight[20:].flatten(), new.weight[:20, 30:].flatten()])
    assert abs(fresh.std().item() - math.sqrt(2 / 50)) < 0.02


def test_both_sides_of_bench_train_are_the_same_model():
    """At equal weights, the reallocating VAE and growdense's VAE compute the same loss."""
    from growdense.models.vae import VAE

    torch.manual_seed(0)
    gd = VAE(32, 16, capacity=(256, 128))
    rl = ReallocVAE(32, 16)
    with torch.no_grad():
        for name in ("enc1", "enc2", "mu_head", "logvar_head", "dec1", "dec2", "dec3"):
            layer = getattr(gd, name)
            getattr(rl, name).weight.copy_(layer.active_weight)
            getattr(rl, name).bias.copy_(layer.active_bias)
    x = torch.rand(8, 784)
    losses = []
    for model in (gd, rl):
        logits, mu, logvar = model(x, 3, torch.Generator().manual_seed(5))
        losses.append(negative_elbo(x, logits, mu, logvar))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    gen = torch.Generator().manual_seed(1)
    rl.grow(32, 16, generator=gen)
    assert rl.widths() == (64, 32) and rl.mu_head.in_features == 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bench_layer_cuda_quick(tmp_path):
    out = tmp_path / "cuda.json"
    subprocess.run([sys.executable, str(BENCH / "bench_layer.py"), "--quick", "--device", "cuda", "--json", str(out)],
                   check=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert all(positive(r["tflops"]) for r in rows if r["mode"] != "step")
