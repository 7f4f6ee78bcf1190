"""The optimizer-state policy at growth ("keep", "reset", "keep_global_step") and every optimizer's state.

References are independent: a hand-written float64 Adam that counts each element's own
steps, freshly built torch optimizers on fresh Parameters holding the new neurons, and
newly built optimizers for "reset".
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growdense import CheckpointError, GrowLinear, GrowthSchedule, Wiring, load_checkpoint, optim, optim_state
from growdense import save_checkpoint
from growdense._torch_internals import ADAM_INIT_GROUP, in_tested_range, torch_version
from growdense.optim import BIRTH_KEY, cohorts

from grow_helpers import TinyEncoder, snapshot, assert_same

D = torch.float64
LR, EPS, BETAS = 1e-2, 1e-8, (0.9, 0.999)


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


def data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 4, generator=g, dtype=D), torch.randn(8, 3, generator=g, dtype=D)


def step_model(model, opt, step):
    x, y = data(step)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


# ---- a hand-written Adam that counts every element's own steps ---------------------------
class HandAdam:
    """Adam on capacity-shaped float64 tensors with a per-element step count ``t``.

    Only elements with ``active`` set are updated; ``t`` counts each one's steps since it was born.
    """

    def __init__(self, params, exp_avgs, exp_avg_sqs, ages, lr=LR, betas=BETAS, eps=EPS):
        self.p, self.m, self.v, self.t = params, exp_avgs, exp_avg_sqs, ages
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps

    def step(self, grads, actives):
        for p, m, v, t, g, act in zip(self.p, self.m, self.v, self.t, grads, actives):
            t += act.to(t.dtype)
            m.copy_(torch.where(act, self.b1 * m + (1 - self.b1) * g, m))
            v.copy_(torch.where(act, self.b2 * v + (1 - self.b2) * g * g, v))
            bc1 = 1 - self.b1 ** t.clamp(min=1)
            bc2 = 1 - self.b2 ** t.clamp(min=1)
            update = self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps)
            p.sub_(torch.where(act, update, torch.zeros_like(update)))


def hand_forward(ps, widths, x):
    (wa, ba, wb, bb), h = ps, widths
    return F.linear(torch.relu(F.linear(x, wa[:h, :4], ba[:h])), wb[:3, :h], bb[:3])


def actives(h):
    mask = torch.zeros(9, 4, dtype=torch.bool)
    mask[:h] = True
    bias = torch.zeros(9, dtype=torch.bool)
    bias[:h] = True
    wb = torch.zeros(3, 9, dtype=torch.bool)
    wb[:, :h] = True
    return [mask, bias, wb, torch.ones(3, dtype=torch.bool)]


def hand_copy(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    m = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    v = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    return params, m, v


def run_hand(params, m, v, ages, h, first_step, steps):
    hand = HandAdam(params, m, v, ages)
    for s in range(first_step, first_step + steps):
        x, y = data(s)
        leaves = [p.clone().requires_grad_(True) for p in params]
        F.mse_loss(hand_forward(leaves, h, x), y).backward()
        hand.step([q.grad for q in leaves], actives(h))
    return hand


# ---- "keep": new neurons start a fresh Adam at any global step -------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_keep_new_neurons_first_update_equals_a_fresh_adams_after_1000_steps(foreach):
    model = Chain()
    opt = optim.Adam(model.parameters(), lr=LR, foreach=foreach)
    for s in range(1000):
        step_model(model, opt, s)
    model.wiring(opt).grow("h", 3, generator=torch.Generator().manual_seed(1), optimizer_state="keep")
    before = model.a.weight.detach().clone()
    x, y = data(1000)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    g = model.a.weight.grad[3:6, :4].clone()
    opt.step()
    moved = model.a.weight[3:6, :4] - before[3:6, :4]
    # A fresh Adam's first update is -lr * g / (|g| + eps); a few float64 roundings apart.
    torch.testing.assert_close(moved, -LR * g / (g.abs() + EPS), rtol=1e-12, atol=1e-18)
    assert opt.state[model.a.weight]["step"].item() == 1001


@pytest.mark.parametrize("policy", ["keep", "keep_global_step"])
def test_policies_against_a_hand_written_adam_at_a_large_global_step(policy):
    model = Chain()
    opt = optim.Adam(model.parameters(), lr=LR)
    for s in range(1000):
        step_model(model, opt, s)
    model.wiring(opt).grow("h", 3, generator=torch.Generator().manual_seed(1), optimizer_state=policy)
    params, m, v = hand_copy(model, opt)
    born = 0.0 if policy == "keep" else 1000.0  # keep: the new neurons' steps count from 0
    ages = [torch.full_like(p, 1000.0) for p in params]
    ages[0][3:6], ages[1][3:6], ages[2][:, 3:6] = born, born, born
    run_hand(params, m, v, ages, 6, 1000, 5)
    for s in range(1000, 1005):
        step_model(model, opt, s)
    # float64, 5 steps of the same formula evaluated in another order: ~1e-15 relative.
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-11, atol=1e-14)
    if policy == "keep_global_step":
        assert BIRTH_KEY not in opt.state[model.a.weight]


def test_keep_after_a_scrambling_shrink_and_regrowth_against_the_hand_written_adam():
    """Births out of order (explicit keep indices mixing old and new neurons), then growth along both ages."""
    model = Chain()
    opt = optim.Adam(model.parameters(), lr=LR)
    wiring = model.wiring(opt, optimizer_state="keep")
    for s in range(40):
        step_model(model, opt, s)
    wiring.grow("h", 3, generator=torch.Generator().manual_seed(1))  # neurons 3..5 born at step 40
    for s in range(40, 60):
        step_model(model, opt, s)
    wiring.shrink("h", 4, keep=[4, 0, 5, 2])  # ages: 20, 60, 20, 60
    wiring.grow("h", 2, generator=torch.Generator().manual_seed(2))  # two more born at 60
    assert opt.state[model.a.bias][BIRTH_KEY][0][:6] == [40, 0, 40, 0, 60, 60]
    assert opt.state[model.b.weight][BIRTH_KEY][1][:6] == [40, 0, 40, 0, 60, 60]
    params, m, v = hand_copy(model, opt)
    row_age = torch.tensor([20.0, 60, 20, 60, 0, 0, 0, 0, 0], dtype=D)
    ages = [row_age[:, None].expand(9, 4).clone(), row_age.clone(), row_age[None, :].expand(3, 9).clone(),
            torch.full((3,), 60.0, dtype=D)]
    run_hand(params, m, v, ages, 6, 60, 4)
    for s in range(60, 64):
        step_model(model, opt, s)
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-11, atol=1e-14)


def test_cohorts_cover_the_block_once():
    births = [[0, 0, 5, 5, 9, 0], [0, 5, 0, 7]]
    rects = cohorts((5, 4), births)
    seen = torch.zeros(6, 4, dtype=torch.long)
    age = torch.zeros(6, 4, dtype=torch.long)
    for index, b in rects:
        seen[index] += 1
        age[index] = b
    assert torch.equal(seen[:5], torch.ones(5, 4, dtype=torch.long)) and not seen[5:].any()
    rb, cb = torch.tensor(births[0][:5]), torch.tensor(births[1])
    assert torch.equal(age[:5], torch.maximum(rb[:, None], cb[None, :]))
    assert len(cohorts((4,), [[0, 0, 3, 3, 1]])) == 2


def test_a_grown_layer_growing_along_both_dimensions():
    """A middle layer is a consumer of one width and the producer of the next: ages are max(row, column)."""
    torch.manual_seed(0)
    enc = TinyEncoder(dtype=D)
    opt = optim.Adam(enc.parameters(), lr=LR)
    wiring = enc.wiring(opt, optimizer_state="keep")
    x, t = torch.randn(6, 6, dtype=D), torch.randn(6, 6, dtype=D)

    def train(k):
        for _ in range(k):
            opt.zero_grad()
            F.mse_loss(enc(x), t).backward()
            opt.step()

    train(7)
    wiring.grow("h1", 2)  # enc2's columns 5, 6 born at 7
    train(3)
    wiring.grow("h2", 2)  # enc2's rows 4, 5 born at 10
    w = enc.enc2.weight
    before = w.detach().clone()
    opt.zero_grad()
    F.mse_loss(enc(x), t).backward()
    g = w.grad.clone()
    opt.step()
    moved = w.detach() - before
    # Rows 4, 5 are one step old: their update is a fresh Adam's first one.
    torch.testing.assert_close(moved[4:6, :7], -LR * g[4:6, :7] / (g[4:6, :7].abs() + EPS), rtol=1e-12, atol=1e-18)
    assert opt.state[w][BIRTH_KEY] == [[0, 0, 0, 0, 10, 10] + [0] * 4, [0] * 5 + [7, 7] + [0] * 5]


# ---- "reset" equals a newly built optimizer bit for bit -------------------------------------
RESET_OPTIMIZERS = {
    "growdense-adam": lambda ps: optim.Adam(ps, lr=LR),
    "growdense-adamw-foreach": lambda ps: optim.AdamW(ps, lr=LR, foreach=True, weight_decay=0.1),
    "torch-adam": lambda ps: torch.optim.Adam(ps, lr=LR),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=LR),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, dampening=0.3),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=LR, initial_accumulator_value=0.5, lr_decay=0.01),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=LR),
}


@pytest.mark.parametrize("name", list(RESET_OPTIMIZERS))
def test_reset_equals_a_newly_built_optimizer_bit_for_bit(name):
    make = RESET_OPTIMIZERS[name]
    model = Chain()
    opt = make(model.parameters())
    for s in range(30):
        step_model(model, opt, s)
    model.wiring(opt).grow("h", 3, generator=torch.Generator().manual_seed(1), optimizer_state="reset")
    ref = copy.deepcopy(model)
    ref_opt = make(ref.parameters())
    for s in range(30, 40):
        step_model(model, opt, s)
        step_model(ref, ref_opt, s)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, ref_opt.state[q][key]), key


def test_reset_through_a_schedule_and_a_wiring_default():
    model = Chain()
    opt = optim.Adam(model.parameters(), lr=LR)
    wiring = model.wiring(opt, optimizer_state="reset")
    schedule = GrowthSchedule.grow_every(["h"], [3], [2], [9], every=2)
    for epoch in range(4):
        schedule.apply(epoch, wiring)
        if epoch == 2:
            assert len(opt.state) == 0  # restarted
        step_model(model, opt, epoch)
    assert opt.state[model.a.weight]["step"].item() == 2
    # An explicit argument overrides the wiring's default.
    schedule.apply(4, wiring, optimizer_state="keep")
    assert opt.state[model.a.weight]["step"].item() == 2
    assert opt.state[model.a.weight][BIRTH_KEY][0] == [0] * 5 + [2, 2, 0, 0]  # widths 5 -> 7


# ---- every optimizer: fresh state for new neurons, their updates a fresh optimizer's ----------
KEPT_EXACTLY = {
    "growdense-adam": lambda ps: optim.Adam(ps, lr=LR, weight_decay=0.01),
    "growdense-adam-amsgrad-foreach": lambda ps: optim.Adam(ps, lr=LR, amsgrad=True, foreach=True),
    "growdense-adamw": lambda ps: optim.AdamW(ps, lr=LR),
    "growdense-radam": lambda ps: optim.RAdam(ps, lr=LR, weight_decay=0.01),
    "growdense-adamax": lambda ps: optim.Adamax(ps, lr=LR),
    "growdense-adagrad-lr-decay": lambda ps: optim.Adagrad(ps, lr=LR, lr_decay=0.01, initial_accumulator_value=1.0),
    "sgd-momentum-nesterov": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, nesterov=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=LR),
    "rmsprop-centered-momentum": lambda ps: torch.optim.RMSprop(ps, lr=LR, momentum=0.5, centered=True),
    "adagrad-initial-accumulator": lambda ps: torch.optim.Adagrad(ps, lr=LR, initial_accumulator_value=1.0),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=LR),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0),
}

FRESH = {"sum": 1.0, "step_size": LR}  # Adagrad's initial accumulator, Rprop's initial step size


def fresh_value(key):
    return FRESH.get(key, 0.0)


@pytest.mark.parametrize("name", list(KEPT_EXACTLY))
def test_keep_new_neurons_start_from_the_optimizers_own_fresh_state(name):
    make = KEPT_EXACTLY[name]
    model = Chain()
    opt = make(model.parameters())
    for s in range(25):
        step_model(model, opt, s)
    old_state = {k: v.clone() for k, v in opt.state[model.a.weight].items() if torch.is_tensor(v)}
    model.wiring(opt).grow("h", 3, generator=torch.Generator().manual_seed(1), optimizer_state="keep")
    for key, value in opt.state[model.a.weight].items():
        if torch.is_tensor(value) and value.dim() > 0:
            assert torch.equal(value[3:6], torch.full_like(value[3:6], fresh_value(key))), key
            assert torch.equal(value[:3], old_state[key][:3]), key  # old neurons: unchanged
    # The new rows of the producer and columns of the consumer, as Parameters of their own.
    fresh_a = nn.Parameter(model.a.weight.detach()[3:6, :4].clone())
    fresh_b = nn.Parameter(model.b.weight.detach()[:3, 3:6].clone())
    fresh_opt = make([fresh_a, fresh_b])
    for s in range(25, 31):
        step_model(model, opt, s)
        fresh_a.grad = model.a.weight.grad[3:6, :4].clone()
        fresh_b.grad = model.b.weight.grad[:3, 3:6].clone()
        fresh_opt.step()
        # The same element-wise operations on the same values: equal bit for bit.
        assert torch.equal(model.a.weight.detach()[3:6, :4], fresh_a.detach()), s
        assert torch.equal(model.b.weight.detach()[:3, 3:6], fresh_b.detach()), s


@pytest.mark.parametrize("name", list(KEPT_EXACTLY) + ["torch-adam", "asgd", "nadam"])
def test_after_shrink_state_outside_the_block_is_fresh(name):
    make = {**KEPT_EXACTLY, **RESET_OPTIMIZERS}[name]
    model = Chain(h=6)
    opt = make(model.parameters())
    for s in range(5):
        step_model(model, opt, s)
    model.wiring(opt).shrink("h", 2, keep=[4, 1])
    for p, rows, cols in ((model.a.weight, slice(2, None), slice(None)), (model.a.bias, slice(2, None), None),
                          (model.b.weight, slice(None), slice(2, None))):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.dim() > 0:
                part = value[rows] if cols is None else value[rows, cols]
                assert torch.equal(part, torch.full_like(part, fresh_value(key))), key
    for s in range(5, 8):
        step_model(model, opt, s)
        assert not model.a.weight[2:].any() and not model.b.weight[:, 2:].any()


# ---- refusals -------------------------------------------------------------------------------
class RowStateSGD(torch.optim.SGD):
    """An optimizer whose state is not shaped like its parameter."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["row_norm"] = torch.zeros(p.shape[0])
        return super().step(closure)


