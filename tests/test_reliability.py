"""A failed call changes nothing: one regression test per defect found by adversarial probing.

Each test is named for the defect it pins down (``test_defect_<n>_...``). The "nothing
changed" checks compare a deep snapshot (parameters, gradients, widths, optimizer state,
the global RNG) bit for bit: a failed call must not write a single element.
"""

from __future__ import annotations

import io
import math
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from growdense import CheckpointError, GrowLinear, GrowthEvent, GrowthSchedule, Wiring
from growdense import load_checkpoint, save_checkpoint
from growdense._checks import check_int
from growdense.layers import active_block
from grow_helpers import TinyEncoder, assert_same, reference_forward, snapshot, train_step


def pair():
    """The issue's reproducer: ``a`` (3 -> 4, capacity 8, ReLU) feeding ``b`` (4 -> 2, capacity 8)."""
    torch.manual_seed(0)
    a = GrowLinear(3, 4, capacity_out=8, activation="relu")
    b = GrowLinear(4, 2, capacity_in=8)
    return a, b


def trained_pair(opt_cls=torch.optim.Adam):
    a, b = pair()
    model = nn.Sequential(a, b)
    opt = opt_cls(model.parameters(), lr=1e-2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    for _ in range(2):
        train_step(model, opt, x, y)
    return model, opt


def full_snapshot(model, opt=None):
    snap = snapshot(model, opt)
    snap["global_rng"] = torch.get_rng_state()
    return snap


def assert_outside_block_zero(layer: GrowLinear, opt=None):
    for param in (layer.weight, layer.bias):
        if param is None:
            continue
        mask = torch.ones_like(param, dtype=torch.bool)
        mask[active_block(param)] = False
        tensors = [param.detach(), param.grad] + [
            v for v in (opt.state.get(param, {}).values() if opt else []) if isinstance(v, torch.Tensor) and v.dim()
        ]
        for t in tensors:
            if t is not None:
                assert not t[mask].any()


# ---- Wiring --------------------------------------------------------------------------
@pytest.mark.parametrize("not_an_optimizer", ["scheduler", "list", "params"])
def test_defect_1_wiring_refuses_what_is_not_an_optimizer_at_construction(not_an_optimizer):
    model, opt = trained_pair()
    thing = {
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1),
        "list": [opt],
        "params": list(model.parameters()),
    }[not_an_optimizer]
    with pytest.raises(TypeError, match="Wiring needs a torch.optim.Optimizer"):
        Wiring(thing)
    wiring = Wiring(opt)
    with pytest.raises(TypeError, match="Wiring needs a torch.optim.Optimizer"):
        wiring.optimizer = thing
    assert wiring.optimizer is opt
    if not_an_optimizer == "scheduler":
        with pytest.raises(TypeError, match="pass its .optimizer"):
            Wiring(thing)


def test_defect_1_shrink_with_a_permutation_keeps_producer_and_consumer_together():
    model, opt = trained_pair()
    a, b = model
    wiring = Wiring(opt)
    wiring.add("h", a, [b])
    x = torch.randn(5, 3)
    before = model(x)
    wiring.shrink("h", 4, keep=[3, 2, 1, 0])  # a pure permutation: the function is unchanged
    # float32 sums in another order: a few ulps of O(1) outputs.
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    wiring.shrink("h", 2, keep="first")
    for layer in (a, b):
        assert_outside_block_zero(layer, opt)


@pytest.mark.parametrize(
    "split_noise,error",
    [("x", TypeError), (None, TypeError), (True, TypeError), (math.nan, ValueError), (math.inf, ValueError),
     (-0.1, ValueError), (torch.tensor(0.1), TypeError)],
)
def test_defect_2_bad_split_noise_is_refused_before_anything_grows(split_noise, error):
    model, opt = trained_pair()
    a, b = model
    wiring = Wiring(opt)
    wiring.add("h", a, [b])
    before = full_snapshot(model, opt)
    with pytest.raises(error, match="split_noise"):
        wiring.grow("h", 2, init="split", split_noise=split_noise)
    with pytest.raises(error, match="split_noise"):
        wiring.check_grow("h", 2, "split", split_noise=split_noise)
    assert_same(full_snapshot(model, opt), before)


