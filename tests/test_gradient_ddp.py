"""GradMax growth under DistributedDataParallel: 2 gloo processes (the pattern of test_ddp.py).

Each rank's closure sees its own half of the batch, so its statistics (and GradMax's new
weights) differ; with ``Wiring(broadcast_from=0)`` every rank receives rank 0's. Checked:
the ranks hold bit-identical parameters after every step, the Parameters stay the same
objects under the same DDP object, and rank 0's growth equals a single process growing the
same model from rank 0's half (float64; the same operations on the same values, so bit-equal
is expected, and 1e-12 allows only summation-order differences).
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from growdense import GrowthEvent, GrowthSchedule
from grow_helpers import TinyEncoder

WORLD = 2
STEPS = 4
GROW_AT = 2
BATCH = 16
SCHEDULE = GrowthSchedule({"h1": 4, "h2": 4}, [GrowthEvent(GROW_AT, grow_by={"h1": 3, "h2": 2})])


def data():
    g = torch.Generator().manual_seed(42)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randn(BATCH, 6, generator=g, dtype=torch.float64)


def build():
    torch.manual_seed(0)
    return TinyEncoder(d_in=6, h1=4, h2=4, latent=3, cap1=12, cap2=10, dtype=torch.float64)


def worker(rank: int, store: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        run_rank(rank, out_dir)
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_rank(rank: int, out_dir: str) -> None:
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params_before = [id(p) for p in ddp.parameters()]
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer, broadcast_from=0, optimizer_state="keep_global_step")
    x, y = data()
    half = BATCH // WORLD
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    for step in range(STEPS):
        # the closure runs the module itself (not the DDP wrapper: no backward follows it)
        SCHEDULE.apply(step, wiring, init="gradmax", closure=lambda: F.mse_loss(model(xs), ys), bias=0.1)
        if step == GROW_AT:
            torch.save(model.state_dict(), os.path.join(out_dir, f"grown-rank{rank}.pt"))
        optimizer.zero_grad()
        F.mse_loss(ddp(xs), ys).backward()
        optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        if not torch.equal(gathered[0], gathered[1]):
            raise AssertionError(f"ranks differ after step {step}")
        if step == GROW_AT - 1:
            torch.save(model.state_dict(), os.path.join(out_dir, f"before-rank{rank}.pt"))
    assert [id(p) for p in ddp.parameters()] == params_before
    assert wiring.widths() == {"h1": 7, "h2": 6}


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("gradmax_ddp")
    mp.spawn(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return out


def test_gradmax_growth_under_ddp_matches_rank0_single_process(ddp_out):
    grown = [torch.load(ddp_out / f"grown-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in grown[0]:
        if isinstance(grown[0][key], torch.Tensor):
            assert torch.equal(grown[0][key], grown[1][key]), key
    # a single process: the model as it was just before the growth, grown from rank 0's half
    model = build()
    model.load_state_dict(torch.load(ddp_out / "before-rank0.pt", weights_only=True))
    x, y = data()
    xs, ys = x[: BATCH // WORLD], y[: BATCH // WORLD]
    model.wiring().grow_many({"h1": 3, "h2": 2}, init="gradmax", closure=lambda: F.mse_loss(model(xs), ys), bias=0.1)
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(grown[0][key], value, rtol=1e-12, atol=1e-12, msg=key)
