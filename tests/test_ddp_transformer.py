"""A transformer grown under DistributedDataParallel: 2 gloo processes (the pattern of test_ddp.py).

The model is tests/transformer_helpers.py's pre-norm TinyGPT (float64, 2 blocks). Both
ranks train it on halves of a global batch and, mid-training, grow every width of it:
the residual stream (embedding, every norm, the attentions' model width, the FFNs, the
LM head), both FFN widths and both attentions' heads, twice, through one Wiring, with the
same optimizer and the same DDP object (no re-wrapping). Checked: the ranks hold
bit-identical parameters after every step; the Parameters stay the same objects with the
same storage; outside the active parts the weights, gradients and optimizer state stay
zero; the losses (averaged over the ranks) and the final parameters match one process
fed the whole batch.

Two modes, in one pair of processes (process start-up dominates the cost):

- ``"seed"``: ``DistributedDataParallel(model)`` with its defaults, ``torch.optim.AdamW``
  under ``optimizer_state="keep_global_step"``, every rank drawing the new weights from
  the same seed;
- ``"broadcast"``: ``DistributedDataParallel(model, gradient_as_bucket_view=True)``,
  ``growdense.optim.Adam`` under ``optimizer_state="keep"`` (each neuron counts its own
  steps; its ``zero_grad`` keeps ``.grad`` and zeroes its active block, in place in the
  bucket), ranks drawing different weights, rank 0's broadcast (``Wiring(broadcast_from=0)``).

What DDP needs: nothing special. ``find_unused_parameters`` stays False: every Parameter
takes part in every forward at every width (the modules compute on views of their
capacity tensors, so the whole tensor gets a gradient, zero outside the active part), and
the Parameters, their shapes and DDP's buckets never change, so DDP's reducer, built once,
stays valid. Bucket views are optional (both settings are run). The norms' ramp factors
are buffers, which DDP broadcasts from rank 0 at each forward; every rank advances them
the same way (``ramp_step`` after each step).

Tolerances: float64 throughout. DDP averages two half-batch gradients (allreduce, then
division by 2) where the single process averages over the whole batch, so sums run in
another order: ~1e-16 relative per step (measured: parameters within 8e-16, losses within
5e-16). 1e-12 is far below the effect of any real mismatch (a wrong growth, or a rank
stepping other weights, moves parameters and losses by ~1e-3 or more). One exception: the
key bias (the middle block of each ``in_proj_bias``) has a gradient that is zero in exact
arithmetic (adding one vector to every key shifts a query's scores by one constant, which
the softmax ignores), so both runs see rounding noise there (checked below 1e-14 in the
single process), and Adam turns a noise ``g`` into an update ``lr * g / (|g| + eps)``: up to
``lr * 1e-14 / 1e-8 = 1e-8`` per step (measured ~1e-11 in all). That block is compared within
``2 * STEPS * 1e-8``.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import growdense.optim
from growdense.norms import ramp_step
from transformer_helpers import CAPS, TinyGPT, assert_outside_zero

WORLD = 2
STEPS = 6
BATCH = 8  # sequences; each rank takes 4
LENGTH = 6
MODES = ("seed", "broadcast")
TOL = {"rtol": 1e-12, "atol": 1e-12}
LR = 1e-2
ADAM_EPS = 1e-8  # torch's default
KEY_BIAS_NOISE = 1e-14  # the largest key-bias gradient allowed (zero in exact arithmetic)
# step -> [(width, n, init, options)]: every width grows, at two steps.
GROWTH = {
    2: [
        ("stream", 4, "zero_out", {"ramp_steps": 2}),
        ("ffn0", 4, "he", {}),
        ("ffn1", 6, "zero_out", {}),
        ("heads0", 1, "he", {}),
        ("heads1", 2, "zero_out", {}),
    ],
    4: [
        ("stream", 4, "he", {}),
        ("ffn0", 8, "zero_out", {}),
        ("heads0", 1, "zero_out", {}),
    ],
}
FINAL = {"stream": 16, "ffn0": 24, "ffn1": 18, "heads0": 4, "heads1": 4}


def data():
    return torch.randint(0, 11, (BATCH, LENGTH + 1), generator=torch.Generator().manual_seed(42))


def build():
    torch.manual_seed(0)
    return TinyGPT(blocks=2, dtype=torch.float64)


def make_optimizer(mode, params):
    if mode == "seed":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.01), "keep_global_step"
    return growdense.optim.Adam(params, lr=LR), "keep"


def loss_fn(forward, toks):
    logits = forward(toks[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))


def train(model, forward, optimizer, wiring, generator, toks, after_step=None):
    """``STEPS`` steps, growing at the steps of GROWTH; returns the losses (``after_step`` may average them)."""
    losses = []
    for step in range(STEPS):
        for name, n, init, options in GROWTH.get(step, []):
            wiring.grow(name, n, init=init, generator=generator, **options)
        optimizer.zero_grad()
        loss = loss_fn(forward, toks)
        loss.backward()
        optimizer.step()
        ramp_step(model)
        losses.append(loss.detach())
        if after_step is not None:
            losses[-1] = after_step(step, losses[-1])
    return torch.stack(losses)


def worker(rank: int, store: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    # A timeout, so that a rank failing alone makes the other fail instead of waiting 30 minutes.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
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
    if mode == "seed":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        generator = torch.Generator().manual_seed(1)  # every rank draws the same new weights
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        generator = torch.Generator().manual_seed(1 + 1000 * rank)  # ranks differ; rank 0's are broadcast
    storage = [(id(p), p.data_ptr(), p.shape) for p in ddp.parameters()]
    optimizer, policy = make_optimizer(mode, ddp.parameters())
    wiring = model.wiring(optimizer, optimizer_state=policy, broadcast_from=None if mode == "seed" else 0)
    half = BATCH // WORLD
    toks = data()[rank * half : (rank + 1) * half]

    def after_step(step, loss):
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        if not torch.equal(gathered[0], gathered[1]):
            raise AssertionError(f"{mode}: ranks differ after step {step}")
        assert_outside_zero(model, optimizer)
        total = loss.clone()
        dist.all_reduce(total)  # the global batch's loss: the mean of two halves of equal size
        return total / WORLD

    losses = train(model, ddp, optimizer, wiring, generator, toks, after_step)
    assert [(id(p), p.data_ptr(), p.shape) for p in ddp.parameters()] == storage, "Parameters replaced"
    assert wiring.widths() == FINAL, wiring.widths()
    assert model.blocks[0].attn.num_heads == CAPS["heads"]
    torch.save({"state": model.state_dict(), "losses": losses}, os.path.join(out_dir, f"{mode}-rank{rank}.pt"))


def key_bias(attn) -> slice:
    """The key rows of ``attn.in_proj_bias`` (q, k, v blocks of capacity_heads * head_dim each)."""
    cap = attn.capacity_heads * attn.head_dim
    return slice(cap, 2 * cap)


def single_process(mode):
    model = build()
    optimizer, policy = make_optimizer(mode, model.parameters())
    wiring = model.wiring(optimizer, optimizer_state=policy)
    noise = []

    def after_step(step, loss):
        for block in model.blocks:
            noise.append(float(block.attn.in_proj_bias.grad[key_bias(block.attn)].abs().max()))
        return loss

    losses = train(model, model, optimizer, wiring, torch.Generator().manual_seed(1), data(), after_step)
    assert_outside_zero(model, optimizer)
    assert max(noise) < KEY_BIAS_NOISE, noise  # zero in exact arithmetic: only rounding noise
    return model, losses


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp_transformer")
    mp.spawn(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return {
        mode: [torch.load(out / f"{mode}-rank{r}.pt", weights_only=True) for r in range(WORLD)] for mode in MODES
    }


@pytest.mark.parametrize("mode", MODES)
def test_transformer_growth_under_ddp_matches_single_process(ddp_results, mode):
    ranks = ddp_results[mode]
    model, ref_losses = single_process(mode)
    reference = model.state_dict()
    assert ref_losses.shape == (STEPS,) and torch.isfinite(ref_losses).all()
    assert torch.equal(ranks[0]["losses"], ranks[1]["losses"])
    torch.testing.assert_close(ranks[0]["losses"], ref_losses, **TOL)
    noise_bound = 2 * STEPS * LR * KEY_BIAS_NOISE / ADAM_EPS  # see the module docstring
    keys = {f"blocks.{i}.attn.in_proj_bias": key_bias(b.attn) for i, b in enumerate(model.blocks)}
    for key, value in reference.items():
        if not isinstance(value, torch.Tensor):
            assert ranks[0]["state"][key] == ranks[1]["state"][key] == value, key
            continue
        got = ranks[0]["state"][key]
        assert torch.equal(got, ranks[1]["state"][key]), key
        if key in keys:
            rows = keys[key]
            torch.testing.assert_close(got[rows], value[rows], rtol=0, atol=noise_bound, msg=key)
            got, value = got.clone(), value.clone()
            got[rows] = value[rows] = 0
        torch.testing.assert_close(got, value, **TOL, msg=key)
