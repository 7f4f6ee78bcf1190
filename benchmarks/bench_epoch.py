"""One training epoch of ``growdense reproduce`` against a plain loop over the same model.

Does the reproduction's training loop cost more than its steps? Three sides train the
study's Fixed VAE (``growdense.models.VAE`` at 256/128, L latent samples per image, batch
128, Adam lr 1e-3) for whole epochs over the same images, each with its own copy of the
model (same seed):

- ``reproduce``: ``growdense.experiments.training.train_epoch``, the loop ``growdense
  reproduce`` runs (``growdense.optim.Adam``, losses kept on the device, read once per
  epoch);
- ``plain``: the loop a user writes: shuffle, slice, ``model.loss``, ``zero_grad``,
  ``backward``, ``step`` with ``torch.optim.Adam`` (at full capacity it computes what
  ``growdense.optim.Adam`` computes), nothing else;
- ``per-step .item()``: the plain loop plus reading each step's loss with ``.item()``
  (what the reproduction's loop did before: one device synchronisation per step);
With ``--peers``, two more sides:

- ``plain PyTorch``: the plain loop over the same VAE built of ``nn.Linear`` layers
  (``benchmarks/realloc_vae.py``) with ``torch.optim.Adam``: what the epoch costs without
  growdense;
- ``GEMM floor``: the step's matrix products alone (every forward and backward GEMM,
  float32, into out= buffers; ``bench_train.gemm_floor_step``), as many steps as an
  epoch has: the floor an epoch cannot go under with these GEMMs.

Epochs run interleaved (A, B, C, C, B, A, ...) after a warm-up epoch; the table gives
each side's median epoch time and the median over rounds of its ratio to ``plain``.

    python benchmarks/bench_epoch.py                     # all 60,000 MNIST images, 3 rounds
    python benchmarks/bench_epoch.py --images 12000 --threads 2
    python benchmarks/bench_epoch.py --quick
    python benchmarks/bench_epoch.py --peers             # and plain PyTorch and the GEMM floor
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bench_train import gemm_floor_step  # noqa: E402
from realloc_vae import ReallocVAE, negative_elbo  # noqa: E402

from growdense.experiments.training import train_epoch  # noqa: E402
from growdense.models.vae import VAE  # noqa: E402
from growdense.optim import Adam as GrowAdam  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def load_images(args) -> tuple[torch.Tensor, str]:
    """(N, 784) training images in [0, 1] and where they came from (synthetic with --quick
    when MNIST is not found: the timing does not depend on the pixel values)."""
    try:
        from growdense.experiments.data import load_mnist

        train, _ = load_mnist(args.data_dir, train_subset=args.images, test_subset=None, seed=args.seed)  # the test set is not used
        return train, f"MNIST, {len(train)} training images"
    except Exception as error:  # noqa: BLE001 - any failure to read MNIST
        if not args.quick:
            raise
        n = args.images or 512
        g = torch.Generator().manual_seed(args.seed)
        return torch.rand(n, 784, generator=g), f"synthetic: {n} uniform random images ({type(error).__name__})"


def make_model(device: str, seed: int) -> VAE:
    torch.manual_seed(seed)
    return VAE(256, 128, device=device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--images", type=int, default=None, help="training images per epoch (default all 60,000)")
    parser.add_argument("--rounds", type=int, default=None, help="timed epochs per side (default 3, --quick 2)")
    parser.add_argument("--samples", type=int, default=20, help="latent samples L per image (study: 20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--peers", action="store_true",
                        help="also time plain PyTorch (nn.Linear, torch.optim.Adam) and the GEMM floor")
    parser.add_argument("--data-dir", default=os.environ.get("GROWDENSE_MNIST_DIR", str(REPO.parent / "shared" / "data")),
                        help="folder holding MNIST/raw")
    args = parser.parse_args(argv)
    if args.quick and args.images is None:
        args.images = 1024
    rounds = args.rounds or (2 if args.quick else 3)

    info = common.setup(args.threads, args.device)
    train, data_note = load_images(args)
    train = train.to(args.device)
    n, bs, L = train.shape[0], args.batch_size, args.samples

    def reproduce_side():
        model = make_model(args.device, args.seed)
        opt = GrowAdam(model.parameters(), lr=1e-3)
        model.attach_optimizer(opt)
        data_g, noise_g = torch.Generator().manual_seed(1), torch.Generator(device=args.device).manual_seed(2)

        def epoch():
            losses = train_epoch(model, opt, train, batch_size=bs, samples=L, data_generator=data_g,
                                 noise_generator=noise_g)
            return losses.tolist()  # read once per epoch, as reproduce does

        return epoch

    def plain_side(read_each_step: bool):
        model = make_model(args.device, args.seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        data_g, noise_g = torch.Generator().manual_seed(1), torch.Generator(device=args.device).manual_seed(2)

        def epoch():
            perm = torch.randperm(n, generator=data_g).to(args.device)
            values = []
            for start in range(0, n, bs):
                xb = train[perm[start : start + bs]]
                loss = model.loss(xb, L, noise_g)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if read_each_step:
                    values.append(loss.item())
            return values

        return epoch

    def torch_side():
        torch.manual_seed(args.seed)
        model = ReallocVAE(256, 128, device=args.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        data_g = torch.Generator().manual_seed(1)

        def epoch():
            perm = torch.randperm(n, generator=data_g).to(args.device)
            for start in range(0, n, bs):
                xb = train[perm[start : start + bs]]
                loss = negative_elbo(xb, *model(xb, L)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        return epoch

    def floor_side():
        step = gemm_floor_step(bs, L, args.device, args.seed)

        def epoch():
            for _ in range(0, n, bs):
                step(None)

        return epoch

    fns = {"reproduce": reproduce_side(), "plain": plain_side(False), "per-step .item()": plain_side(True)}
    if args.peers:
        fns.update({"plain PyTorch": torch_side(), "GEMM floor": floor_side()})
    samples = common.time_interleaved(fns, device=args.device, warmup=1, reps=rounds)
    common.finish(info)

    plain = samples["plain"]
    rows = []
    for name, xs in samples.items():
        rows.append({"side": name, "median_epoch_s": common.median(xs), "epochs": len(xs), "samples_s": xs,
                     "images_per_s": n / common.median(xs), "ratio_to_plain": common.paired_ratio(xs, plain)})
    floor = samples.get("GEMM floor")
    for r in rows:
        if floor is not None:
            r["ratio_to_gemm_floor"] = common.paired_ratio(samples[r["side"]], floor)
    header = ["side", "epoch (median)", "images/s", "time ratio to plain"] + (["x GEMM floor"] if floor else [])
    table = [[r["side"], common.fmt_time(r["median_epoch_s"]), f"{r['images_per_s']:.0f}",
              f"**{r['ratio_to_plain']:.3f}**" if r["side"] == "reproduce" else f"{r['ratio_to_plain']:.3f}"]
             + ([f"{r['ratio_to_gemm_floor']:.2f}x"] if floor else [])
             for r in rows]
    common.report(
        "bench_epoch", args, info, header, table,
        [f"Fixed VAE 256/128 on {data_note}, batch {bs}, L = {L}, Adam lr 1e-3, float32, {args.device}. "
         f"Median of {rounds} interleaved epochs per side after 1 warm-up epoch each; ratio = median over rounds "
         "of the side's epoch time / plain's (1.000: the loop costs exactly its steps)"
         + ("; 'x GEMM floor' likewise against the epoch's matrix products alone." if floor else ".")],
        {"images": n, "batch_size": bs, "samples_L": L, "rounds": rounds, "data": data_note, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
