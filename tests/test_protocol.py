"""The growable-module protocol: declarations, riders, multi-element units, init strategies
registered from outside, one validation before any write (issue 26, defect 10), and
keep="norm" moving only what changes place (issue 27).

References are independent: plain tensor indexing written here. Values are moved, never
recomputed, so comparisons are exact (torch.equal) unless stated.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import growdense.optim
from growdense import GrowLinear, Wiring, protocol
from growdense.protocol import CONSUMER, PRODUCER, RIDER, Axis, GrowthSpec, TensorSpec
from grow_helpers import TinyEncoder, assert_same, snapshot


class Scale(nn.Module):
    """A toy rider: y = x * weight + bias over a growable feature width (like a norm's affine part)."""

    def __init__(self, features: int, capacity: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(capacity))
        self.bias = nn.Parameter(torch.zeros(capacity))
        with torch.no_grad():
            self.weight[:features] = 1 + torch.rand(features)
            self.bias[:features] = torch.rand(features)
        self.features = features

    def growth_spec(self) -> GrowthSpec:
        return GrowthSpec(
            ("features",),
            (
                TensorSpec("weight", (Axis(0, "features", RIDER),), fill=1.0),
                TensorSpec("bias", (Axis(0, "features", RIDER),), fill=0.0),
            ),
        )

    def active_width(self, width: str) -> int:
        return self.features

    def set_active_width_(self, width: str, units: int) -> None:
        self.features = units

    def forward(self, x):
        return x * self.weight[: self.features] + self.bias[: self.features]


def chain_with_rider():
    torch.manual_seed(0)
    a = GrowLinear(4, 3, capacity_out=6, dtype=torch.float32)
    s = Scale(3, 6)
    b = GrowLinear(3, 2, capacity_in=6)
    wiring = Wiring()
    wiring.add_width("h", [(a, "out"), (s, "features"), (b, "in")])
    return a, s, b, wiring


def test_growlinear_declares_rows_as_producer_and_columns_as_consumer():
    layer = GrowLinear(3, 2, capacity_in=5, capacity_out=4)
    spec = layer.growth_spec()
    assert protocol.is_growable(layer) and not protocol.is_growable(nn.Linear(2, 2))
    assert spec.role("out") == PRODUCER and spec.role("in") == CONSUMER
    assert protocol.capacity(layer, "in") == 5 and protocol.capacity(layer, "out") == 4
    assert protocol.active_block(layer.weight) == (slice(0, 2), slice(0, 3))
    assert protocol.active_block(layer.bias) == (slice(0, 2),)
    assert GrowLinear(3, 2, bias=False).growth_spec().width_with_role(PRODUCER) == "out"


def test_a_rider_gets_its_declared_fill_moves_with_the_width_and_is_zeroed_when_removed():
    a, s, b, wiring = chain_with_rider()
    w_s, b_s = s.weight.detach().clone(), s.bias.detach().clone()
    wiring.grow("h", 2, init="zero_out", generator=torch.Generator().manual_seed(1))
    assert s.features == 5 and wiring.members("h")[2] == (s, "features", RIDER)
    assert torch.equal(s.weight[:3], w_s[:3]) and torch.equal(s.weight[3:5], torch.ones(2))
    assert torch.equal(s.bias[3:5], torch.zeros(2)) and torch.all(s.weight[5:] == 0)
    w_a = a.weight.detach().clone()
    w_s = s.weight.detach().clone()
    wiring.shrink("h", 2, keep=[4, 0])
    assert torch.equal(a.weight[:2], w_a[[4, 0]])
    assert torch.equal(s.weight[:2], w_s[[4, 0]]) and torch.all(s.weight[2:] == 0) and torch.all(s.bias[2:] == 0)


def test_split_copies_a_riders_sources():
    a, s, b, wiring = chain_with_rider()
    x = torch.randn(5, 4)
    before = b(s(torch.relu(a(x)))).detach()
    wiring.grow("h", 3, init="split", split_noise=0.0, generator=torch.Generator().manual_seed(2))
    # Every new unit copies a source's producer row and rider values; outgoing weights split.
    for new in range(3, 6):
        src = next(i for i in range(3) if torch.equal(a.weight[i], a.weight[new]))
        assert s.weight[new] == s.weight[src] and s.bias[new] == s.bias[src]
    # float32 sums of halves: equal up to rounding (1e-6 relative).
    torch.testing.assert_close(b(s(torch.relu(a(x)))), before, rtol=1e-6, atol=1e-6)


def test_units_of_several_elements_in_stacked_blocks():
    axis = Axis(0, "heads", PRODUCER, unit=2, blocks=3)
    # capacity 4 heads of 2 rows, stacked 3 times (q, k, v): 24 rows.
    t = torch.arange(24.0)
    assert protocol.element_ranges(axis, 4, 1, 3) == [(2, 4), (10, 4), (18, 4)]
    assert protocol.element_index(axis, 4, torch.tensor([3])).tolist() == [6, 7, 14, 15, 22, 23]
    protocol.move_units_(t, axis, 4, torch.tensor([3]), torch.tensor([0]))
    expected = torch.arange(24.0)
    for block in range(3):
        expected[block * 8 : block * 8 + 2] = expected[block * 8 + 6 : block * 8 + 8]
    assert torch.equal(t, expected)
    protocol.zero_units_(t, axis, 4, 2, 4)
    for block in range(3):
        assert torch.all(t[block * 8 + 4 : block * 8 + 8] == 0)


class Recording:
    """An init strategy registered from outside: zero outgoing weights, records its options."""

    name = "recording-test"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def check(self, change, **options):
        options.pop("split_noise", None)
        if set(options) - {"closure"}:
            raise TypeError(f"unexpected {sorted(set(options) - {'closure'})}")
        if change.n and not callable(options.get("closure")):
            raise ValueError("init='recording-test' needs a closure")

    def apply_(self, change, **options):
        self.calls.append({"n": change.n, "loss": options["closure"](), "roles": [s.role for s in change.slices]})
        for s in change.by_role(PRODUCER):
            if s.spec.fill is None:
                s.fill_(0.5)


def test_a_registered_strategy_receives_its_options_and_is_validated_before_anything_changes():
    strategy = protocol.register_init(Recording(), replace=True)
    model = TinyEncoder()
    wiring = model.wiring()
    before = snapshot(model)
    with pytest.raises(ValueError, match="needs a closure"):
        wiring.grow("h1", 1, init="recording-test")
    with pytest.raises(TypeError, match="unexpected"):
        wiring.grow("h1", 1, init="recording-test", closure=lambda: 0.0, bogus=1)
    assert_same(snapshot(model), before)
    wiring.grow("h1", 2, init="recording-test", closure=lambda: 7.0)
    assert strategy.calls == [{"n": 2, "loss": 7.0, "roles": [PRODUCER, PRODUCER, CONSUMER]}]
    assert torch.all(model.enc1.weight[5:7, :6] == 0.5) and torch.all(model.enc2.weight[:, 5:7] == 0)
    with pytest.raises(TypeError, match="unexpected option"):
        wiring.grow("h1", 1, init="he", closure=lambda: 0.0)  # the built-ins take no closure
    with pytest.raises(ValueError, match="unknown init"):
        wiring.check_init("nonexistent")


# ---- issue 26, defect 10: a member that cannot be written ------------------------------------
def _trained(optimizer_cls=torch.optim.Adam):
    torch.manual_seed(0)
    model = TinyEncoder()
    optimizer = optimizer_cls(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6)
    nn.functional.mse_loss(model(x), torch.zeros(4, 6)).backward()
    optimizer.step()
    return model, optimizer


def _make_unwritable(model, optimizer, how):
    consumer = model.enc2  # consumes h1, produced by enc1
    if how == "inference":
        with torch.inference_mode():
            frozen = consumer.weight.data.clone()
        consumer.weight.data = frozen
    elif how == "complex":
        consumer.weight.data = consumer.weight.data.to(torch.complex64)
    elif how == "inference-state":
        with torch.inference_mode():
            optimizer.state[consumer.weight]["exp_avg"] = optimizer.state[consumer.weight]["exp_avg"].clone()
    else:  # expanded
        consumer.weight.grad = consumer.weight.grad[:1].clone().expand_as(consumer.weight)


@pytest.mark.parametrize("how", ["inference", "complex", "inference-state", "expanded"])
@pytest.mark.parametrize("op", ["grow", "shrink", "shrink-norm", "permute"])
def test_a_member_that_cannot_be_written_is_refused_before_anything_changes(how, op):
    model, optimizer = _trained()
    _make_unwritable(model, optimizer, how)
    wiring = model.wiring(optimizer, optimizer_state="keep_global_step")
    before = snapshot(model, optimizer)
    calls = {
        "grow": lambda: wiring.grow("h1", 2),
        "shrink": lambda: wiring.shrink("h1", 2, keep=[3, 1]),
        "shrink-norm": lambda: wiring.shrink("h1", 2, keep="norm"),
        "permute": lambda: wiring.permute("h1", [4, 3, 2, 1, 0]),
    }
    with pytest.raises(RuntimeError, match="cannot resize 'h1'.*Nothing was changed"):
        calls[op]()
    assert_same(snapshot(model, optimizer), before)
    assert model.enc1.out_features == model.enc2.in_features == 5


def test_an_unwritable_member_elsewhere_does_not_block_another_width():
    model, optimizer = _trained()
    with torch.inference_mode():
        frozen = model.mu.weight.data.clone()
    model.mu.weight.data = frozen  # mu consumes h2, not h1
    wiring = model.wiring(optimizer, optimizer_state="keep_global_step")
    wiring.grow("h1", 1)
    assert wiring.width("h1") == 6


# ---- issue 27: keep="norm" moves only what changes place -----------------------------------
def test_keep_norm_moves_only_the_kept_neurons_outside_the_first_k():
    model, optimizer = _trained(growdense.optim.Adam)
    wiring = model.wiring(optimizer)
    w1 = model.enc1.weight.detach().clone()
    b1 = model.enc1.bias.detach().clone()
    w2 = model.enc2.weight.detach().clone()
    m1 = optimizer.state[model.enc1.weight]["exp_avg"].clone()
    v2 = optimizer.state[model.enc2.weight]["exp_avg_sq"].clone()
    g1 = model.enc1.weight.grad.clone()
    # Independent: float64 row norms over the active inputs, top 2 of 5, ties to the lower index.
    norms = [float(w1[i, :6].double().norm()) for i in range(5)]
    kept = sorted(sorted(range(5), key=lambda i: (-norms[i], i))[:2])
    outside = iter(i for i in kept if i >= 2)
    order = [i if i in kept else next(outside) for i in range(2)]
    wiring.shrink("h1", 2, keep="norm")
    assert torch.equal(model.enc1.weight[:2], w1[order]) and torch.equal(model.enc1.bias[:2], b1[order])
    assert torch.equal(model.enc2.weight[:, :2], w2[:, order])
    assert torch.equal(optimizer.state[model.enc1.weight]["exp_avg"][:2], m1[order])
    assert torch.equal(optimizer.state[model.enc2.weight]["exp_avg_sq"][:, :2], v2[:, order])
    assert torch.equal(model.enc1.weight.grad[:2], g1[order])
    assert torch.all(model.enc1.weight[2:] == 0) and torch.all(model.enc2.weight[:, 2:] == 0)
    assert torch.all(optimizer.state[model.enc1.weight]["exp_avg"][2:] == 0)