def test_optimizers_that_cannot_be_kept_right_are_refused_when_attached():
    model = Chain()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="LBFGS keeps one flat history"):
        Wiring(torch.optim.LBFGS(ps))
    if hasattr(torch.optim, "Adafactor"):
        with pytest.raises(ValueError, match="factors its second moment"):
            Wiring(torch.optim.Adafactor(ps))
    with pytest.raises(ValueError, match="sparse gradients"):
        Wiring(torch.optim.SparseAdam(ps))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Wiring(torch.optim.lr_scheduler.StepLR(torch.optim.SGD(ps, lr=1.0), 1))
    odd = RowStateSGD(ps, lr=LR)
    step_model(model, odd, 0)
    with pytest.raises(ValueError, match="row_norm"):
        Wiring(odd)
    wiring = Wiring()
    with pytest.raises(ValueError, match="LBFGS"):
        wiring.optimizer = torch.optim.LBFGS(ps)
    assert wiring.optimizer is None
    with pytest.raises(ValueError, match="unknown optimizer_state"):
        Wiring(optimizer_state="fresh")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: torch.optim.Adam(ps, lr=LR), "growdense.optim.Adam"),
        (lambda ps: torch.optim.RAdam(ps, lr=LR), "growdense.optim.RAdam"),
        (lambda ps: torch.optim.NAdam(ps, lr=LR), "one step count per parameter"),
        (lambda ps: optim.Adam(ps, lr=LR, fused=True, amsgrad=True), "fused=True"),  # torch's fused kernel
        (lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, dampening=0.1), "dampening"),
        (lambda ps: torch.optim.Adagrad(ps, lr=LR, lr_decay=0.1), "lr_decay"),
        (lambda ps: torch.optim.ASGD(ps, lr=LR), "ASGD keeps eta and mu"),
    ],
)
def test_explicit_keep_that_cannot_be_exact_raises_and_changes_nothing(make, match):
    model = Chain()
    opt = make(model.parameters())
    try:
        step_model(model, opt, 0)
    except RuntimeError as error:  # no fused CPU kernel in this torch build
        pytest.skip(str(error))
    wiring = model.wiring(opt)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        wiring.grow("h", 2, optimizer_state="keep")
    with pytest.raises(ValueError, match=match):
        GrowthSchedule.grow_every(["h"], [3], [2], [9], every=1).apply(1, wiring, optimizer_state="keep")
    assert_same(before, snapshot(model, opt))
    # The default policy falls back to keep_global_step, saying so.
    with pytest.warns(UserWarning, match="keep_global_step"):
        wiring.grow("h", 2)
    assert model.a.out_features == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wiring.grow("h", 1, optimizer_state="keep_global_step")