def test_defect_2_split_noise_accepts_real_numbers():
    model, opt = trained_pair()
    a, b = model
    wiring = Wiring(opt)
    wiring.add("h", a, [b])
    for noise in (0, 0.0, np.float64(1e-3), 1):
        wiring.grow("h", 1, init="split", split_noise=noise)
    assert wiring.width("h") == 8
    assert torch.isfinite(a.weight).all() and torch.isfinite(b.weight).all()


# ---- GrowthSchedule / GrowthEvent -------------------------------------------------------
@pytest.mark.parametrize("count", [1.5, True, np.bool_(True), "2", 2.0, torch.tensor(2)])
def test_defect_3_growth_event_refuses_non_integer_counts_at_construction(count):
    with pytest.raises(TypeError, match="must be an int"):
        GrowthEvent(1, grow_by={"h1": count})
    with pytest.raises(TypeError, match="must be an int"):
        GrowthEvent(1, shrink_to={"h1": count})
    with pytest.raises(TypeError, match="must be an int"):
        GrowthEvent(count, grow_by={"h1": 1})


def test_defect_3_numpy_integer_counts_are_plain_ints():
    event = GrowthEvent(np.int64(2), shrink_to={"h1": np.int32(3)}, grow_by={"h2": np.int64(1)})
    assert event.epoch == 2 and type(event.epoch) is int
    assert type(event.shrink_to["h1"]) is int and type(event.grow_by["h2"]) is int


def test_defect_3_apply_validates_every_action_before_changing_anything():
    torch.manual_seed(0)
    model = TinyEncoder(h1=5, h2=4, cap1=12, cap2=10)
    opt = torch.optim.Adam(model.parameters())
    train_step(model, opt, torch.randn(4, 6), torch.randn(4, 6))
    wiring = model.wiring(opt)
    # h1 shrinks fine, then h2 would grow past its capacity (4 + 7 > 10).
    schedule = GrowthSchedule({"h1": 5, "h2": 4}, [GrowthEvent(1, shrink_to={"h1": 2}, grow_by={"h2": 7})])
    before = full_snapshot(model, opt)
    with pytest.raises(ValueError, match="exceeds its capacity"):
        schedule.apply(1, wiring)
    with pytest.raises(ValueError, match="split_noise"):
        GrowthSchedule({"h1": 5, "h2": 4}, [GrowthEvent(1, shrink_to={"h1": 2}, grow_by={"h2": 1})]).apply(
            1, wiring, init="split", split_noise=math.nan
        )
    with pytest.raises(ValueError, match="unknown init"):
        schedule.apply(0, wiring, init="bogus")  # arguments are checked at every epoch
    assert_same(full_snapshot(model, opt), before)


def test_defect_3_schedule_with_numpy_widths_applies_fully():
    torch.manual_seed(0)
    model = TinyEncoder(h1=5, h2=4, cap1=12, cap2=10)
    wiring = model.wiring()
    schedule = GrowthSchedule.grow_every(["h1", "h2"], np.array([5, 4]), np.array([2, 3]), (9, 10), np.int64(2))
    for epoch in range(8):
        schedule.apply(epoch, wiring)
        assert wiring.widths() == schedule.widths_at(epoch)
        assert all(type(w) is int for w in wiring.widths().values())


# ---- GrowLinear.load_state_dict ---------------------------------------------------------
def grown_state():
    """A state_dict of a layer grown to 6 of 8 outputs, and a fresh layer at 4 to load it into."""
    torch.manual_seed(1)
    src = GrowLinear(3, 4, capacity_out=8)
    src.grow_out(2)
    torch.manual_seed(2)
    dst = GrowLinear(3, 4, capacity_out=8)
    return src.state_dict(), dst


def layer_snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)} | {
        "widths": (layer.in_features, layer.out_features)
    }


def test_defect_4_strict_missing_weight_raises_before_anything_changes():
    state, dst = grown_state()
    del state["weight"]
    before = layer_snapshot(dst)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"weight\""):
        dst.load_state_dict(state)
    assert_same(layer_snapshot(dst), before)


