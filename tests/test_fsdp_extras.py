"""FSDP2 with mixed precision, torch.compile and ``broadcast_from``: 2 gloo processes against one.

- ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: the model computes
  in bfloat16 (its losses differ from float32's, by up to 1e-2 relative here: bfloat16
  keeps 8 bits of mantissa) while the sharded master weights and Adam's state stay
  float32, and a growth draws exactly the rows a float32 single process draws;
- ``torch.compile`` of the sharded model: the number of compiled frames after the first
  step stays the same through grow and shrink (FSDP2's hooks split the forward at each
  sharded module, so there are more frames than in one process, where there is one;
  growth adds none), and the losses equal an uncompiled single process within 1e-5;
- ``Wiring(broadcast_from=0)`` with a generator seeded differently on each rank: every
  rank draws from rank 0's generator state, so the run equals a single process using
  rank 0's seed (within 1e-5, float32).
"""

from __future__ import annotations

import os

import pytest
import torch

import growdense
from growdense import sharded
from fsdp_helpers import WORLD, build, data, fsdp_available, loss_of, shard, spawn

pytestmark = pytest.mark.skipif(not fsdp_available(), reason="torch.distributed FSDP2 with gloo is not available")

STEPS = 5


def change(step, wiring, generator):
    if step == 1:
        wiring.grow("h1", 3, generator=generator)
    elif step == 2:
        wiring.shrink("h2", 2, keep="norm")
    elif step == 3:
        wiring.grow("h2", 5, generator=generator)


def full(t):
    return t.full_tensor() if sharded.is_sharded(t) else t


def run(model, forward=None, generator=None, wiring_kwargs=None, counter=None):
    forward = model if forward is None else forward
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer, **(wiring_kwargs or {}))
    generator = torch.Generator().manual_seed(7) if generator is None else generator
    x, y = data()
    out = {"losses": [], "frames": [], "grown": None}
    for step in range(STEPS):
        change(step, wiring, generator)
        if step == 1:
            out["grown"] = full(model.enc1.weight.detach())[4:7].clone()
        optimizer.zero_grad()
        loss = loss_of(forward, x, y)
        loss.backward()
        optimizer.step()
        out["losses"].append(loss.item())
        if counter is not None:
            out["frames"].append(counter.frame_count)
    out["losses"] = torch.tensor(out["losses"], dtype=torch.float64)
    out["params"] = {k: full(p.detach()).clone() for k, p in model.named_parameters()}
    out["master_dtypes"] = sorted({str(sharded.local(p).dtype) for p in model.parameters()})
    out["state_dtypes"] = sorted(
        {str(v.dtype) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()}
    )
    return out


def run_rank(rank, out_dir):
    from torch._dynamo.testing import CompileCounter
    from torch.distributed.fsdp import MixedPrecisionPolicy

    results = {}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results["bf16"] = run(shard(build(), mp_policy=policy))
    torch._dynamo.reset()
    model, counter = shard(build()), CompileCounter()
    results["compile"] = run(model, torch.compile(model, backend=counter), counter=counter)
    results["broadcast"] = run(
        shard(build()), generator=torch.Generator().manual_seed(7 + 1000 * rank), wiring_kwargs={"broadcast_from": 0}
    )
    torch.save(results, os.path.join(out_dir, f"extras-rank{rank}.pt"))


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_extras")
    spawn(run_rank, out)
    reference = run(build())
    return [torch.load(out / f"extras-rank{r}.pt", weights_only=True) for r in range(WORLD)], reference


def test_mixed_precision_keeps_float32_masters_and_state(extras):
    ranks, reference = extras
    for got in ranks:
        bf16 = got["bf16"]
        assert bf16["master_dtypes"] == ["torch.float32"] and bf16["state_dtypes"] == ["torch.float32"]
        assert torch.equal(bf16["grown"], reference["grown"])  # the growth's draws, exactly
        assert not torch.equal(bf16["losses"], reference["losses"])  # it did compute in bfloat16
        torch.testing.assert_close(bf16["losses"], reference["losses"], rtol=1e-2, atol=0)


def test_compiled_sharded_model_keeps_its_graphs_across_growth(extras):
    ranks, reference = extras
    for got in ranks:
        frames = got["compile"]["frames"]
        assert frames[0] >= 1 and len(set(frames)) == 1, frames  # no frame compiled after step 0
        torch.testing.assert_close(got["compile"]["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
        for key, value in reference["params"].items():
            torch.testing.assert_close(got["compile"]["params"][key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_broadcast_from_gives_every_rank_rank0s_draws(extras):
    ranks, reference = extras
    for got in ranks:
        assert torch.equal(got["broadcast"]["grown"], reference["grown"])
        torch.testing.assert_close(got["broadcast"]["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
        for key, value in reference["params"].items():
            torch.testing.assert_close(got["broadcast"]["params"][key], value, rtol=1e-5, atol=1e-5, msg=key)
