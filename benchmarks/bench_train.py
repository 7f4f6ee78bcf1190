"""End-to-end training throughput of the study's Approach 1: growdense against reallocation.

Approach 1: the encoder's hidden widths start at 32/16 and gain 32/16 at every growth
until 256/128. Both sides train the same architecture on the same MNIST images, in the
same order, with batch 128, L latent samples per image (the study: 20), Adam (lr 1e-3)
and the same seed:

- ``growdense``: ``growdense.models.VAE`` (every layer a GrowLinear; h1/h2 allocated at
  256/128), growth in place through ``model.wiring`` with the optimizer attached (the
  new slices' Adam moments are zeroed, the rest kept), optimizer ``growdense.optim.Adam``.
- ``reallocate``: ``benchmarks/realloc_vae.py``: nn.Linear layers replaced by larger
  ones at each growth (weights copied, new rows/columns He-initialised) and a new
  ``torch.optim.Adam`` (moments lost), as the study did.

The two sides run interleaved step by step in one process (A, B, B, A, ...), so load
on the machine hits both alike; each step (zero_grad, forward, backward, step) is timed
on its own, and each growth event too. Images per second of an epoch = images / the
sum of that epoch's step times. To run in minutes, it uses a training subset, fewer
epochs and a growth every ``--every`` epochs (the study: 60,000 images, 200 epochs,
growth every 25): the table says which.

    python benchmarks/bench_train.py                  # CPU: 4,096 images, 8 epochs, growth every epoch
    python benchmarks/bench_train.py --device cuda --train-subset 60000
    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --peers [--threads 1]   # growdense fp32/bf16 against plain PyTorch peers
                                                             # and the step's GEMM floor
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from realloc_vae import ReallocVAE, negative_elbo  # noqa: E402

from growdense.models.vae import VAE  # noqa: E402

try:
    from growdense.optim import Adam as GrowAdam  # noqa: E402
except ImportError:  # pragma: no cover
    GrowAdam = torch.optim.Adam

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.0  # growdense throughput >= 1.0x the reallocating one (CPU)


def load_images(args) -> tuple[torch.Tensor, str]:
    """(N, 784) training images in [0, 1] and where they came from."""
    try:
        from growdense.experiments.data import load_mnist

        train, _ = load_mnist(args.data_dir, train_subset=args.train_subset, test_subset=None, seed=args.seed)  # the test set is not used
        return train, f"MNIST training subset of {len(train)} images (seed {args.seed})"
    except Exception as error:  # noqa: BLE001 - any failure to read MNIST: synthetic data instead
        if not args.quick:
            raise
        g = torch.Generator().manual_seed(args.seed)
        n = args.train_subset or 512
        return torch.rand(n, 784, generator=g), f"synthetic: {n} uniform random images ({type(error).__name__})"


def warmup_steps(epoch: int, steps: list) -> int:
    """Steps left out of an epoch's throughput: the first 3 of the run (warm-up)."""
    return 3 if epoch == 0 and len(steps) > 6 else 0


class Side:
    """One model, its optimizer and its growth, as the training loop sees it."""

    def __init__(self, name: str, model, make_opt, grow) -> None:
        self.name, self.model, self._make_opt, self._grow = name, model, make_opt, grow
        self.opt = make_opt(model)
        self.step_times: list[list[float]] = []
        self.growth_times: list[float] = []
        self.losses: list[float] = []

    def grow(self) -> None:
        self.opt = self._grow(self.model, self.opt) or self.opt


PEER_GOALS = {"best peer": 3.0, "plain autocast bf16": 2.0, "plain fp32": 3.5}
# growdense float32 against its own floor and the float32 peers (issue: a step close to its GEMM floor).
FLOOR_GOAL = 1.2  # growdense fp32 step <= 1.2x the GEMM floor
FP32_PEER_GOAL = 1.3  # growdense fp32 step >= 1.3x faster than the best float32 peer
FP32_PEERS = ("plain fp32", "plain fp32 fused Adam", "plain compile fp32")
FP32_OURS = ("growdense fp32", "growdense fp32 fused Adam")  # the goals take the faster one


def study_products(batch: int, samples: int, h1: int = 256, h2: int = 128, latent: int = 20,
                   decoder=(128, 256), image: int = 784) -> list[tuple[int, int, int, bool]]:
    """The study VAE's layers as GEMMs: ``(rows, in, out, input needs a gradient)`` per layer."""
    rows_dec = samples * batch
    return [
        (batch, image, h1, False),  # enc1: the images need no gradient
        (batch, h1, h2, True),
        (batch, h2, latent, True),  # mean head
        (batch, h2, latent, True),  # log-variance head
        (rows_dec, latent, decoder[0], True),
        (rows_dec, decoder[0], decoder[1], True),
        (rows_dec, decoder[1], image, True),
    ]