def test_defect_4_partial_state_keeps_the_invariant():
    state, dst = grown_state()
    del state["weight"]
    old_weight = dst.weight.detach().clone()
    result = dst.load_state_dict(state, strict=False)
    assert result.missing_keys == ["weight"]
    assert (dst.in_features, dst.out_features) == (3, 6)
    assert torch.equal(dst.bias, state["bias"])
    # The absent weight keeps its values inside the block; the new rows were zero before.
    assert torch.equal(dst.weight, old_weight)
    # Shrinking widths through a partial state zeroes what leaves the block.
    state2 = {"_extra_state": {"version": 1, "in_features": 2, "out_features": 3}}
    dst.load_state_dict(state2, strict=False)
    assert not dst.weight[3:].any() and not dst.weight[:, 2:].any() and not dst.bias[3:].any()
    assert torch.equal(dst.weight[:3, :2], old_weight[:3, :2])


def test_defect_5_nn_linear_state_with_only_bias_leaves_the_weight_untouched():
    torch.manual_seed(0)
    layer = GrowLinear(3, 4, capacity_in=5, capacity_out=8)
    weight = layer.weight.detach().clone()
    bias = torch.arange(4.0)
    result = layer.load_state_dict({"bias": bias}, strict=False)
    assert result.missing_keys == ["weight"]
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.bias[:4], bias) and not layer.bias[4:].any()


def test_defect_6_strict_unexpected_key_raises_like_nn_linear():
    torch.manual_seed(0)
    layer = GrowLinear(3, 4, capacity_out=8)
    state = layer.state_dict()
    state["junk"] = torch.zeros(1)
    linear_state = nn.Linear(3, 4).state_dict() | {"junk": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"junk\""):
        nn.Linear(3, 4).load_state_dict(linear_state)  # the behaviour to match
    before = layer_snapshot(layer)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"junk\""):
        layer.load_state_dict(state)
    assert_same(layer_snapshot(layer), before)
    assert nn.Linear(3, 4).load_state_dict(linear_state, strict=False).unexpected_keys == ["junk"]
    assert layer.load_state_dict(state, strict=False).unexpected_keys == ["junk"]  # reported, not raised


def test_defect_6_unexpected_key_inside_a_sequential():
    torch.manual_seed(0)
    seq = nn.Sequential(GrowLinear(3, 4, capacity_out=8), nn.ReLU())
    state = seq.state_dict()
    state["0.junk"] = torch.zeros(1)
    before = layer_snapshot(seq[0])
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"0.junk\""):
        seq.load_state_dict(state)
    assert_same(layer_snapshot(seq[0]), before)


@pytest.mark.parametrize("kind", ["growdense", "nn.Linear", "nn.Linear-below-capacity"])
def test_defect_7_assign_on_a_meta_layer_really_assigns(kind):
    torch.manual_seed(0)
    if kind == "growdense":
        src = GrowLinear(3, 4, capacity_out=8)
        state = src.state_dict()
        meta = GrowLinear(3, 4, capacity_out=8, device="meta")
    else:
        src = nn.Linear(3, 4)
        state = src.state_dict()
        meta = GrowLinear(3, 4, capacity_out=8 if kind.endswith("capacity") else 4, device="meta")
    meta.load_state_dict(state, assign=True)
    assert meta.weight.device.type == "cpu" and meta.bias.device.type == "cpu"
    assert isinstance(meta.weight, nn.Parameter) and meta.weight.requires_grad
    x = torch.randn(5, 3)
    torch.testing.assert_close(meta(x), src(x), atol=0, rtol=0)  # the same numbers, same kernel
    # The assigned Parameters are registered: active_block finds the layer.
    assert active_block(meta.weight) == (slice(0, 4), slice(0, 3))


# ---- checkpoints ----------------------------------------------------------------------
def checkpoint_setup(tmp_path):
    torch.manual_seed(0)
    model = TinyEncoder(h1=5, h2=4, cap1=12, cap2=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    wiring = model.wiring(opt)
    train_step(model, opt, torch.randn(4, 6), torch.randn(4, 6))
    wiring.grow("h1", 2)
    train_step(model, opt, torch.randn(4, 6), torch.randn(4, 6))
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, opt, wiring=wiring, extra={"epoch": 3})
    return model, opt, wiring, path


