"""A growth event under FSDP2, in place, against rebuilding and resharding; per-rank memory against DDP.

Two gloo processes on the CPU (or ``--nproc`` of them). The model: an MLP
``d_in -> h1 -> h2 -> out`` of GrowLinears at capacities ``--cap1``/``--cap2``, every layer
and the root ``fully_shard``'ed, trained with ``growdense.optim.Adam`` (its state exists).
One event grows h1 and h2 by ``--step`` neurons each. Sides, interleaved round by round,
each timed between two barriers (the event is over when every rank is done):

- ``growdense``: ``Wiring.grow("h1")``, ``grow("h2")`` on the sharded model (each rank
  writes its own rows of the new slices and Adam's state; the ranks first check they
  agree). Nothing is allocated but the new slice's draw; the local shards keep their
  storage (checked).
- ``rebuild``: what a library without in-place growth does under FSDP2: gather every
  Parameter and Adam moment (``full_tensor``), build the model at the new widths, copy the
  old weights into it and draw He values for the new rows and columns, ``fully_shard`` it
  again, build a new Adam and give it the old moments padded with zeros for the new
  neurons (each rank copies its rows).

Also printed: per-rank bytes of parameters + Adam state (local shards) under FSDP2,
against DDP's (every rank holds all of them), at the capacities.

    python benchmarks/bench_fsdp.py                     # 2 processes, gloo, CPU
    python benchmarks/bench_fsdp.py --rounds 9 --json benchmarks/results/fsdp.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import growdense  # noqa: E402
from growdense import GrowLinear, Wiring, sharded  # noqa: E402


class MLP(nn.Module):
    def __init__(self, d_in, h1, h2, d_out, cap1, cap2):
        super().__init__()
        self.l1 = GrowLinear(d_in, h1, capacity_out=cap1, activation="relu")
        self.l2 = GrowLinear(h1, h2, capacity_in=cap1, capacity_out=cap2, activation="relu")
        self.l3 = GrowLinear(h2, d_out, capacity_in=cap2)

    def forward(self, x):
        return self.l3(self.l2(self.l1(x)))


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer)
    fully_shard(model)
    return model


def trained(args, h1, h2, cap1, cap2):
    torch.manual_seed(0)
    model = shard(MLP(args.d_in, h1, h2, args.d_out, cap1, cap2))
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model, optimizer


def local_bytes(model, optimizer) -> int:
    total = sum(sharded.local(p).numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(sharded.local(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def full_bytes(model, optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


@torch.no_grad()
def rebuild(args, model, optimizer, h1, h2, generator):
    """Gather, build at the new widths, copy, reshard, new Adam with padded moments."""
    names = ("l1", "l2", "l3")
    old = {n: getattr(model, n) for n in names}
    weights = {n: (old[n].weight.full_tensor(), old[n].bias.full_tensor()) for n in names}
    moments = {}
    for n in names:
        for pname in ("weight", "bias"):
            state = optimizer.state[getattr(old[n], pname)]
            moments[(n, pname)] = {k: v.full_tensor() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}
            moments[(n, pname)]["step"] = state["step"].clone()
    a1, a2 = old["l1"].out_features, old["l2"].out_features
    new = MLP(args.d_in, h1, h2, args.d_out, h1, h2)  # exactly the new size
    blocks = {"l1": (a1, args.d_in), "l2": (a2, a1), "l3": (args.d_out, a2)}
    for n in names:
        layer = getattr(new, n)
        rows, cols = blocks[n]
        std = math.sqrt(2.0 / layer.in_features)
        layer.weight.normal_(0.0, std, generator=generator)
        layer.weight[:rows, :cols] = weights[n][0][:rows, :cols]
        layer.bias.zero_()
        layer.bias[:rows] = weights[n][1][:rows]
    shard(new)
    new_optimizer = growdense.optim.Adam(new.parameters(), lr=1e-3)
    for n in names:
        for pname in ("weight", "bias"):
            p = getattr(getattr(new, n), pname)
            saved = moments[(n, pname)]
            state = new_optimizer.state[p]
            state["step"] = saved["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                padded = torch.zeros(p.shape)
                src = saved[key]
                padded[tuple(slice(0, min(a, b)) for a, b in zip(src.shape, p.shape))] = src[
                    tuple(slice(0, min(a, b)) for a, b in zip(src.shape, p.shape))
                ]
                value = torch.zeros_like(p)
                lo_hi = sharded.local_ranges(p)
                sharded.local(value).copy_(padded[tuple(slice(a, b) for a, b in lo_hi)])
                state[key] = value
    return new, new_optimizer


def worker(rank, world, store, args, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        times = {"growdense": [], "rebuild": []}
        h1, h2 = args.h1, args.h2
        for r in range(args.rounds):
            sides = ["growdense", "rebuild"] if r % 2 == 0 else ["rebuild", "growdense"]
            for side in sides:
                generator = torch.Generator().manual_seed(5)
                if side == "growdense":
                    model, optimizer = trained(args, h1, h2, args.cap1, args.cap2)
                    wiring = Wiring.chain([model.l1, model.l2, model.l3], optimizer=optimizer)
                    before = [sharded.local(p).untyped_storage().data_ptr() for p in model.parameters()]
                    dist.barrier()
                    start = time.perf_counter()
                    wiring.grow("h1", args.step, generator=generator)
                    wiring.grow("h2", args.step, generator=generator)
                    dist.barrier()
                    elapsed = time.perf_counter() - start
                    assert [sharded.local(p).untyped_storage().data_ptr() for p in model.parameters()] == before
                else:
                    model, optimizer = trained(args, h1, h2, h1, h2)  # allocated at today's widths
                    dist.barrier()
                    start = time.perf_counter()
                    model, optimizer = rebuild(args, model, optimizer, h1 + args.step, h2 + args.step, generator)
                    dist.barrier()
                    elapsed = time.perf_counter() - start
                times[side].append(elapsed)
                del model, optimizer
                gc.collect()
        model, optimizer = trained(args, args.cap1, args.cap2, args.cap1, args.cap2)
        memory = {"fsdp": local_bytes(model, optimizer), "ddp": full_bytes(model, optimizer)}
        if rank == 0:
            torch.save({"times": times, "memory": memory}, out)
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--d-in", type=int, default=784)
    parser.add_argument("--d-out", type=int, default=40)
    parser.add_argument("--h1", type=int, default=512)
    parser.add_argument("--h2", type=int, default=256)
    parser.add_argument("--cap1", type=int, default=1024)
    parser.add_argument("--cap2", type=int, default=512)
    parser.add_argument("--step", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    out = os.path.join(folder, "result.pt")
    mp.spawn(worker, args=(args.nproc, os.path.join(folder, "store"), args, out), nprocs=args.nproc, join=True)
    result = torch.load(out, weights_only=True)
    grow = statistics.median(result["times"]["growdense"])
    rebuild_ = statistics.median(result["times"]["rebuild"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; {args.nproc} ranks (gloo), 1 thread each; torch {torch.__version__}")
    print(f"model {args.d_in}->{args.h1}->{args.h2}->{args.d_out}, capacities {args.cap1}/{args.cap2}; "
          f"one event grows h1 and h2 by {args.step}; median of {args.rounds} interleaved rounds")
    print(f"| side | growth event (ms) | ratio to growdense |\n|---|---:|---:|")
    print(f"| growdense (in place) | {grow * 1e3:.2f} | 1.00x |")
    print(f"| rebuild and reshard | {rebuild_ * 1e3:.2f} | {rebuild_ / grow:.2f}x |")
    mem = result["memory"]
    print(f"per-rank parameters + Adam state at capacity: FSDP2 {mem['fsdp'] / 2**20:.2f} MiB, "
          f"DDP {mem['ddp'] / 2**20:.2f} MiB: {mem['fsdp'] / mem['ddp']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu": cpu, "torch": torch.__version__, "growdense_s": result["times"]["growdense"],
                       "rebuild_s": result["times"]["rebuild"], "memory_bytes": mem}, f, indent=1)


if __name__ == "__main__":
    main()
