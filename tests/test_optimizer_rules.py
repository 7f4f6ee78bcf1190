"""Per-optimizer growth rules (``growdense.optim_state.OptimizerRules``), looked up by class.

The reference for a registered optimizer is the optimizer itself, freshly built on fresh
Parameters holding the new neurons: under ``optimizer_state="keep"`` the new neurons
must be updated exactly as it updates them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growdense import GrowLinear, Wiring, optim, optim_state
from growdense.optim_state import OptimizerRules, optimizer_rules, register_optimizer_rules

from grow_helpers import snapshot, assert_same

D = torch.float64
LR = 1e-2


class GainSGD(torch.optim.Optimizer):
    """SGD with momentum and a per-element gain that starts at ``gain0`` (delta-bar-delta-like).

    Its state: ``velocity`` (fresh: 0), ``gain`` (fresh: the group's ``gain0``, not 0) and
    ``norms``, the last three gradient norms of the Parameter (diagnostics, not indexed by
    its elements, and not used by the update).
    """

    def __init__(self, params, lr=LR, momentum=0.9, gain0=0.5):
        super().__init__(params, dict(lr=lr, momentum=momentum, gain0=gain0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["velocity"] = torch.zeros_like(p)
                    state["gain"] = torch.full_like(p, group["gain0"])
                    state["norms"] = torch.zeros(3, dtype=p.dtype)
                v, gain = state["velocity"], state["gain"]
                trend = g * v  # the gain grows while the gradient keeps its sign, shrinks when it flips
                gain.mul_(torch.where(trend > 0, 1.25, torch.where(trend < 0, 0.8, 1.0)))
                v.mul_(group["momentum"]).add_(g)
                p.sub_(group["lr"] * gain * v)
                state["norms"] = torch.cat([state["norms"][1:], g.norm().reshape(1)])


class SubGainSGD(GainSGD):
    """A subclass: inherits GainSGD's rules."""


class CountingSGD(torch.optim.Optimizer):
    """SGD whose learning rate decays with one step count per Parameter: "keep" cannot be exact."""

    def __init__(self, params, lr=LR):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                p.sub_(group["lr"] / state["step"] * p.grad)


GAIN_RULES = OptimizerRules(
    state={"velocity": 0.0, "gain": lambda opt, group: group["gain0"]},
    fixed={"norms"},
)


@pytest.fixture
def gain_rules():
    register_optimizer_rules(GainSGD, GAIN_RULES, replace=True)
    yield GAIN_RULES
    optim_state._RULES.pop(GainSGD, None)
    optim_state._LOOKUP.clear()


class Chain(nn.Module):
    """x (4) -> h (grows, capacity 9) -> y (3), float64."""

    def __init__(self, h=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = GrowLinear(4, h, capacity_out=9, activation="relu", dtype=D)
        self.b = GrowLinear(h, 3, capacity_in=9, dtype=D)

    def forward(self, x):
        return self.b(self.a(x))

    def wiring(self, optimizer=None, **kwargs):
        w = Wiring(optimizer, **kwargs)
        w.add("h", self.a, [self.b])
        return w


def step_model(model, opt, step):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 4, generator=g, dtype=D), torch.randn(8, 3, generator=g, dtype=D)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def test_an_unregistered_optimizer_with_state_not_shaped_like_its_parameters_is_refused():
    model = Chain()
    opt = GainSGD(model.parameters())
    step_model(model, opt, 0)
    assert optimizer_rules(opt) is optim_state.DEFAULT_RULES
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"'norms' of shape \(3,\).*register_optimizer_rules\(GainSGD"):
        Wiring(opt)
    wiring = model.wiring()
    with pytest.raises(ValueError, match="norms"):
        wiring.optimizer = opt
    assert wiring.optimizer is None
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("cls", [GainSGD, SubGainSGD])
def test_registered_rules_make_a_custom_optimizer_grow_exactly(gain_rules, cls):
    model = Chain()
    opt = cls(model.parameters(), gain0=0.5)
    assert optimizer_rules(opt) is gain_rules  # the subclass inherits them through its MRO
    for s in range(12):
        step_model(model, opt, s)
    norms = {p: opt.state[p]["norms"].clone() for p in model.parameters()}
    old = {k: v.clone() for k, v in opt.state[model.a.weight].items()}
    model.wiring(opt).grow("h", 3, generator=torch.Generator().manual_seed(1), optimizer_state="keep")
    state = opt.state[model.a.weight]
    assert torch.equal(state["gain"][3:6], torch.full((3, 4), 0.5, dtype=D))  # gain0, not 0
    assert torch.equal(state["velocity"][3:6], torch.zeros(3, 4, dtype=D))
    assert torch.equal(state["gain"][:3], old["gain"][:3]) and torch.equal(state["velocity"][:3], old["velocity"][:3])
    for p in model.parameters():
        assert torch.equal(opt.state[p]["norms"], norms[p])  # fixed: left alone
    # The new rows and columns, as Parameters of their own under a freshly built optimizer.
    fresh_a = nn.Parameter(model.a.weight.detach()[3:6, :4].clone())
    fresh_b = nn.Parameter(model.b.weight.detach()[:3, 3:6].clone())
    fresh_opt = cls([fresh_a, fresh_b], gain0=0.5)
    for s in range(12, 18):
        step_model(model, opt, s)
        fresh_a.grad = model.a.weight.grad[3:6, :4].clone()
        fresh_b.grad = model.b.weight.grad[:3, 3:6].clone()
        fresh_opt.step()
        # The same element-wise operations on the same values: equal bit for bit.
        assert torch.equal(model.a.weight.detach()[3:6, :4], fresh_a.detach()), s
        assert torch.equal(model.b.weight.detach()[:3, 3:6], fresh_b.detach()), s