def test_defect_8_wiring_of_another_model_is_refused_before_anything_changes(tmp_path):
    _, _, _, path = checkpoint_setup(tmp_path)
    torch.manual_seed(5)
    target = TinyEncoder(h1=5, h2=4, cap1=12, cap2=10)
    opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    train_step(target, opt, torch.randn(4, 6), torch.randn(4, 6))
    other = TinyEncoder(h1=5, h2=4, cap1=12, cap2=10)  # same shapes, other layers
    before = full_snapshot(target, opt)
    with pytest.raises(CheckpointError, match="not part of this model"):
        load_checkpoint(path, target, opt, wiring=other.wiring())
    assert_same(full_snapshot(target, opt), before)


def test_defect_8_wiring_whose_widths_would_differ_is_refused_before_anything_changes(tmp_path):
    _, _, _, path = checkpoint_setup(tmp_path)
    torch.manual_seed(5)
    target = TinyEncoder(h1=5, h2=4, cap1=12, cap2=10)
    opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    wiring = Wiring(opt)  # h1 registered as h2 and the other way round
    wiring.add("h2", target.enc1, [target.enc2])
    wiring.add("h1", target.enc2, [target.mu, target.logvar])
    before = full_snapshot(target, opt)
    with pytest.raises(CheckpointError, match="would be"):
        load_checkpoint(path, target, opt, wiring=wiring)
    assert_same(full_snapshot(target, opt), before)


@pytest.mark.parametrize(
    "value",
    [np.float64(0.5), np.int64(3), np.zeros(2), pathlib.Path("x"), {"nested": [1, np.float32(2)]}, slice(1, 2)],
    ids=["np.float64", "np.int64", "ndarray", "Path", "nested", "slice"],
)
def test_defect_9_extra_is_validated_at_save_and_the_previous_file_stays(tmp_path, value):
    model, opt, wiring, path = checkpoint_setup(tmp_path)
    good = path.read_bytes()
    with pytest.raises(TypeError, match=r"extra\['v'\].*weights_only=True"):
        save_checkpoint(path, model, opt, wiring=wiring, extra={"v": value})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_defect_9_plain_extra_values_round_trip(tmp_path):
    model, opt, wiring, path = checkpoint_setup(tmp_path)
    extra = {"i": 1, "f": 0.5, "s": "x", "n": None, "t": torch.arange(3), "l": [1, (2, 3)], "d": {"a": True}}
    save_checkpoint(path, model, opt, wiring=wiring, extra=extra)
    loaded = load_checkpoint(path, model, opt, wiring=wiring)
    assert loaded.keys() == extra.keys() and torch.equal(loaded.pop("t"), extra.pop("t")) and loaded == extra


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


def _foreign_pickle(data: bytes) -> bytes:
    return pickle.dumps({"format": "something-else"})