# ---- state_dict, checkpoints --------------------------------------------------------------
def test_keep_state_round_trips_through_a_checkpoint(tmp_path):
    def build():
        model = Chain()
        opt = optim.Adam(model.parameters(), lr=LR)
        return model, opt, model.wiring(opt, optimizer_state="keep")

    model, opt, wiring = build()
    for s in range(20):
        step_model(model, opt, s)
    wiring.grow("h", 3, generator=torch.Generator().manual_seed(1))
    for s in range(20, 23):
        step_model(model, opt, s)
    save_checkpoint(tmp_path / "c.pt", model, opt, wiring=wiring)
    other, other_opt, other_wiring = build()
    load_checkpoint(tmp_path / "c.pt", other, other_opt, wiring=other_wiring)
    assert other_opt.state[other.a.weight][BIRTH_KEY] == opt.state[model.a.weight][BIRTH_KEY]
    for s in range(23, 28):
        step_model(model, opt, s)
        step_model(other, other_opt, s)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    # A plain torch Adam loads it too (and ignores the births).
    plain = torch.optim.Adam(other.parameters(), lr=LR)
    plain.load_state_dict(opt.state_dict())


def test_loading_another_optimizers_checkpoint_is_refused_before_anything_changes(tmp_path):
    model = Chain()
    adam = torch.optim.Adam(model.parameters(), lr=LR)
    step_model(model, adam, 0)
    save_checkpoint(tmp_path / "adam.pt", model, adam)
    sgd_model = Chain(seed=1)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=0.9)
    step_model(sgd_model, sgd, 0)
    save_checkpoint(tmp_path / "sgd.pt", sgd_model, sgd)
    before = snapshot(sgd_model, sgd)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="another kind of optimizer"):
        load_checkpoint(tmp_path / "adam.pt", sgd_model, sgd)
    assert_same(before, snapshot(sgd_model, sgd))
    assert torch.equal(rng, torch.get_rng_state())
    with pytest.raises(CheckpointError, match="another kind of optimizer"):
        load_checkpoint(tmp_path / "sgd.pt", model, adam)
    adamax = torch.optim.Adamax(model.parameters(), lr=LR)
    step_model(model, adamax, 1)
    with pytest.raises(CheckpointError, match="exp_inf"):
        load_checkpoint(tmp_path / "adam.pt", model, adamax)
    # The same kind loads.
    load_checkpoint(tmp_path / "adam.pt", model, torch.optim.Adam(model.parameters(), lr=LR))
    load_checkpoint(tmp_path / "adam.pt", model, optim.Adam(model.parameters(), lr=LR))