def test_registered_fresh_values_fill_removed_slices_after_shrink(gain_rules):
    model = Chain(h=6)
    opt = GainSGD(model.parameters(), gain0=0.25)
    for s in range(5):
        step_model(model, opt, s)
    kept_gain = opt.state[model.a.weight]["gain"][[4, 1]].clone()
    model.wiring(opt).shrink("h", 2, keep=[4, 1])
    gain = opt.state[model.a.weight]["gain"]
    assert torch.equal(gain[:2], kept_gain)
    assert torch.equal(gain[2:], torch.full_like(gain[2:], 0.25))
    assert torch.equal(opt.state[model.b.weight]["gain"][:, 2:], torch.full((3, 7), 0.25, dtype=D))
    assert not opt.state[model.b.weight]["velocity"][:, 2:].any()


def test_a_step_count_per_parameter_refuses_an_explicit_keep_and_changes_nothing():
    register_optimizer_rules(CountingSGD, OptimizerRules(step="parameter"), replace=True)
    try:
        model = Chain()
        opt = CountingSGD(model.parameters())
        step_model(model, opt, 0)
        wiring = model.wiring(opt)
        before = snapshot(model, opt)
        with pytest.raises(ValueError, match="CountingSGD keeps one step count per parameter"):
            wiring.grow("h", 2, optimizer_state="keep")
        assert_same(before, snapshot(model, opt))
        with pytest.warns(UserWarning, match="keep_global_step"):
            wiring.grow("h", 2)
        assert model.a.out_features == 5
    finally:
        optim_state._RULES.pop(CountingSGD, None)
        optim_state._LOOKUP.clear()


def test_subclasses_of_torch_and_growdense_optimizers_inherit_their_rules():
    class MyAdam(torch.optim.Adam):
        pass

    class MyGrowAdam(optim.Adam):
        pass

    class MyLBFGS(torch.optim.LBFGS):
        pass

    model = Chain()
    ps = list(model.parameters())
    mine = MyAdam(ps, lr=LR)
    step_model(model, mine, 0)
    with pytest.raises(ValueError, match="keeps one step count per parameter.*growdense.optim.Adam"):
        model.wiring(mine).grow("h", 1, optimizer_state="keep")
    with pytest.raises(ValueError, match="MyLBFGS keeps one flat history"):
        Wiring(MyLBFGS(ps))
    ours = MyGrowAdam(ps, lr=LR)
    step_model(model, ours, 1)
    model.wiring(ours).grow("h", 2, optimizer_state="keep")  # counts each neuron's age
    assert ours.state[model.a.weight][optim.BIRTH_KEY][0][3:5] == [1, 1]
    assert optimizer_rules(torch.optim.AdamW).state == optimizer_rules(torch.optim.Adam).state
    assert optimizer_rules(optim.Adagrad).on_reset is optimizer_rules(torch.optim.Adagrad).on_reset


def test_registration_is_validated():
    with pytest.raises(TypeError, match="Optimizer subclass"):
        register_optimizer_rules(nn.Linear, OptimizerRules())
    with pytest.raises(TypeError, match="OptimizerRules"):
        register_optimizer_rules(GainSGD, {"state": {}})
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer_rules(torch.optim.SGD, OptimizerRules())
    with pytest.raises(ValueError, match="unknown step count"):
        OptimizerRules(step="per-epoch")