def _whole_model_pickle(data: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save(nn.Linear(2, 2), buffer)  # needs weights_only=False: refused
    return buffer.getvalue()


def _missing_keys(data: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": "growdense-checkpoint", "version": 1, "model": {}}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "damage", [_truncate, _corrupt, _foreign_pickle, _whole_model_pickle, _missing_keys, lambda d: b"", lambda d: b"x" * 100]
)
def test_defect_15_unreadable_files_give_a_checkpoint_error_naming_the_file(tmp_path, damage):
    model, opt, wiring, path = checkpoint_setup(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(damage(path.read_bytes()))
    before = full_snapshot(model, opt)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*not a (readable )?growdense checkpoint"):
        load_checkpoint(bad, model, opt, wiring=wiring)
    assert_same(full_snapshot(model, opt), before)


def test_missing_file_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt", TinyEncoder())


def test_generator_state_of_another_kind_is_refused_before_anything_changes(tmp_path):
    model, opt, wiring, path = checkpoint_setup(tmp_path)
    save_checkpoint(path, model, opt, generators={"g": torch.Generator()})
    payload = torch.load(path, weights_only=True)
    payload["generators"]["g"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(payload, path)
    before = full_snapshot(model, opt)
    with pytest.raises(CheckpointError, match="generator 'g'"):
        load_checkpoint(path, model, opt, generators={"g": torch.Generator()})
    assert_same(full_snapshot(model, opt), before)


# ---- Parameters ------------------------------------------------------------------------
def test_parameters_saved_alone_load_with_the_default_torch_load(tmp_path):
    model = TinyEncoder()
    params = list(model.parameters())
    torch.save(params, tmp_path / "p.pt")
    loaded = torch.load(tmp_path / "p.pt")  # the default: weights_only=True
    assert all(isinstance(p, nn.Parameter) and torch.equal(p, q) for p, q in zip(loaded, params))
    assert all(active_block(p) is None for p in loaded)  # copies belong to no layer
    assert active_block(model.enc1.weight) == (slice(0, 5), slice(0, 6))
    linear = nn.Linear(2, 3)  # the behaviour to match
    torch.save(list(linear.parameters()), tmp_path / "l.pt")
    torch.load(tmp_path / "l.pt")


def test_copies_keep_their_own_active_block():
    import copy

    model = TinyEncoder()
    twin = copy.deepcopy(model)
    twin.wiring().grow("h1", 3)
    assert active_block(model.enc1.weight) == (slice(0, 5), slice(0, 6))
    assert active_block(twin.enc1.weight) == (slice(0, 8), slice(0, 6))
    again = pickle.loads(pickle.dumps(twin))
    assert active_block(again.enc1.weight) == (slice(0, 8), slice(0, 6))


def test_shared_weight_cannot_be_grown_or_shrunk():
    torch.manual_seed(0)
    first = nn.Sequential(GrowLinear(3, 4, capacity_out=8, activation="relu"), GrowLinear(4, 2, capacity_in=8))
    second = nn.Sequential(GrowLinear(3, 4, capacity_out=8, activation="relu"), GrowLinear(4, 2, capacity_in=8))
    second[0].weight = first[0].weight  # tied
    w1, w2 = Wiring(), Wiring()
    w1.add("h", first[0], [first[1]])
    w2.add("h", second[0], [second[1]])
    before = full_snapshot(nn.ModuleList([first, second]))
    for wiring in (w1, w2):
        with pytest.raises(RuntimeError, match="shares its weight with another GrowLinear"):
            wiring.grow("h", 2)
        with pytest.raises(RuntimeError, match="shares its weight with another GrowLinear"):
            wiring.shrink("h", 2)
    with pytest.raises(RuntimeError, match="shares its weight"):
        first[0].grow_out(1)
    assert_same(full_snapshot(nn.ModuleList([first, second])), before)
    assert active_block(first[0].weight) is None  # shared: an optimizer steps over all of it
    # Untied again, growth works.
    second[0].weight = nn.Parameter(first[0].weight.detach().clone())
    w1.grow("h", 2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(first(x), reference_forward_pair(first, x), atol=1e-5, rtol=1e-5)


def reference_forward_pair(seq, x):
    a, b = seq
    h = torch.relu(x @ a.weight[: a.out_features, : a.in_features].T + a.bias[: a.out_features])
    return h @ b.weight[: b.out_features, : b.in_features].T + b.bias[: b.out_features]


# ---- one integer check ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_integer_check_accepts_non_bool_integers(value):
    assert check_int("n", value) == 3 and type(check_int("n", value)) is int


@pytest.mark.parametrize("value", [True, np.bool_(False), 3.0, 1.5, "3", None, torch.tensor(3), [3]])
def test_integer_check_refuses_everything_else(value):
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", value)


def test_numpy_counts_everywhere_give_python_int_widths():
    torch.manual_seed(0)
    model = TinyEncoder()
    wiring = model.wiring()
    wiring.grow("h1", np.int64(2))
    wiring.shrink("h2", np.int32(2), keep=np.array([3, 0]))
    model.enc1.grow_in(np.int64(0))
    layer = GrowLinear(np.int64(3), np.int64(2), capacity_out=np.int64(4))
    for m in (model.enc1, model.enc2, model.mu, layer):
        assert type(m.in_features) is int and type(m.out_features) is int
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), reference_forward(model, x), atol=1e-5, rtol=1e-5)
