"""A training step that pays for the active block, not the capacity.

- The backward adds a GrowLinear's weight/bias gradient into an existing ``.grad``'s
  active block in place (csrc/cpu/linear_autograd.cpp) instead of returning a
  capacity-sized gradient for AccumulateGrad to add: same ``.grad``, same values, and
  only when nothing could tell the difference (hooks, ``torch.autograd.grad``,
  ``backward(inputs=...)`` not naming the tensor get the usual path).
- ``growdense.optim.Adam``/``AdamW`` step over the active blocks: bit-identical to
  torch's optimizers over the whole capacity (the oracle: outside the block everything
  is zero), including across growth.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from growdense import GrowLinear, optim_state
from growdense.layers import active_block
from growdense import optim
from growdense.optim import Adam, AdamW, zero_grad_


def two_layers(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    a = GrowLinear(10, 6, capacity_in=10, capacity_out=24, activation="relu", dtype=dtype)
    b = GrowLinear(6, 3, capacity_in=24, capacity_out=16, dtype=dtype)
    return torch.nn.Sequential(a, b)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(7, 10, generator=g, dtype=dtype)


def train(model, opt, steps, grow_at=None, set_to_none=True):
    for step in range(steps):
        if step == grow_at:
            a, b = model[0], model[1]
            g = torch.Generator().manual_seed(7)
            start = a.out_features
            a.grow_out(5, generator=g)
            b.grow_in(5, generator=g)
            for p, dim in ((a.weight, 0), (a.bias, 0), (b.weight, 1)):
                optim_state.zero_state_(opt, p, dim, start, start + 5)
        opt.zero_grad(set_to_none=set_to_none)
        model(batch(step)).pow(2).sum().backward()
        opt.step()


def assert_same_training(m1, o1, m2, o2):
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), name
        for key, v1 in o1.state[p1].items():
            assert torch.equal(v1, o2.state[p2][key]), (name, key)
            if isinstance(v1, torch.Tensor) and v1.dim() > 0:
                assert v1.shape == p1.shape  # the state keeps the capacity shape


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (Adam, {}),
        (Adam, {"weight_decay": 0.1, "amsgrad": True}),
        (Adam, {"maximize": True, "betas": (0.8, 0.9)}),
        (AdamW, {"weight_decay": 0.05}),
        (Adam, {"foreach": True}),
    ],
)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_active_block_step_is_bit_identical_to_torch(make, kwargs, set_to_none):
    ours = two_layers()
    ref = copy.deepcopy(ours)
    torch_make = torch.optim.AdamW if make is AdamW else torch.optim.Adam
    o1 = make(ours.parameters(), lr=1e-2, **kwargs)
    o2 = torch_make(ref.parameters(), lr=1e-2, **kwargs)
    train(ours, o1, 6, grow_at=3, set_to_none=set_to_none)
    train(ref, o2, 6, grow_at=3, set_to_none=set_to_none)
    assert_same_training(ours, o1, ref, o2)
    for layer in ours:
        ai, ao = layer.in_features, layer.out_features
        assert not layer.weight[ao:].any() and not layer.weight[:, ai:].any()
        assert not layer.weight.grad[ao:].any() and not layer.weight.grad[:, ai:].any()


@pytest.mark.parametrize("make", [Adam, AdamW])
def test_fused_steps_the_active_blocks_as_torchs_fused_adam_over_the_capacity(make):
    # fused=True on the CPU is growdense's own one-pass kernel over the active blocks
    # (tests/test_fused_adam.py); against torch's fused kernel over the whole capacity it
    # differs by the rounding of a few operations: after 6 steps of lr 1e-2, 1e-6 absolute
    # (float32 weights of order 1; a step is at most lr = 1e-2, so a slip of the update's
    # rounding would show at 1e-4 or more); the moments, from gradients at weights a
    # rounding apart, 1e-4 relative.
    ours = two_layers()
    ref = copy.deepcopy(ours)
    torch_make = torch.optim.AdamW if make is AdamW else torch.optim.Adam
    o1 = make(ours.parameters(), lr=1e-2, fused=True, weight_decay=0.1)
    o2 = torch_make(ref.parameters(), lr=1e-2, fused=True, weight_decay=0.1)
    train(ours, o1, 6, grow_at=3)
    train(ref, o2, 6, grow_at=3)
    for (name, p1), p2 in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o1.state[p1][key], o2.state[p2][key], rtol=1e-4, atol=1e-8)
        assert o1.state[p1]["step"].item() == o2.state[p2]["step"].item() == 6
    for layer in ours:
        ai, ao = layer.in_features, layer.out_features
        assert not layer.weight[ao:].any() and not layer.weight[:, ai:].any()


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("RAdam", {"weight_decay": 0.01}),
        ("RAdam", {"foreach": True, "decoupled_weight_decay": True, "weight_decay": 0.01}),
        ("Adamax", {}),
        ("Adamax", {"foreach": True}),
        ("Adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.5}),
        ("Adagrad", {"foreach": True}),
    ],
)
def test_other_active_block_optimizers_match_torch(name, kwargs):
    ours = two_layers()
    ref = copy.deepcopy(ours)
    o1 = getattr(optim, name)(ours.parameters(), lr=1e-2, **kwargs)
    o2 = getattr(torch.optim, name)(ref.parameters(), lr=1e-2, **kwargs)
    train(ours, o1, 6, grow_at=3)
    train(ref, o2, 6, grow_at=3)
    for (pname, p1), p2 in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p1, p2), pname
        block = active_block(p1)
        for key, v1 in o1.state[p1].items():
            v2 = o2.state[p2][key]
            if name == "Adamax" and key == "exp_inf":  # torch writes eps outside the block, we leave 0
                v1, v2 = v1[block], v2[block]
            assert torch.equal(v1, v2), (pname, key)


def test_optimizer_is_a_torch_adam_and_its_state_dict_loads_in_torch():
    model = two_layers()
    opt = Adam(model.parameters(), lr=1e-3)
    train(model, opt, 2)
    assert isinstance(opt, torch.optim.Adam)
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    plain.load_state_dict(opt.state_dict())
    again = Adam(model.parameters(), lr=1e-3)
    again.load_state_dict(plain.state_dict())


def test_zero_grad_keeps_partial_grads_and_drops_full_ones():
    partial = GrowLinear(4, 3, capacity_out=8)
    full = GrowLinear(4, 3)
    plain = torch.nn.Parameter(torch.randn(3))
    params = [*partial.parameters(), *full.parameters(), plain]
    (partial(torch.randn(2, 4)).sum() + full(torch.randn(2, 4)).sum() + plain.sum()).backward()
    kept = partial.weight.grad
    zero_grad_(params)
    assert partial.weight.grad is kept and not kept.any() and not partial.bias.grad.any()
    assert full.weight.grad is None and full.bias.grad is None and plain.grad is None
    (full(torch.randn(2, 4)).sum() + plain.sum()).backward()
    zero_grad_(params, set_to_none=False)
    assert not full.weight.grad.any() and not plain.grad.any()


def grads_of(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_backward_adds_into_the_existing_grad_in_place():
    model = two_layers()
    ref = copy.deepcopy(model)
    x = batch(0)
    model(x).sum().backward()  # first backward: .grad is created as usual
    ref(x).sum().backward()
    grads = [p.grad for p in model.parameters()]
    ptrs = [g.data_ptr() for g in grads]
    for step in range(1, 4):  # accumulation over several backwards, no zeroing
        model(batch(step)).sum().backward()
        before = [q.grad for q in ref.parameters()]
        for q in ref.parameters():
            q.grad = None
        ref(batch(step)).sum().backward()  # the usual path: a fresh gradient
        for p, b, q in zip(model.parameters(), before, ref.parameters()):
            q.grad = b + q.grad  # what AccumulateGrad's `grad += new` gives
            assert torch.equal(p.grad, q.grad)
    assert [p.grad for p in model.parameters()] == grads  # the same tensors
    assert [p.grad.data_ptr() for p in model.parameters()] == ptrs


def test_zeroed_grad_then_backward_equals_a_fresh_gradient_exactly():
    model = two_layers()
    ref = copy.deepcopy(model)
    model(batch(0)).sum().backward()
    zero_grad_(model.parameters())
    model(batch(1)).sum().backward()
    ref(batch(1)).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


class RecordSizes(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and func not in (torch.ops.aten.slice.Tensor, torch.ops.aten.alias.default):
                if t._base is None:  # a new tensor, not a view into an existing one
                    self.largest = max(self.largest, t.numel())
        return out


def test_a_steady_state_step_allocates_nothing_of_the_capacity_size():
    torch.manual_seed(0)
    layer = GrowLinear(32, 16, capacity_in=256, capacity_out=128, activation="relu")
    opt = Adam(layer.parameters())
    x, gy = torch.randn(8, 32, requires_grad=True), torch.randn(8, 16)

    def step():
        opt.zero_grad()
        layer(x).backward(gy)
        opt.step()

    step()  # the first step creates .grad and Adam's state at the capacity shape
    with RecordSizes() as rec:
        step()
    assert rec.largest <= 32 * 16, rec.largest
    with RecordSizes() as rec:  # torch's Adam, for contrast, touches the whole capacity
        plain = torch.optim.Adam(layer.parameters())
        plain.zero_grad()
        layer(x).backward(gy)
        plain.step()
    assert rec.largest == 256 * 128


@pytest.mark.parametrize("case", ["autograd.grad", "inputs", "hook", "post_hook", "retain_grad"])
def test_usual_path_when_in_place_would_differ(case):
    layer = GrowLinear(5, 4, capacity_in=9, capacity_out=7, activation="relu")
    w = layer.weight
    x = torch.randn(3, 5, requires_grad=True)
    layer(x).sum().backward()
    before = w.grad.clone()
    ref = GrowLinear(5, 4, capacity_in=9, capacity_out=7, activation="relu")
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(layer.bias)
    ref(x).sum().backward()
    fresh = ref.weight.grad
    if case == "autograd.grad":
        (gw,) = torch.autograd.grad(layer(x).sum(), [w])
        assert gw.shape == w.shape and torch.equal(gw, fresh)
        assert torch.equal(w.grad, before)  # .grad untouched
    elif case == "inputs":
        layer(x).sum().backward(inputs=[x])
        assert torch.equal(w.grad, before)
        layer(x).sum().backward(inputs=[w])
        torch.testing.assert_close(w.grad, before + fresh)
    elif case == "hook":
        seen = []
        w.register_hook(lambda g: seen.append(g.shape))
        layer(x).sum().backward()
        assert seen == [w.shape]
        torch.testing.assert_close(w.grad, before + fresh)
    elif case == "post_hook":
        seen = []
        w.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
        layer(x).sum().backward()
        assert len(seen) == 1 and torch.equal(seen[0], w.grad)
    elif case == "retain_grad":
        w.retain_grad()  # a no-op on a leaf, but must not break anything
        layer(x).sum().backward()
        torch.testing.assert_close(w.grad, before + fresh)


def test_same_layer_twice_in_one_graph():
    model = two_layers()
    ref = copy.deepcopy(model)
    x1, x2 = batch(1), batch(2)
    for m in (model, ref):
        m(x1).sum().backward()
    for p in ref.parameters():
        p.grad = None
    for m in (model, ref):
        (m(x1).sum() + m(x2).pow(2).sum()).backward()
    model_first = two_layers()  # model's grads hold the first backward's too
    model_first(x1).sum().backward()
    for p, q, r in zip(model.parameters(), ref.parameters(), model_first.parameters()):
        torch.testing.assert_close(p.grad, q.grad + r.grad, rtol=1e-6, atol=1e-6)


def test_active_block_follows_copies_and_conversions():
    layer = GrowLinear(3, 2, capacity_in=5, capacity_out=4)
    assert active_block(layer.weight) == (slice(0, 2), slice(0, 3))
    assert active_block(layer.bias) == (slice(0, 2),)
    assert active_block(torch.zeros(4)) is None
    clone = copy.deepcopy(layer)
    clone.grow_out(1)
    assert active_block(clone.weight) == (slice(0, 3), slice(0, 3))
    assert active_block(layer.weight) == (slice(0, 2), slice(0, 3))
    loaded = pickle.loads(pickle.dumps(layer))
    assert active_block(loaded.bias) == (slice(0, 2),)
    layer.double()
    assert active_block(layer.weight) == (slice(0, 2), slice(0, 3))


def test_gradcheck_through_the_layer_still_holds():
    layer = GrowLinear(4, 3, capacity_in=6, capacity_out=5, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()  # .grad exists: gradcheck must still see capacity-shaped gradients

    def f(x, w, b):
        return F.linear(x, w[:3, :4], b[:3]) * 0 + torch.ops.growdense.linear(x, w, b, 4, 3, "none")

    assert torch.autograd.gradcheck(f, (x, layer.weight, layer.bias))
