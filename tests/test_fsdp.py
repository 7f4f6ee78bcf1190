"""Growth under FSDP2 (``fully_shard``): 2 gloo processes against one process.

Both ranks train the same small model on the same whole batch, sharded by
``torch.distributed.fsdp.fully_shard`` (rows of every Parameter, gradient and optimizer
state split across the ranks, unevenly for the 3-row heads), and change its widths
between steps: grow with each init (``he``, ``split``, ``zero_out``), shrink keeping the
first and the largest-norm neurons, and permute neurons across the ranks' shards. The
run must match a single process doing the same on the whole model:

- losses, parameters and optimizer state equal within 1e-5 (float32; the goal's bound).
  Same data on both ranks makes FSDP2's averaged gradient equal the single process's and
  the draws are the same by construction. Observed (torch 2.14.1, CPU): bit-identical
  except growdense Adam under ``keep``, whose moments differ by up to ~2e-9: each age
  cohort is stepped as a view of the local shard, and a view of another shape can take
  another (vectorised or not) path through torch's element-wise kernels;
- every rank's local shards keep their storage (``data_ptr``) and the Parameters stay
  the same objects; everything outside the active part is zero on every shard
  (weights, gradients, optimizer state);
- under every optimizer-state policy (``keep``, ``reset``, ``keep_global_step``) with
  growdense's Adam (each neuron's own step count under ``keep``) and SGD with momentum.

A change the ranks disagree on (widths, arguments, generator state) is refused on
every rank before anything changes.

Sharded checkpoints (``torch.distributed.checkpoint``, checked in the same pair of
processes: starting them costs more than the runs). One run goes straight through,
another saves after step 4 (at grown widths: h1 = 5,
h2 = 5, neurons of several ages in growdense Adam's state), then a fresh model at the
initial widths, a fresh optimizer and a generator seeded otherwise load the checkpoint
and continue. Checked:

- the resumed run equals the uninterrupted one bit for bit (same ranks, same
  operations: ``torch.equal``) on every rank, with the Parameters and the optimizer
  the same objects as before the load;
- one process (no process group) loads the 2-rank checkpoint and continues; it matches
  a single-process uninterrupted run within 1e-5 (float32; the 2-rank run differs from a
  single process by up to ~2e-9 in Adam's moments, see above);
- a checkpoint that does not fit (other capacities) is refused on every rank with
  nothing changed; an interrupted save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import os

import pytest
import torch

import growdense
from growdense import sharded
from growdense.checkpoint import CheckpointError, load_sharded_checkpoint, save_sharded_checkpoint
from grow_helpers import TinyEncoder
from fsdp_helpers import WORLD, build, data, fsdp_available, loss_of, shard, spawn

pytestmark = pytest.mark.skipif(not fsdp_available(), reason="torch.distributed FSDP2 with gloo is not available")

STEPS = 9
RUNS = {  # name: (optimizer factory, policy)
    "adam-keep": ("adam", "keep"),
    "adam-reset": ("adam", "reset"),
    "adam-keep_global_step": ("adam", "keep_global_step"),
    "sgd-keep": ("sgd", "keep"),
}


def make_optimizer(kind, params):
    if kind == "adam":
        return growdense.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9)


def change(step, wiring, generator, policy):
    """Width changes before ``step``; rows 6.. of h1 live on rank 1, so moves cross shards."""
    kw = {"optimizer_state": policy}
    if step == 2:
        wiring.grow("h1", 4, init="he", generator=generator, **kw)  # 4 -> 8: new rows on both ranks
    elif step == 3:
        wiring.permute("h1", list(reversed(range(8))))  # every row moves, across the shards
        wiring.shrink("h1", 5, keep="norm", **kw)
    elif step == 4:
        wiring.shrink("h2", 2, keep="norm", **kw)
        wiring.grow("h2", 3, init="split", generator=generator, **kw)
    elif step == 5:
        wiring.shrink("h1", 3, keep="first", **kw)
    elif step == 6:
        wiring.grow("h1", 6, init="zero_out", generator=generator, **kw)  # 3 -> 9


def train(model, optimizer, wiring, policy, x, y, after=None, steps=range(STEPS), generator=None):
    generator = torch.Generator().manual_seed(7) if generator is None else generator
    losses = []
    for step in steps:
        change(step, wiring, generator, policy)
        if after is not None:
            after("change", step)
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        if after is not None:
            after("backward", step)
        optimizer.step()
        losses.append(loss.item())
        if after is not None:
            after("step", step)
    return losses


def full(t):
    return t.full_tensor() if sharded.is_sharded(t) else t


def results(model, optimizer, losses):
    out = {"losses": torch.tensor(losses, dtype=torch.float64), "widths": model.wiring().widths()}
    for name, p in model.named_parameters():
        out[name] = full(p.detach()).clone()
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = full(value).clone() if isinstance(value, torch.Tensor) else value
    return out


def check_zero_outside(model, what):
    """Every local shard is zero outside the active block (weights, gradients, state)."""
    for layer_name in ("enc1", "enc2", "mu", "logvar"):
        layer = getattr(model, layer_name)
        for pname in ("weight", "bias"):
            p = layer._parameters[pname]
            tensors = {"data": p.detach(), "grad": p.grad}
            for key, value in what.state.get(p, {}).items() if what is not None else ():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    tensors[key] = value
            for label, t in tensors.items():
                if t is None:
                    continue
                shard_ = sharded.local(t)
                (r0, r1), *rest = sharded.local_ranges(t)
                rows = torch.arange(r0, r1)
                outside = (rows >= layer.out_features)[:, None] if shard_.dim() == 2 else rows >= layer.out_features
                if shard_.dim() == 2:
                    outside = outside | (torch.arange(shard_.shape[1]) >= layer.in_features)[None, :]
                bad = shard_[outside]
                if bad.numel() and bad.abs().max() != 0:
                    raise AssertionError(f"{layer_name}.{pname} {label}: nonzero outside the active block")


def storages(model):
    return [sharded.local(p).untyped_storage().data_ptr() for p in model.parameters()]


def run_rank(rank, out_dir):
    x, y = data()
    for run, (kind, policy) in RUNS.items():
        model = shard(build())
        params = list(model.parameters())
        assert all(sharded.is_sharded(p) for p in params)
        before = storages(model)
        optimizer = make_optimizer(kind, params)
        wiring = model.wiring(optimizer)
        state_ptrs = {}

        def after(when, step):
            assert [id(p) for p in model.parameters()] == [id(p) for p in params]
            assert storages(model) == before, f"{run}: a local shard changed storage at {when} {step}"
            check_zero_outside(model, optimizer)
            if when == "step" and policy != "reset":  # reset restarts the optimizer, as documented
                for i, p in enumerate(params):
                    for key, value in optimizer.state[p].items():
                        if isinstance(value, torch.Tensor) and value.dim() > 0:
                            ptr = sharded.local(value).data_ptr()
                            assert state_ptrs.setdefault((i, key), ptr) == ptr, f"{run}: state {key} reallocated"

        losses = train(model, optimizer, wiring, policy, x, y, after)
        torch.save(results(model, optimizer, losses), os.path.join(out_dir, f"{run}-rank{rank}.pt"))
    refusals(rank, out_dir)
    checkpoint_rank(rank, out_dir)


def refusals(rank, out_dir):
    """Changes the ranks disagree on, or that cannot be made, are refused on both ranks; nothing changes."""
    model = shard(build())
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data()
    loss_of(model, x, y).backward()
    optimizer.step()
    wiring = model.wiring(optimizer)
    snap = {k: full(v).clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    seen = []
    cases = [
        ("widths", lambda: wiring.grow("h1", 2 + rank, generator=torch.Generator().manual_seed(1))),
        ("generator", lambda: wiring.grow("h1", 2, generator=torch.Generator().manual_seed(rank))),
        ("capacity", lambda: wiring.grow("h1", 100, generator=torch.Generator().manual_seed(1))),
        ("keep", lambda: wiring.shrink("h2", 2, keep=[rank, 2])),
        # a GrowLinear's own methods, called directly on a sharded layer
        ("layer n", lambda: model.enc1.grow_out(1 + rank, generator=torch.Generator().manual_seed(1))),
        ("layer generator", lambda: model.enc2.grow_in(2, generator=torch.Generator().manual_seed(rank))),
        ("layer shrink", lambda: model.enc2.shrink_out(2 + rank)),
        ("layer capacity", lambda: model.enc1.grow_out(100)),
    ]
    for label, call in cases:
        try:
            call()
        except (RuntimeError, ValueError) as error:
            seen.append((label, type(error).__name__, str(error)))
        else:
            seen.append((label, None, ""))
        after = {k: full(v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        assert all(torch.equal(snap[k], after[k]) for k in snap), f"{label}: something changed"
        assert wiring.widths() == {"h1": 4, "h2": 4}
    torch.save(seen, os.path.join(out_dir, f"refusals-rank{rank}.pt"))


def single_process(kind, policy):
    model = build()
    optimizer = make_optimizer(kind, model.parameters())
    x, y = data()
    losses = train(model, optimizer, model.wiring(optimizer), policy, x, y)
    return results(model, optimizer, losses)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(run_rank, out)
    return out


@pytest.mark.parametrize("run", list(RUNS))
def test_fsdp_growth_matches_single_process(fsdp_results, run):
    reference = single_process(*RUNS[run])
    ranks = [torch.load(fsdp_results / f"{run}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert reference["widths"] == {"h1": 9, "h2": 5}
    for key, value in reference.items():
        for r, got in enumerate(ranks):
            assert key in got, key
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=f"{run} rank {r}: {key}")
            else:
                assert got[key] == value, f"{run} rank {r}: {key}"
    assert ranks[0].keys() == reference.keys()


def test_fsdp_disagreement_is_refused_on_every_rank(fsdp_results):
    seen = [torch.load(fsdp_results / f"refusals-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in range(WORLD):
        by_label = {label: (kind, message) for label, kind, message in seen[r]}
        assert by_label["widths"][0] == "RuntimeError" and "disagree on the arguments" in by_label["widths"][1]
        assert by_label["generator"][0] == "RuntimeError" and "generator states" in by_label["generator"][1]
        assert by_label["capacity"][0] == "ValueError" and "exceeds the capacity" in by_label["capacity"][1]
        assert by_label["keep"][0] == "RuntimeError" and "disagree on the arguments" in by_label["keep"][1]
        for label in ("layer n", "layer shrink"):
            assert by_label[label][0] == "RuntimeError" and "disagree on the arguments" in by_label[label][1], label
        assert by_label["layer generator"][0] == "RuntimeError" and "generator states" in by_label["layer generator"][1]
        assert by_label["layer capacity"][0] == "ValueError" and "capacity is" in by_label["layer capacity"][1]


# ---- sharded checkpoints -------------------------------------------------------------
SAVE_AFTER = 4
POLICY = "keep"


def checkpoint_rank(rank, out_dir):
    x, y = data()
    # uninterrupted
    model = shard(build())
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-2)
    losses = train(model, optimizer, model.wiring(optimizer), POLICY, x, y)
    torch.save(results(model, optimizer, losses), os.path.join(out_dir, f"straight-rank{rank}.pt"))

    # interrupted: steps 0..SAVE_AFTER, save
    model = shard(build())
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer)
    generator = torch.Generator().manual_seed(7)
    first = train(model, optimizer, wiring, POLICY, x, y, steps=range(SAVE_AFTER + 1), generator=generator)
    path = os.path.join(out_dir, "ckpt")
    save_sharded_checkpoint(path, model, optimizer, generators={"growth": generator}, wiring=wiring,
                            extra={"step": SAVE_AFTER + 1, "losses": first})
    saved_widths = wiring.widths()
    save_sharded_checkpoint(path, model, optimizer, generators={"growth": generator}, wiring=wiring,
                            extra={"step": SAVE_AFTER + 1, "losses": first})  # a second save replaces the first
    names = os.listdir(path)
    assert "LATEST" in names and len([n for n in names if n.startswith("save-")]) == 1, names
    del model, optimizer, wiring

    # resumed: a fresh model and optimizer, another generator state
    model = shard(build())
    params = list(model.parameters())
    optimizer = growdense.optim.Adam(params, lr=1e-2)
    wiring = model.wiring(optimizer)
    generator = torch.Generator().manual_seed(12345)

    # a model of other capacities is refused on every rank, nothing changed
    other = shard(TinyEncoder(d_in=6, h1=4, h2=4, latent=3, cap1=11, cap2=10))
    other_opt = growdense.optim.Adam(other.parameters(), lr=1e-2)
    before = {k: full(v).clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    try:
        load_sharded_checkpoint(path, other, other_opt, generators={"growth": generator})
    except CheckpointError as error:
        assert "capacities" in str(error), error
    else:
        raise AssertionError("a checkpoint of other capacities was loaded")
    assert not other_opt.state and all(p.grad is None for p in other.parameters())
    assert all(torch.equal(before[k], full(v)) for k, v in other.state_dict().items() if isinstance(v, torch.Tensor))

    extra = load_sharded_checkpoint(path, model, optimizer, generators={"growth": generator}, wiring=wiring)
    assert extra["step"] == SAVE_AFTER + 1 and wiring.widths() == saved_widths
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(sharded.is_sharded(p) for p in params)
    rest = train(model, optimizer, wiring, POLICY, x, y, steps=range(SAVE_AFTER + 1, STEPS), generator=generator)
    torch.save(results(model, optimizer, extra["losses"] + rest), os.path.join(out_dir, f"resumed-rank{rank}.pt"))


def assert_equal_results(got, want, exact, what):
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            if exact:
                assert torch.equal(got[key], value), f"{what}: {key}"
            else:
                torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=f"{what}: {key}")
        else:
            assert got[key] == value, f"{what}: {key}"


def test_resumed_equals_uninterrupted_bit_for_bit(fsdp_results):
    for r in range(WORLD):
        straight = torch.load(fsdp_results / f"straight-rank{r}.pt", weights_only=True)
        resumed = torch.load(fsdp_results / f"resumed-rank{r}.pt", weights_only=True)
        assert_equal_results(resumed, straight, exact=True, what=f"rank {r}")


def test_two_ranks_to_one_process(fsdp_results):
    x, y = data()
    reference_model = build()
    reference_opt = growdense.optim.Adam(reference_model.parameters(), lr=1e-2)
    losses = train(reference_model, reference_opt, reference_model.wiring(reference_opt), POLICY, x, y)
    reference = results(reference_model, reference_opt, losses)

    model = build()
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer)
    generator = torch.Generator().manual_seed(12345)
    extra = load_sharded_checkpoint(fsdp_results / "ckpt", model, optimizer, generators={"growth": generator},
                                    wiring=wiring)
    assert wiring.widths() == {"h1": 5, "h2": 5}
    rest = train(model, optimizer, wiring, POLICY, x, y, steps=range(SAVE_AFTER + 1, STEPS), generator=generator)
    assert_equal_results(results(model, optimizer, extra["losses"] + rest), reference, exact=False, what="1 process")


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    """One process: a save that dies before the switch leaves LATEST on the previous save."""
    model = build()
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer)
    x, y = data()
    train(model, optimizer, wiring, POLICY, x, y, steps=range(3))
    save_sharded_checkpoint(tmp_path, model, optimizer, wiring=wiring)
    snapshot = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    widths = wiring.widths()
    train(model, optimizer, wiring, POLICY, x, y, steps=range(3, 5))
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def dies(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # after the data is written, before the switch

    dcp.save = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            save_sharded_checkpoint(tmp_path, model, optimizer, wiring=wiring)
    finally:
        dcp.save = real
    fresh = build()
    fresh_opt = growdense.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_wiring = fresh.wiring(fresh_opt)
    load_sharded_checkpoint(tmp_path, fresh, fresh_opt, wiring=fresh_wiring)
    assert fresh_wiring.widths() == widths
    for key, value in fresh.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, snapshot[key]), key