# ---- the public-API fallback of the private Adam._init_group --------------------------------
class PublicAdam(optim.Adam):
    step = optim._public_step


def test_public_fallback_step_equals_the_default_path_bit_for_bit():
    models = [Chain(), Chain()]
    opts = [optim.Adam(models[0].parameters(), lr=LR, amsgrad=True), PublicAdam(models[1].parameters(), lr=LR, amsgrad=True)]
    wirings = [m.wiring(o, optimizer_state="keep") for m, o in zip(models, opts)]
    for s in range(12):
        if s in (4, 8):
            for w in wirings:
                w.grow("h", 2, generator=torch.Generator().manual_seed(s))
        for m, o in zip(models, opts):
            step_model(m, o, s)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
        for key, value in opts[0].state[p].items():
            other = opts[1].state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_torch_version_gate():
    assert torch_version("2.14.1+cu130") == (2, 14)
    assert in_tested_range("2.11.0") and in_tested_range("2.15.0")
    assert not in_tested_range("2.10.2") and not in_tested_range("2.16.0")
    if in_tested_range():
        assert ADAM_INIT_GROUP  # the private path is the one tested in this range


def test_without_the_private_hook_an_optimizer_is_torchs_own_and_keep_is_refused(monkeypatch):
    """Outside the tested torch range RAdam, Adamax and Adagrad fall back to torch's own step."""
    from growdense import _torch_internals

    if in_tested_range():
        assert all(_torch_internals.INIT_GROUP.values())
    monkeypatch.setattr(optim.RAdam, "_hooked", False)
    monkeypatch.setattr(optim.RAdam, "_steps_by_age", False)
    ours, ref = Chain(), Chain()
    o1, o2 = optim.RAdam(ours.parameters(), lr=LR), torch.optim.RAdam(ref.parameters(), lr=LR)
    for s in range(3):
        step_model(ours, o1, s)
        step_model(ref, o2, s)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(v, o2.state[q][k]) for k, v in o1.state[p].items())
    with pytest.raises(ValueError, match="cannot count each neuron's steps"):
        ours.wiring(o1).grow("h", 1, optimizer_state="keep")
    ours.wiring(o1).grow("h", 1, optimizer_state="reset")
