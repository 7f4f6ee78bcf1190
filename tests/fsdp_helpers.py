"""Shared pieces of the FSDP2 tests: process start and clean teardown, models, a reference run.

Every multi-process test here keeps test_ddp.py's teardown: ranks meet through a file
store in the test's temporary folder, wait for each other (barrier), collect reference
cycles, destroy the process group and leave with ``os._exit`` (no interpreter shutdown
racing gloo's threads).
"""

from __future__ import annotations

import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from grow_helpers import TinyEncoder

WORLD = 2


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


def _entry(rank: int, fn, store: str, out_dir: str, world: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    code = 0
    try:
        fn(rank, out_dir)
        dist.barrier()  # neither rank tears down while the other is still in a collective
    except BaseException:  # reported through a file: mp.spawn sees only the exit code
        with open(os.path.join(out_dir, f"error-rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    finally:
        gc.collect()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(fn, out_dir, world: int = WORLD) -> None:
    """Run ``fn(rank, out_dir)`` in ``world`` gloo processes; raise with the first rank's traceback on failure."""
    out_dir = str(out_dir)
    try:
        mp.spawn(_entry, args=(fn, os.path.join(out_dir, "store"), out_dir, world), nprocs=world, join=True)
    except mp.ProcessRaisedException:
        raise
    except Exception as error:  # ProcessExitedException: find the traceback
        texts = []
        for r in range(world):
            path = os.path.join(out_dir, f"error-rank{r}.txt")
            if os.path.exists(path):
                texts.append(f"rank {r}:\n" + open(path).read())
        raise AssertionError("\n".join(texts) or str(error)) from None


def build(dtype=torch.float32) -> TinyEncoder:
    """h1 of capacity 12 (6 rows a rank), h2 of 10, heads of 3 rows (2 and 1 a rank: uneven shards)."""
    torch.manual_seed(0)
    return TinyEncoder(d_in=6, h1=4, h2=4, latent=3, cap1=12, cap2=10, dtype=dtype)


def shard(model, **kwargs):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.enc1, model.enc2, model.mu, model.logvar):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(42)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 6, generator=g, dtype=dtype)


def loss_of(model, x, y):
    return F.mse_loss(model(x), y)
