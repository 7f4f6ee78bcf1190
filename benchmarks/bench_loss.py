"""The fused negative-ELBO op against the PyTorch formula, forward + backward.

The formula is the one a user writes (and growdense's VAE used):
``F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)``
plus the analytic KL, then ``.mean()`` over the batch and ``backward()``. The fused side
is ``growdense.ops.negative_elbo`` (the same quantity, one pass over the logits forward
and one backward). Sizes are the study's: batch 128, D = 784 pixels, Z = 20 latents,
L = 20 samples (and L = 1), with float32 and bfloat16 logits. Calls are interleaved and
each figure is a median. The fused op is measured with each compilation of the CPU
kernels this CPU runs (``growdense.ops.cpu_capabilities()``: default, avx2, avx512 or
sve256), each against the same formula in the same rounds.

    python benchmarks/bench_loss.py                 # all cores
    python benchmarks/bench_loss.py --threads 1
    python benchmarks/bench_loss.py --capabilities avx2
    python benchmarks/bench_loss.py --quick
    ATEN_CPU_CAPABILITY=default python benchmarks/bench_loss.py --threads 1   # both on the baseline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import growdense.ops  # noqa: E402

GOAL = 2.0  # fused forward + backward at least 2x faster than the formula, on every CPU path


def formula(logits, x, mu, logvar):
    rec = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)
    return rec - 0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def make_case(L: int, B: int, D: int, Z: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(L, B, D, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    x = torch.rand(B, D, generator=g).round().to(device)
    mu = torch.randn(B, Z, generator=g).to(device).requires_grad_()
    logvar = torch.randn(B, Z, generator=g).to(device).requires_grad_()

    def run(fn):
        def step():
            loss = fn(logits, x, mu, logvar).mean()
            loss.backward()
            logits.grad = mu.grad = logvar.grad = None

        return step

    def with_capability(name, step):
        def call():
            growdense.ops._set_cpu_capability(name)
            step()

        return call

    def fused():
        return run(growdense.ops.negative_elbo)

    return with_capability, fused, run(formula)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--capabilities", nargs="+", default=None,
                        help="CPU kernels to measure (default: every one this CPU runs)")
    args = parser.parse_args(argv)
    device = args.device
    info = common.setup(args.threads, device)
    B, D, Z = (16, 784, 20) if args.quick else (args.batch_size, 784, 20)
    reps = 5 if args.quick else args.reps
    caps = args.capabilities or growdense.ops.cpu_capabilities()
    chosen = growdense.ops.cpu_capability()
    info["cpu_kernels_chosen"] = chosen
    info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    rows, results = [], []
    for L in (20, 1):
        for dtype in (torch.float32, torch.bfloat16):
            with_capability, fused, ref_step = make_case(L, B, D, Z, dtype, device, args.seed)
            fns = {"formula": ref_step}
            fns.update({cap: with_capability(cap, fused()) for cap in caps})
            samples = common.time_interleaved(fns, device=device, warmup=3, reps=reps)
            ref = common.median(samples["formula"])
            name = str(dtype).replace("torch.", "")
            for cap in caps:
                t = common.median(samples[cap])
                ratio = common.paired_ratio(samples["formula"], samples[cap])
                results.append({"cpu_kernels": cap, "L": L, "logits_dtype": name, "fused_median_s": t,
                                "formula_median_s": ref, "speedup": ratio,
                                "fused_iqr_rel": common.spread(samples[cap]),
                                "formula_iqr_rel": common.spread(samples["formula"])})
                rows.append([cap + (" (chosen)" if cap == chosen else ""), L, name, common.fmt_time(ref),
                             common.fmt_time(t), f"**{ratio:.2f}x**"])
    growdense.ops._set_cpu_capability(chosen)
    common.finish(info)
    met = all(r["speedup"] >= GOAL for r in results)
    common.report(
        "bench_loss", args, info, ["CPU kernels", "L", "logits", "PyTorch formula", "fused op", "speed-up"], rows,
        [f"Negative ELBO per image, mean over the batch, forward + backward: batch {B}, D = {D}, Z = {Z}; "
         f"{reps} interleaved rounds after 3 warm-up rounds, medians; speed-up = median over rounds of "
         "formula / fused. Each compilation of growdense's CPU kernels this CPU runs is measured in the "
         "same rounds (ATen's own kernels, which the formula uses, stay at their choice: "
         f"{info['aten_cpu_capability']}; set ATEN_CPU_CAPABILITY=default to compare the baseline kernels "
         "with ATen's baseline)."],
        {"sizes": {"batch": B, "pixels": D, "latent": Z}, "results": results,
         "goal": f"fused >= {GOAL}x formula on every CPU path, L = 20 and 1", "goal_met": bool(met)},
        after=[f"Goal: fused >= {GOAL}x the formula on every CPU path: "
               + ", ".join(f"{r['cpu_kernels']} L={r['L']} {r['logits_dtype']} {r['speedup']:.2f}x" for r in results)
               + f": {'met' if met else 'MISSED'}."],
        tag=f"{torch.get_num_threads()}threads",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
