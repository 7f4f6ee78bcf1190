"""Growth under DistributedDataParallel: 2 gloo processes on 127.0.0.1.

Both ranks train a small growing model on halves of a global batch, grow and shrink it
mid-training (same DDP object, same Parameters), and must (1) hold bit-identical
parameters after every step and (2) match a single-process run on the whole batch.

Tolerance for (2): float64 throughout; DDP averages the two half-batch gradients
(allreduce, then division by 2) where the single process averages over the whole batch, so
the sums run in another order. After a few Adam steps that is ~1e-15 relative; 1e-10 is far
below the effect of any real mismatch (a wrong growth or a rank using other weights moves
parameters by ~1e-2).

Teardown is deterministic (it used to abort about one run in five with ``terminate called
without an active exception``): ``DistributedDataParallel`` sits in a reference cycle, so
it outlived ``run_rank`` and kept the gloo process group (and its worker threads, holding
the last collective's tensors) alive through ``destroy_process_group`` until interpreter
shutdown, where those threads race the interpreter's teardown (a thread stopped there in
the middle of a C++ frame makes the C++ runtime abort). Each worker now waits for the other (barrier), collects the cycle, destroys the
group (which joins gloo's threads) and leaves with ``os._exit(0)``, skipping interpreter
shutdown altogether. Ranks meet through a file store in the test's temporary folder, so
there is no free-port race either.
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

from grow_helpers import TinyEncoder

WORLD = 2
STEPS = 6
GROW_AT = 2  # grow h1 and regrow h2 before this step
BATCH = 16
MODES = ("seed", "broadcast")


def data():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    return x, y


def build():
    torch.manual_seed(0)
    return TinyEncoder(d_in=6, h1=4, h2=4, latent=3, cap1=12, cap2=10, dtype=torch.float64)


def change_widths(wiring, generator):
    """Mid-training: grow h1 (He), cut h2 to its 2 largest-norm neurons, regrow 3 (split)."""
    wiring.grow("h1", 3, init="he", generator=generator)
    wiring.shrink("h2", 2, keep="norm")
    wiring.grow("h2", 3, init="split", generator=generator)


def train(model, forward, optimizer, wiring, generator, x, y, after_step=None):
    for step in range(STEPS):
        if step == GROW_AT:
            change_widths(wiring, generator)
        optimizer.zero_grad()
        loss = F.mse_loss(forward(x), y)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)


def worker(rank: int, store: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for mode in MODES:
            run_rank(rank, out_dir, mode)
        dist.barrier()  # neither rank tears down while the other is still in a collective
    finally:
        gc.collect()  # frees the DDP objects' cycle, their hold on the process group with it
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter shutdown racing any thread a library left behind


def run_rank(rank: int, out_dir: str, mode: str) -> None:
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params_before = [id(p) for p in ddp.parameters()]
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    if mode == "seed":  # every rank draws the same new weights
        wiring = model.wiring(optimizer)
        generator = torch.Generator().manual_seed(1)
    else:  # ranks draw different weights; rank 0's are broadcast
        wiring = model.wiring(optimizer, broadcast_from=0)
        generator = torch.Generator().manual_seed(1 + 1000 * rank)
    x, y = data()
    half = BATCH // WORLD
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]

    def check_identical(step):
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        if not torch.equal(gathered[0], gathered[1]):
            raise AssertionError(f"ranks differ after step {step}")

    train(model, ddp, optimizer, wiring, generator, xs, ys, after_step=check_identical)
    assert [id(p) for p in ddp.parameters()] == params_before
    assert wiring.widths() == {"h1": 7, "h2": 5}
    torch.save(model.state_dict(), os.path.join(out_dir, f"{mode}-rank{rank}.pt"))


def single_process():
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data()
    train(model, model, optimizer, model.wiring(optimizer), torch.Generator().manual_seed(1), x, y)
    return model.state_dict()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Runs both modes in one pair of processes (process start-up dominates the cost)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return {
        mode: [torch.load(out / f"{mode}-rank{r}.pt", weights_only=True) for r in range(WORLD)] for mode in MODES
    }


@pytest.mark.parametrize("mode", MODES)
def test_ddp_growth_matches_single_process(ddp_results, mode):
    ranks = ddp_results[mode]
    reference = single_process()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ranks[0][key], ranks[1][key]), key
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-10, atol=1e-10, msg=key)
        else:
            assert ranks[0][key] == ranks[1][key] == value, key
