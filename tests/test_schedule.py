"""GrowthSchedule: the study's two approaches (Tables 1 and 2) and applying them to a Wiring."""

from __future__ import annotations

import pytest
import torch

from growdense import GrowLinear, GrowthEvent, GrowthSchedule, Wiring
from grow_helpers import TinyEncoder, assert_same, snapshot, train_step

# Tables 1 and 2 of the study: widths after each growth (growth k at the start of epoch 25k).
TABLE_1 = [(32, 16), (64, 32), (96, 48), (128, 64), (160, 80), (192, 96), (224, 112), (256, 128)]
TABLE_2 = [(256, 128), (64, 32), (96, 48), (128, 64), (160, 80), (192, 96), (224, 112), (256, 128)]


def approach_1() -> GrowthSchedule:
    return GrowthSchedule.grow_every(["h1", "h2"], start=(32, 16), step=(32, 16), target=(256, 128), every=25)


def approach_2() -> GrowthSchedule:
    return GrowthSchedule.prune_then_regrow(
        ["h1", "h2"], full=(256, 128), cut_to=(32, 16), step=(32, 16), at=25, every=25
    )


@pytest.mark.parametrize("schedule,table", [(approach_1, TABLE_1), (approach_2, TABLE_2)], ids=["approach1", "approach2"])
def test_study_tables(schedule, table):
    s = schedule()
    assert s.growth_epochs() == [25, 50, 75, 100, 125, 150, 175]
    assert s.initial_widths() == {"h1": table[0][0], "h2": table[0][1]}
    for epoch in range(200):
        h1, h2 = table[min(epoch // 25, 7)]
        assert s.widths_at(epoch) == {"h1": h1, "h2": h2}, epoch


def test_approach_2_event_cuts_then_grows_in_one_step():
    event = approach_2().event_at(25)
    assert dict(event.shrink_to) == {"h1": 32, "h2": 16}
    assert dict(event.grow_by) == {"h1": 32, "h2": 16}
    assert approach_2().event_at(24) is None


def test_grow_every_clamps_the_last_step():
    s = GrowthSchedule.grow_every(["a"], start=[3], step=[4], target=[9], every=2)
    assert [s.widths_at(e)["a"] for e in range(7)] == [3, 3, 7, 7, 9, 9, 9]


def study_wiring(optimizer_factory=None, h1=32, h2=16):
    """The study's encoder shape at capacity 256/128 (the decoder is left out)."""
    torch.manual_seed(0)
    model = TinyEncoder(d_in=6, h1=h1, h2=h2, latent=2, cap1=256, cap2=128)
    opt = (optimizer_factory or (lambda ps: torch.optim.Adam(ps, lr=1e-3)))(model.parameters())
    return model, opt, model.wiring(opt)


@pytest.mark.parametrize("schedule", [approach_1, approach_2], ids=["approach1", "approach2"])
def test_apply_follows_the_schedule(schedule):
    s = schedule()
    model, opt, wiring = study_wiring(h1=s.initial_widths()["h1"], h2=s.initial_widths()["h2"])
    x = torch.randn(8, 6)
    g = torch.Generator().manual_seed(0)
    for epoch in range(200):
        changed = s.apply(epoch, wiring, generator=g)
        assert changed == (epoch in s.growth_epochs())
        assert wiring.widths() == s.widths_at(epoch)
        assert model(x).shape == (8, 4)
        if epoch in (0, 25, 26):  # a few steps so optimizer state exists across the cut
            train_step(model, opt, x, torch.zeros(8, 4))
    assert model.enc1.out_features == 256 and model.mu.in_features == 128


def test_approach_2_keeps_the_first_neurons_and_zeroes_regrown_state():
    s = approach_2()
    model, opt, wiring = study_wiring(h1=256, h2=128)
    x = torch.randn(8, 6)
    train_step(model, opt, x, torch.zeros(8, 4))
    w1 = model.enc1.weight.detach().clone()
    m1 = opt.state[model.enc1.weight]["exp_avg"].clone()
    assert s.apply(25, wiring, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.enc1.weight[:32], w1[:32])  # kept: the first 32
    assert not torch.equal(model.enc1.weight[32:64], w1[32:64])  # regrown: fresh He rows
    assert torch.all(model.enc1.weight[64:] == 0)
    assert torch.equal(opt.state[model.enc1.weight]["exp_avg"][:32], m1[:32])
    assert torch.all(opt.state[model.enc1.weight]["exp_avg"][32:] == 0)


def test_apply_with_keep_per_hidden_width():
    s = approach_2()
    model, opt, wiring = study_wiring(h1=256, h2=128)
    w1 = model.enc1.weight.detach().clone()
    w2 = model.enc2.weight.detach().clone()
    largest = sorted(w1[:, :6].norm(dim=1).argsort(descending=True)[:32].tolist())
    assert largest != list(range(32))
    # Only what changes place moves (issue 27): kept neurons among the first 32 stay, the
    # others fill the dropped places among the first 32 in increasing order.
    outside = iter(i for i in largest if i >= 32)
    largest = [i if i in largest else next(outside) for i in range(32)]
    s.apply(25, wiring, keep={"h1": "norm"}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.enc1.weight[:32], w1[largest])
    # h2 keeps its first 16 rows; their columns over h1 were permuted like h1.
    assert torch.equal(model.enc2.weight[:16, :32], w2[:16][:, largest])
    with pytest.raises(ValueError, match="not in the schedule"):
        approach_2().apply(25, wiring, keep={"h3": "norm"})


def test_apply_with_zero_out_preserves_the_function():
    s = approach_1()
    model, opt, wiring = study_wiring()
    x = torch.randn(8, 6)
    before = model(x).detach()
    s.apply(25, wiring, init="zero_out", generator=torch.Generator().manual_seed(0))
    # float32 rounding of a longer inner product: see tests/test_wiring.py for the tolerance.
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=1e-5)


def test_apply_refuses_a_wiring_at_other_widths_and_changes_nothing():
    s = approach_1()
    model, opt, wiring = study_wiring(h1=64, h2=16)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="not the schedule's widths"):
        s.apply(25, wiring)
    assert_same(snapshot(model, opt), before)
    assert s.apply(24, wiring) is False  # no event: nothing checked, nothing done