def gemm_floor_step(batch: int, samples: int, device: str, seed: int):
    """The step's matrix products alone: every forward and backward GEMM, float32, into out= buffers.

    Forward ``y = x W^T`` per layer; backward ``dW = g^T x`` per layer and ``dx = g W``
    where the layer's input needs a gradient. The operands are random and allocated once;
    no bias, activation, loss, sampling or optimizer: the floor a step cannot go under
    with these GEMMs.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    work = []
    for rows, n_in, n_out, need_dx in study_products(batch, samples):
        t = dict(device=device, generator=g)
        x, w, gy = torch.randn(rows, n_in, **t), torch.randn(n_out, n_in, **t), torch.randn(rows, n_out, **t)
        y, dw = torch.empty(rows, n_out, device=device), torch.empty(n_out, n_in, device=device)
        dx = torch.empty(rows, n_in, device=device) if need_dx else None
        work.append((x, w, gy, y, dw, dx))

    def step(_xb):
        for x, w, _, y, _, _ in work:
            torch.mm(x, w.t(), out=y)
        for x, w, gy, _, dw, dx in reversed(work):
            torch.mm(gy.t(), x, out=dw)
            if dx is not None:
                torch.mm(gy, w, out=dx)

    return step


def peer_sides(args, device: str) -> dict:
    """Training steps of the study's fixed 256/128 VAE as a user would write them.

    Every side has its own model (same seed), optimizer and noise stream; a call runs one
    step (zero_grad, forward with L samples, loss, backward, Adam) on the next batch.
    The ``GEMM floor`` row runs the step's matrix products alone.
    """
    L = args.samples
    autocast = lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)  # noqa: E731

    def plain(name: str, amp: bool, compiled: bool, fused: bool = False):
        torch.manual_seed(args.seed)
        model = ReallocVAE(256, 128, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, **({"fused": True} if fused else {}))

        def loss_of(xb):
            return negative_elbo(xb, *model(xb, L)).mean()

        fn = torch.compile(loss_of) if compiled else loss_of

        def step(xb):
            opt.zero_grad()
            if amp:
                with autocast():
                    loss = fn(xb)
            else:
                loss = fn(xb)
            loss.backward()
            opt.step()
            return loss

        return step

    def grow(name: str, amp: bool, compiled: bool = False, fused: bool = False):
        torch.manual_seed(args.seed)
        model = VAE(256, 128, capacity=(256, 128), device=device)
        opt = GrowAdam(model.parameters(), lr=args.lr, **({"fused": True} if fused else {}))
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        loss_of = torch.compile(model.loss) if compiled else model.loss

        def step(xb):
            opt.zero_grad()
            if amp:
                with autocast():
                    loss = loss_of(xb, L, gen)
            else:
                loss = loss_of(xb, L, gen)
            loss.backward()
            opt.step()
            return loss

        return step

    sides = {
        "GEMM floor fp32": gemm_floor_step(args.batch_size, L, device, args.seed),
        "plain fp32": plain("plain fp32", False, False),
        "plain fp32 fused Adam": plain("plain fp32 fused Adam", False, False, fused=True),
        "plain compile fp32": plain("plain compile fp32", False, True),
        "plain autocast bf16": plain("plain autocast bf16", True, False),
        "plain compile + autocast bf16": plain("plain compile + autocast bf16", True, True),
        "growdense fp32": grow("growdense fp32", False),
        "growdense fp32 fused Adam": grow("growdense fp32 fused Adam", False, fused=True),
        "growdense compile fp32": grow("growdense compile fp32", False, True),
        "growdense bf16": grow("growdense bf16", True),
    }
    if getattr(args, "no_compile", False):
        sides = {k: v for k, v in sides.items() if "compile" not in k}
    if getattr(args, "fp32_only", False):
        sides = {k: v for k, v in sides.items() if "bf16" not in k}
    return sides


def run_peers(args) -> int:
    """``--peers``: step medians of growdense against the peers a user would pick and the GEMM floor."""
    device = args.device
    info = common.setup(args.threads, device)
    if args.keep_freed_memory:
        from growdense.experiments.training import keep_freed_memory

        info["keep_freed_memory"] = keep_freed_memory()
    train, data_note = load_images(args)
    train = train.to(device)
    steps = peer_sides(args, device)
    batches = [train[i : i + args.batch_size] for i in range(0, train.shape[0] - args.batch_size + 1, args.batch_size)]
    cursor = {name: 0 for name in steps}

    def call(name):
        def run():
            xb = batches[cursor[name] % len(batches)]
            cursor[name] += 1
            steps[name](xb)

        return run

    reps = 5 if args.quick else args.reps
    samples = common.time_interleaved({name: call(name) for name in steps}, device=device, warmup=3, reps=reps)
    common.finish(info)
    med = {name: common.median(xs) for name, xs in samples.items()}
    ours32 = min((n for n in FP32_OURS if n in samples), key=lambda n: med[n])
    gd32, floor = samples[ours32], samples["GEMM floor fp32"]
    bf16 = "growdense bf16" in samples
    gd = samples["growdense bf16"] if bf16 else gd32
    peers = [n for n in ("plain fp32", "plain autocast bf16", "plain compile + autocast bf16") if n in samples]
    best = min(peers, key=lambda n: med[n])
    ratios = {name: common.paired_ratio(samples[name], gd) for name in samples}
    over_floor = {name: common.paired_ratio(samples[name], floor) for name in samples}
    goals = {
        "best peer": (best, PEER_GOALS["best peer"]),
        "plain autocast bf16": ("plain autocast bf16", PEER_GOALS["plain autocast bf16"]),
        "plain fp32": ("plain fp32", PEER_GOALS["plain fp32"]),
    } if bf16 else {}
    steps_per_epoch = 60000 // args.batch_size
    rows = [[name, common.fmt_time(med[name]), f"{common.spread(samples[name]):.2f}",
             f"{med[name] * steps_per_epoch:.1f} s", f"{over_floor[name]:.2f}x"]
            + ([f"{ratios[name]:.2f}x"] if bf16 else []) for name in samples]
    verdicts, goal_lines = {}, []
    for label, (name, goal) in goals.items():
        met = ratios[name] >= goal
        verdicts[label] = {"against": name, "ratio": ratios[name], "goal": goal, "met": bool(met)}
        goal_lines.append(f"Goal: growdense bf16 >= {goal}x {label} ({name}): {ratios[name]:.2f}x, "
                          f"{'met' if met else 'MISSED'}.")
    # float32: growdense against its GEMM floor and against the best float32 peer
    fp32_peers = [n for n in FP32_PEERS if n in samples]
    best32 = min(fp32_peers, key=lambda n: med[n])
    speedup32 = common.paired_ratio(samples[best32], gd32)
    floor_met = over_floor[ours32] <= FLOOR_GOAL
    peer_met = speedup32 >= FP32_PEER_GOAL
    verdicts["fp32 GEMM floor"] = {"side": ours32, "against": "GEMM floor fp32", "ratio": over_floor[ours32],
                                   "goal": FLOOR_GOAL, "met": bool(floor_met)}
    verdicts["fp32 best peer"] = {"side": ours32, "against": best32, "ratio": speedup32, "goal": FP32_PEER_GOAL,
                                  "met": bool(peer_met)}
    goal_lines += [
        f"Goal: growdense fp32 <= {FLOOR_GOAL}x its GEMM floor ({ours32}): {over_floor[ours32]:.2f}x, "
        f"{'met' if floor_met else 'MISSED'}.",
        f"Goal: growdense fp32 ({ours32}) >= {FP32_PEER_GOAL}x faster than the best fp32 peer ({best32}): "
        f"{speedup32:.2f}x, {'met' if peer_met else 'MISSED'}.",
    ]
    common.report(
        "bench_train-peers", args, info,
        ["side", "median step", "IQR/median", "epoch (steps)", "x GEMM floor"] + (["growdense bf16 is"] if bf16 else []),
        rows,
        [f"The study's VAE at 256/128, batch {args.batch_size}, L = {args.samples}, Adam lr {args.lr}, {data_note}; "
         f"{reps} interleaved rounds after 3 warm-up rounds, medians. 'epoch' = 468 steps x the median step "
         "(60,000 images, steps only). 'x GEMM floor' = median over rounds of (side's step / the GEMM floor's): "
         "the floor runs the step's matrix products alone (every forward and backward GEMM, float32, into "
         "out= buffers). 'growdense bf16 is' = median over rounds of (side's step / growdense bf16's step). "
         "'compile' sides: torch.compile (inductor) of the loss function; growdense's of `model.loss`."],
        {"summary": common.summarize(samples), "ratios": ratios, "over_gemm_floor": over_floor, "goals": verdicts,
         "sizes": {"batch": args.batch_size, "samples_L": args.samples, "h1": 256, "h2": 128}},
        after=goal_lines, tag=f"{torch.get_num_threads()}threads",
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--peers", action="store_true",
                        help="instead of Approach 1: step times of the fixed 256/128 VAE, growdense fp32/bf16 "
                             "against plain PyTorch fp32, under autocast bf16, and compiled + autocast")
    parser.add_argument("--no-compile", action="store_true",
                        help="--peers: leave out the torch.compile sides (their compilation takes minutes)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="--peers: raise glibc's mmap/trim thresholds first, as `growdense reproduce`'s "
                             "training loop does (process-wide: every side runs with it)")
    parser.add_argument("--fp32-only", action="store_true",
                        help="--peers: leave out the bfloat16 sides (slow on CPUs without native bfloat16 GEMMs)")
    parser.add_argument("--reps", type=int, default=30, help="--peers: interleaved rounds (default %(default)s)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding MNIST/raw (default: %(default)s)")
    parser.add_argument("--train-subset", type=int, default=None, help="training images (default 4096)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 8: the 7 growths and one more)")
    parser.add_argument("--every", type=int, default=1, help="epochs between growths (default %(default)s)")
    parser.add_argument("--samples", type=int, default=20, help="L, latent samples per image (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_subset = args.train_subset or 256
        args.epochs = args.epochs or 3
        args.samples = min(args.samples, 2)
    args.train_subset = args.train_subset or 4096
    args.epochs = args.epochs or 8
    if args.peers:
        return run_peers(args)
    device = args.device
    info = common.setup(args.threads, device)
    train, data_note = load_images(args)
    train = train.to(device)
    start, step, target = (32, 16), (32, 16), (256, 128)
    growth_epochs = [e for e in range(args.every, args.epochs, args.every)][: (target[0] - start[0]) // step[0]]

    def growdense_side() -> Side:
        torch.manual_seed(args.seed)
        model = VAE(*start, capacity=target, device=device)
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)

        def make_opt(m):
            opt = GrowAdam(m.parameters(), lr=args.lr)
            m.attach_optimizer(opt)
            return opt

        def grow(m, opt):
            m.wiring.grow("h1", step[0], init="he", generator=gen)
            m.wiring.grow("h2", step[1], init="he", generator=gen)

        return Side("growdense", model, make_opt, grow)

    def realloc_side() -> Side:
        torch.manual_seed(args.seed)
        model = ReallocVAE(*start, device=device)
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)

        def make_opt(m):
            return torch.optim.Adam(m.parameters(), lr=args.lr)

        def grow(m, opt):
            m.grow(*step, generator=gen)
            return make_opt(m)  # the optimizer is rebuilt: Adam's moments are lost

        return Side("reallocate", model, make_opt, grow)

    sides = [growdense_side(), realloc_side()]
    data_gen = torch.Generator().manual_seed(args.seed + 2)
    noise = {s.name: torch.Generator(device=device).manual_seed(args.seed + 3) for s in sides}
    n = train.shape[0]
    widths = []

    def one_step(side: Side, xb: torch.Tensor) -> float:
        common.sync(device)
        t0 = time.perf_counter()
        side.opt.zero_grad()
        logits, mu, logvar = side.model(xb, args.samples, noise[side.name])
        loss = negative_elbo(xb, logits, mu, logvar).mean()
        loss.backward()
        side.opt.step()
        common.sync(device)
        elapsed = time.perf_counter() - t0
        side.losses.append(loss.item())
        return elapsed

    # Warm-up: steps on copies would shift the RNG streams; instead the run's first 3
    # steps are left out of epoch 0's throughput (they still count in the totals).
    round_no = 0
    for epoch in range(args.epochs):
        if epoch in growth_epochs:
            for side in sides:
                common.sync(device)
                t0 = time.perf_counter()
                side.grow()
                common.sync(device)
                side.growth_times.append(time.perf_counter() - t0)
        widths.append(sides[0].model.widths())
        assert sides[1].model.widths() == widths[-1]
        perm = torch.randperm(n, generator=data_gen).to(device)
        for side in sides:
            side.step_times.append([])
        for begin in range(0, n, args.batch_size):
            xb = train[perm[begin : begin + args.batch_size]]
            order = sides if round_no % 2 == 0 else sides[::-1]
            round_no += 1
            for side in order:
                side.step_times[-1].append(one_step(side, xb))
        g, r = (s.step_times[-1] for s in sides)
        skip = warmup_steps(epoch, g)
        imgs = n * (len(g) - skip) / len(g)
        print(
            f"epoch {epoch} widths {widths[-1][0]}/{widths[-1][1]}: growdense {imgs / sum(g[skip:]):.0f} img/s, "
            f"reallocate {imgs / sum(r[skip:]):.0f} img/s, step ratio {common.paired_ratio(r[skip:], g[skip:]):.3f}",
            flush=True,
        )
    common.finish(info)

    gd, rl = sides
    rows = []
    for epoch in range(args.epochs):
        g, r = gd.step_times[epoch], rl.step_times[epoch]
        skip = warmup_steps(epoch, g)
        g_t, r_t = sum(g[skip:]), sum(r[skip:])
        imgs = n * (len(g) - skip) / len(g)
        rows.append({
            "epoch": epoch, "h1": widths[epoch][0], "h2": widths[epoch][1], "grew": epoch in growth_epochs,
            "growdense_images_per_s": imgs / g_t, "reallocate_images_per_s": imgs / r_t,
            "throughput_ratio": r_t / g_t,
            "median_step_ratio": common.paired_ratio(r[skip:], g[skip:]),
            "growdense_median_step_s": common.median(g[skip:]), "reallocate_median_step_s": common.median(r[skip:]),
        })
    total_g = sum(sum(e) for e in gd.step_times) + sum(gd.growth_times)
    total_r = sum(sum(e) for e in rl.step_times) + sum(rl.growth_times)
    summary = {
        "images": n, "epochs": args.epochs, "growth_epochs": growth_epochs, "batch_size": args.batch_size,
        "samples_L": args.samples, "lr": args.lr, "seed": args.seed, "data": data_note,
        "growdense_total_s": total_g, "reallocate_total_s": total_r,
        "throughput_ratio_total": total_r / total_g,
        "growdense_images_per_s_total": n * args.epochs / total_g,
        "reallocate_images_per_s_total": n * args.epochs / total_r,
        "growdense_growth_s": gd.growth_times, "reallocate_growth_s": rl.growth_times,
        "final_loss_growdense": sum(gd.losses[-10:]) / min(10, len(gd.losses)),
        "final_loss_reallocate": sum(rl.losses[-10:]) / min(10, len(rl.losses)),
    }
    if not device.startswith("cuda"):  # the goal is for the CPU; on a GPU the figure is reported
        summary["goal"] = f"growdense throughput ≥ {GOAL}x reallocate (CPU)"
        summary["goal_met"] = bool(summary["throughput_ratio_total"] >= GOAL)

    header = ["epoch", "h1/h2", "growdense img/s", "reallocate img/s", "ratio", "median step ratio"]
    table = [[r["epoch"], f"{r['h1']}/{r['h2']}" + (" (grew)" if r["grew"] else ""),
              f"{r['growdense_images_per_s']:.0f}", f"{r['reallocate_images_per_s']:.0f}",
              f"{r['throughput_ratio']:.3f}", f"{r['median_step_ratio']:.3f}"] for r in rows]
    table.append(["all (steps + growths)", "", f"{summary['growdense_images_per_s_total']:.0f}",
                  f"{summary['reallocate_images_per_s_total']:.0f}", f"**{summary['throughput_ratio_total']:.3f}**", ""])
    common.report(
        "bench_train", args, info, header, table,
        [f"Approach 1 (32/16 → 256/128, +32/+16 per growth), {data_note}, {args.epochs} epochs, growth at epochs "
         f"{growth_epochs} (the study: 60,000 images, 200 epochs, growth every 25), batch {args.batch_size}, "
         f"L = {args.samples}, Adam lr {args.lr}, seed {args.seed}. Steps interleaved growdense/reallocate; "
         "ratio = growdense throughput / reallocate throughput (> 1: growdense faster)."],
        {"summary": summary, "epochs": rows},
        after=[f"Growth events: growdense {', '.join(common.fmt_time(t) for t in gd.growth_times) or '-'}; "
               f"reallocate {', '.join(common.fmt_time(t) for t in rl.growth_times) or '-'}. "
               f"Final training loss (mean of the last 10 steps): growdense {summary['final_loss_growdense']:.2f}, "
               f"reallocate {summary['final_loss_reallocate']:.2f} nats."
               + (f" Goal (≥ {GOAL}x): {'met' if summary['goal_met'] else 'MISSED'}." if "goal" in summary else "")],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
