"""The study's MNIST VAE trained under FSDP2 while its encoder grows in place.

    torchrun --nproc-per-node 2 examples/fsdp_grow.py                 # CPU, gloo
    torchrun --nproc-per-node 2 examples/fsdp_grow.py --data PATH     # MNIST in torchvision's layout

On GPUs (one per process) the same command uses NCCL. Every rank holds half of every
Parameter, gradient and Adam moment (``fully_shard``); the encoder's hidden widths start
at 32/16 and gain 32/16 every ``--every`` epochs, as in the study, without re-wrapping
the model or rebuilding the optimizer. Each rank trains on its own part of the data; the
growth draws are the same on every rank (one seed), and every rank writes only the rows
it holds. At the end a sharded checkpoint is saved and loaded back into a fresh model.
Without MNIST (``--data`` not found) random binary images stand in, and it says so.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import growdense
from growdense import sharded
from growdense.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from growdense.models.vae import VAE


def images(path: str, n: int) -> tuple[torch.Tensor, str]:
    try:
        from growdense.experiments.data import load_mnist

        train, _ = load_mnist(path, train_subset=n, test_subset=1)
        return train, f"MNIST from {path}"
    except Exception:  # no MNIST there: random binary images of the same size
        g = torch.Generator().manual_seed(0)
        return (torch.rand(n, 784, generator=g) < 0.2).float(), "random binary images (MNIST not found)"


def build(device) -> VAE:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = VAE(32, 16, capacity=(256, 128), device=device)
    for layer in (model.enc1, model.enc2, model.mu_head, model.logvar_head, model.dec1, model.dec2, model.dec3):
        fully_shard(layer)
    fully_shard(model)
    return model


def local_bytes(model, optimizer) -> int:
    total = sum(sharded.local(p).numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(sharded.local(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="./data", help="folder holding MNIST/raw (torchvision's layout)")
    parser.add_argument("--images", type=int, default=4096, help="training images (all ranks together)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--every", type=int, default=2, help="grow every that many epochs")
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--samples", type=int, default=1, help="latent samples per image (the study: 20)")
    args = parser.parse_args()

    # FSDP2 warns that the VAE returns views (reshaped logits): the loss reads them out of place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    data, source = images(args.data, args.images)
    mine = data[rank::world].to(device)  # this rank's images

    model = build(device)
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-3)
    wiring = model.wiring
    wiring.optimizer = optimizer
    params = [id(p) for p in model.parameters()]
    growth = torch.Generator(device).manual_seed(1)  # the same on every rank
    sampling = torch.Generator(device).manual_seed(100 + rank)
    if rank == 0:
        print(f"{world} ranks ({'nccl, GPU' if cuda else 'gloo, CPU'}), {len(data)} images: {source}")
    for epoch in range(args.epochs):
        if epoch and epoch % args.every == 0:
            start = time.perf_counter()
            for name, step in (("h1", 32), ("h2", 16)):
                if wiring.width(name) + step <= wiring.capacity(name):
                    wiring.grow(name, step, init="he", generator=growth)
            grown = time.perf_counter() - start
            if rank == 0:
                print(f"epoch {epoch}: grew to h1={wiring.width('h1')}, h2={wiring.width('h2')} in {grown * 1e3:.1f} ms")
        total, count = torch.zeros(2, device=device, dtype=torch.float64), 0
        order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(epoch * 1000 + rank))
        for i in range(0, len(mine), args.batch):
            x = mine[order[i : i + args.batch].to(device)]
            optimizer.zero_grad()
            loss = model.loss(x, samples=args.samples, generator=sampling)
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item() * len(x), len(x)], device=device, dtype=torch.float64)
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: loss {total[0] / total[1]:.2f} nats/image, widths {wiring.widths()}")
    assert [id(p) for p in model.parameters()] == params  # the same Parameters throughout
    mib = torch.tensor([local_bytes(model, optimizer) / 2**20], device=device)
    everyone = [torch.zeros_like(mib) for _ in range(world)]
    dist.all_gather(everyone, mib)
    if rank == 0:
        print("parameters + Adam state per rank: " + ", ".join(f"{m.item():.2f} MiB" for m in everyone))

    folder = tempfile.mkdtemp() if rank == 0 else None
    box = [folder]
    dist.broadcast_object_list(box, src=0)
    save_sharded_checkpoint(box[0], model, optimizer, generators={"growth": growth}, wiring=wiring)
    fresh = build(device)
    fresh_optimizer = growdense.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh.wiring.optimizer = fresh_optimizer
    load_sharded_checkpoint(box[0], fresh, fresh_optimizer, generators={"growth": growth}, wiring=fresh.wiring)
    same = all(torch.equal(sharded.local(a), sharded.local(b)) for a, b in zip(model.parameters(), fresh.parameters()))
    if rank == 0:
        print(f"checkpoint resumed at widths {fresh.wiring.widths()}, parameters equal: {same}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
