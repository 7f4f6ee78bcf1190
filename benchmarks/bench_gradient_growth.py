"""Gradient-guided growth on the study's VAE: what a growth buys, and what it costs.

1. Loss decrease after a growth. The study's VAE is pretrained at 32/16 (Adam, lr 1e-3,
   batch 128, L = 20) for ``--epochs`` epochs on ``--train-subset`` training images (the
   issue asks for 25 epochs on all 60,000; shorter here, said in the output). Then, for
   each init (GradMax, TINY, He, zero_out) and each of ``--seeds`` growth seeds, a copy
   grows as Approach 1's first event does (32/16 -> 64/32, the optimizer reset as in the
   study), trains ``--steps`` steps, and the table gives the decrease of the loss on a
   fixed held-out set (fixed latent noise) from just before the growth to after those
   steps: mean and spread over the seeds. The seed moves the data order of the steps,
   the growth's random draws and the closure's mini-batches together.
2. The cost of one GradMax growth (both widths, as a schedule event does: one closure pass
   of ``GRADIENT_BATCHES`` mini-batches for both, SVDs on the CPU, the writes) against one
   training step, and the same growth one width at a time (a pass each); side by side,
   interleaved, medians.

    python benchmarks/bench_gradient_growth.py --data-dir ../shared/data --epochs 5 --train-subset 12000
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from growdense.experiments.config import ReproduceConfig  # noqa: E402
from growdense.experiments.data import load_mnist  # noqa: E402
from growdense.experiments.training import (  # noqa: E402
    GRADIENT_BATCHES, GRADMAX_OPTIONS, TINY_OPTIONS, evaluate_loss, growth_closure, train_epoch,
)
from growdense.models.vae import VAE  # noqa: E402
from growdense.optim import Adam  # noqa: E402

INITS = ("gradmax", "tiny", "he", "zero_out")


def grow(model: VAE, optimizer, init: str, cfg: ReproduceConfig, train, seed: int, together: bool = True) -> None:
    """Approach 1's first event (both widths). ``together``: as a GrowthSchedule event does
    (``Wiring.grow_many``: GradMax takes both widths' statistics from one closure pass);
    otherwise one ``Wiring.grow`` per width (one pass each)."""
    options = dict({"gradmax": GRADMAX_OPTIONS, "tiny": TINY_OPTIONS}.get(init, {}))
    if init in ("gradmax", "tiny"):
        options["closure"] = growth_closure(model, train, cfg, epoch=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    sizes = {"h1": cfg.step[0], "h2": cfg.step[1]}
    if together:
        model.wiring.grow_many(sizes, init=init, generator=gen, optimizer_state="reset", **options)
    else:
        for name, n in sizes.items():
            model.wiring.grow(name, n, init=init, generator=gen, optimizer_state="reset", **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=25, help="pretraining epochs at 32/16 (the issue: 25)")
    parser.add_argument("--train-subset", type=int, default=None, help="pretraining images (default all 60,000)")
    parser.add_argument("--steps", type=int, default=50, help="training steps after the growth")
    parser.add_argument("--seeds", type=int, default=5, help="growth seeds per init")
    parser.add_argument("--held-out", type=int, default=1000, help="test images of the loss before and after")
    parser.add_argument("--reps", type=int, default=10, help="timing rounds")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_subset, args.steps, args.seeds, args.held_out, args.reps = 1, 1024, 5, 2, 200, 3
    info = common.setup(args.threads, args.device)
    device = torch.device(args.device)
    cfg = ReproduceConfig(seed=args.seed, train_subset=args.train_subset)
    train, test = load_mnist(args.data_dir, train_subset=args.train_subset, test_subset=args.held_out,
                             seed=args.seed, download=False)
    train, test = train.to(device), test.to(device)
    torch.manual_seed(args.seed)
    base = VAE(*cfg.start, capacity=cfg.target, device=device)
    opt = Adam(base.parameters(), lr=cfg.lr)
    base.attach_optimizer(opt)
    data_gen = torch.Generator().manual_seed(args.seed + 2)
    noise = torch.Generator(device=device).manual_seed(args.seed + 3)
    for _ in range(args.epochs):
        train_epoch(base, opt, train, batch_size=cfg.batch_size, samples=cfg.samples, data_generator=data_gen,
                    noise_generator=noise)
    before = evaluate_loss(base, test, cfg.samples, seed=12345)["loss"]
    print(f"pretrained {args.epochs} epochs on {train.shape[0]} images at 32/16: held-out loss {before:.2f}",
          flush=True)

    decreases: dict[str, list[float]] = {init: [] for init in INITS}
    jumps: dict[str, list[float]] = {init: [] for init in INITS}
    for seed in range(args.seeds):
        for init in INITS:
            model = copy.deepcopy(base)
            optimizer = Adam(model.parameters(), lr=cfg.lr)
            optimizer.load_state_dict(opt.state_dict())
            model.attach_optimizer(optimizer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                grow(model, optimizer, init, cfg, train, seed)
            jumps[init].append(evaluate_loss(model, test, cfg.samples, seed=12345)["loss"] - before)
            gen = torch.Generator().manual_seed(5000 + seed)
            ng = torch.Generator(device=device).manual_seed(6000 + seed)
            index = torch.randperm(train.shape[0], generator=gen)[: args.steps * cfg.batch_size]
            sub = train[index.to(device)]
            train_epoch(model, optimizer, sub, batch_size=cfg.batch_size, samples=cfg.samples,
                        data_generator=gen, noise_generator=ng)
            after = evaluate_loss(model, test, cfg.samples, seed=12345)["loss"]
            decreases[init].append(before - after)
        print(f"seed {seed}: " + ", ".join(f"{i} {decreases[i][-1]:.2f}" for i in INITS), flush=True)

    # ---- cost of one GradMax growth (both widths) against one training step -------------
    step_model = copy.deepcopy(base)
    step_opt = Adam(step_model.parameters(), lr=cfg.lr)
    xb = train[: cfg.batch_size]

    def train_step():
        loss = step_model.loss(xb, cfg.samples, noise)
        step_opt.zero_grad(set_to_none=False)
        loss.backward()
        step_opt.step()

    copies: dict[bool, list] = {True: [], False: []}

    def gradmax_growth(together: bool):
        def run():
            grow(copies[together].pop(), None, "gradmax", cfg, train, 0, together=together)

        return run

    for together in copies:  # a fresh copy per sample (a growth changes its model), made before timing
        copies[together] = [copy.deepcopy(base) for _ in range(args.reps + 3)]
    samples = common.time_interleaved({"training step": train_step, "GradMax growth": gradmax_growth(True),
                                       "GradMax growth, one width at a time": gradmax_growth(False)},
                                      device=args.device, warmup=1, reps=args.reps)
    common.finish(info)
    step_t, grow_t = common.median(samples["training step"]), common.median(samples["GradMax growth"])
    apart_t = common.median(samples["GradMax growth, one width at a time"])
    paired = common.paired_ratio(samples["GradMax growth"], samples["training step"])
    paired_apart = common.paired_ratio(samples["GradMax growth, one width at a time"], samples["training step"])
    rows = [[init, f"{statistics.mean(decreases[init]):.2f}",
             f"{statistics.pstdev(decreases[init]):.2f}", f"{statistics.mean(jumps[init]):+.3f}"] for init in INITS]
    notes = [
        f"Pretraining: {args.epochs} epochs at 32/16 on {train.shape[0]} training images (seed {args.seed}); "
        f"held-out loss before the growth {before:.2f} nats on {test.shape[0]} test images.",
        f"Growth 32/16 -> 64/32 (optimizer reset), then {args.steps} steps; {args.seeds} growth seeds per init; "
        f"gradient-guided closures on {GRADIENT_BATCHES} mini-batches of {cfg.batch_size}.",
    ]
    after_lines = [
        f"One GradMax growth (h1 and h2, one closure pass as a schedule event): {common.fmt_time(grow_t)}; one "
        f"training step (batch {cfg.batch_size}, L = {cfg.samples}, 32/16): {common.fmt_time(step_t)}; ratio "
        f"{grow_t / step_t:.2f} steps (goal: <= 3). One width at a time (two passes): {common.fmt_time(apart_t)}, "
        f"{apart_t / step_t:.2f} steps. Median over rounds of the per-round ratio: {paired:.2f} and "
        f"{paired_apart:.2f}.",
    ]
    common.report("bench_gradient_growth", args, info,
                  ["init", f"loss decrease after {args.steps} steps (nats, mean)", "spread (std)",
                   "loss jump at the growth (nats)"], rows, notes,
                  {"before": before, "decreases": decreases, "jumps": jumps, "timing": common.summarize(samples),
                   "ratio": grow_t / step_t, "ratio_one_width_at_a_time": apart_t / step_t,
                   "paired_ratio": paired, "paired_ratio_one_width_at_a_time": paired_apart, "epochs": args.epochs, "train_images": int(train.shape[0])},
                  after=after_lines)


if __name__ == "__main__":
    main()
