"""The fused negative-ELBO op against the PyTorch formula, forward + backward.

The formula is the one a user writes (and growdense's VAE used):
``F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)``
plus the analytic KL, then ``.mean()`` over the batch and ``backward()``. The fused side
is ``growdense.ops.negative_elbo`` (the same quantity, one pass over the logits forward
and one backward). Sizes are the study's: batch 128, D = 784 pixels, Z = 20 latents,
L = 20 samples (and L = 1), with float32 and bfloat16 logits. Calls are interleaved and
each figure is a median.

    python benchmarks/bench_loss.py                 # all cores
    python benchmarks/bench_loss.py --threads 1
    python benchmarks/bench_loss.py --quick
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

GOAL = 4.0  # fused forward + backward at least 4x faster than the formula (L = 20)


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

    return {"fused": run(growdense.ops.negative_elbo), "formula": run(formula)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    device = args.device
    info = common.setup(args.threads, device)
    B, D, Z = (16, 784, 20) if args.quick else (args.batch_size, 784, 20)
    reps = 5 if args.quick else args.reps
    rows, results = [], []
    for L in (20, 1):
        for dtype in (torch.float32, torch.bfloat16):
            fns = make_case(L, B, D, Z, dtype, device, args.seed)
            samples = common.time_interleaved(fns, device=device, warmup=3, reps=reps)
            fused, ref = common.median(samples["fused"]), common.median(samples["formula"])
            ratio = common.paired_ratio(samples["formula"], samples["fused"])
            name = str(dtype).replace("torch.", "")
            results.append({"L": L, "logits_dtype": name, "fused_median_s": fused, "formula_median_s": ref,
                            "speedup": ratio, "fused_iqr_rel": common.spread(samples["fused"]),
                            "formula_iqr_rel": common.spread(samples["formula"])})
            rows.append([L, name, common.fmt_time(ref), common.fmt_time(fused), f"**{ratio:.2f}x**"])
    common.finish(info)
    headline = [r for r in results if r["L"] == 20]
    met = all(r["speedup"] >= GOAL for r in headline)
    common.report(
        "bench_loss", args, info, ["L", "logits", "PyTorch formula", "fused op", "speed-up"], rows,
        [f"Negative ELBO per image, mean over the batch, forward + backward: batch {B}, D = {D}, Z = {Z}; "
         f"{reps} interleaved rounds after 3 warm-up rounds, medians; speed-up = median over rounds of "
         "formula / fused."],
        {"sizes": {"batch": B, "pixels": D, "latent": Z}, "results": results,
         "goal": f"fused >= {GOAL}x formula at L = 20", "goal_met": bool(met)},
        after=[f"Goal: fused >= {GOAL}x the formula at L = 20: "
               + ", ".join(f"{r['logits_dtype']} {r['speedup']:.2f}x" for r in headline)
               + f": {'met' if met else 'MISSED'}."],
        tag=f"{torch.get_num_threads()}threads",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