def test_apply_validates_every_name_before_changing_any():
    # h2 can only reach 20, so the epoch-2 event fails on h2 and must leave h1 alone.
    torch.manual_seed(0)
    layers = [GrowLinear(3, 4, capacity_out=16), GrowLinear(4, 4, capacity_in=16, capacity_out=20), GrowLinear(4, 2, capacity_in=20)]
    wiring = Wiring.chain(layers)
    s = GrowthSchedule(
        {"h1": 4, "h2": 4}, [GrowthEvent(2, shrink_to={"h1": 2}, grow_by={"h1": 4, "h2": 17})]
    )
    before = [layer.weight.detach().clone() for layer in layers]
    with pytest.raises(ValueError, match="exceeds its capacity 20"):
        s.apply(2, wiring)
    assert wiring.widths() == {"h1": 4, "h2": 4}
    assert all(torch.equal(a, layer.weight) for a, layer in zip(before, layers))


def test_apply_unknown_name():
    model, opt, wiring = study_wiring()
    s = GrowthSchedule({"h1": 32, "h9": 4}, [GrowthEvent(1, grow_by={"h9": 1})])
    with pytest.raises(KeyError, match="unknown hidden width 'h9'"):
        s.apply(1, wiring)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GrowthSchedule.grow_every(["a"], [4], [0], [8], 5), "step >= 1"),
        (lambda: GrowthSchedule.grow_every(["a"], [9], [1], [8], 5), "start <= target"),
        (lambda: GrowthSchedule.grow_every(["a", "b"], [1], [1], [2], 5), "1 values for 2"),
        (lambda: GrowthSchedule.grow_every(["a"], [1], [1], [2], 0), "every"),
        (lambda: GrowthSchedule.prune_then_regrow(["a"], [8], [9], [1], 3, 2), "cut_to <= full"),
        (lambda: GrowthSchedule({"a": 4}, [GrowthEvent(1, shrink_to={"a": 5})]), "4 wide"),
        (lambda: GrowthSchedule({"a": 4}, [GrowthEvent(1), GrowthEvent(1)]), "share an epoch"),
        (lambda: GrowthSchedule({"a": 4}, [GrowthEvent(1, grow_by={"b": 1})]), "no initial width"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_negative_epoch_is_refused():
    s = approach_1()
    model, opt, wiring = study_wiring()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        s.apply(-1, wiring)
    assert_same(before, snapshot(model, opt))


def test_cut_and_regrow_to_the_same_width_reports_the_change():
    """An event that cuts 32 -> 8 and regrows by 24 ends at 32 neurons, 24 of them new: apply()
    says the wiring changed (the growth-event log records it), as for any other cut or growth."""
    s = GrowthSchedule({"h1": 32, "h2": 16}, [GrowthEvent(1, shrink_to={"h1": 8}, grow_by={"h1": 24})])
    _, _, wiring = study_wiring()
    w = wiring.producer("h1").weight
    old = w[:32].detach().clone()
    assert s.apply(1, wiring, generator=torch.Generator().manual_seed(0)) is True
    assert wiring.width("h1") == 32 and s.widths_at(1) == s.initial_widths()
    assert torch.equal(w[:8], old[:8]) and not torch.equal(w[8:32], old[8:32])  # rows 8..31 were replaced
    assert s.apply(0, wiring) is False  # no event
    noop = GrowthSchedule({"h1": 32}, [GrowthEvent(0, shrink_to={"h1": 32}, grow_by={"h1": 0})])
    assert noop.apply(0, wiring) is False  # shrinking to the width it has, growing by 0: nothing changes
