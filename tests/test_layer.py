"""GrowLinear: drop-in for nn.Linear, in-place growth and shrinking, state_dict, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growdense import GrowLinear


def snapshot(layer: GrowLinear) -> dict:
    state = {name: t.detach().clone() for name, t in layer.named_parameters()}
    for name, p in layer.named_parameters():
        state[name + ".grad"] = None if p.grad is None else p.grad.clone()
    state["widths"] = (layer.in_features, layer.out_features)
    return state


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_zero_outside(layer: GrowLinear) -> None:
    ai, ao = layer.in_features, layer.out_features
    for t in (layer.weight, layer.weight.grad):
        if t is not None:
            assert not t[ao:].any() and not t[:, ai:].any()
    if layer.bias is not None:
        for t in (layer.bias, layer.bias.grad):
            if t is not None:
                assert not t[ao:].any()


class TestDropIn:
    def test_same_init_and_output_as_nn_linear(self):
        torch.manual_seed(0)
        ref = nn.Linear(12, 7)
        torch.manual_seed(0)
        layer = GrowLinear(12, 7)
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
        x = torch.randn(5, 3, 12)
        # Both sides are one float32 GEMM of the same values; only blocking may differ.
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-6, atol=1e-6)

    def test_active_block_initialised_like_nn_linear_of_the_active_size(self):
        torch.manual_seed(1)
        ref = nn.Linear(12, 7)
        torch.manual_seed(1)
        layer = GrowLinear(12, 7, capacity_in=40, capacity_out=30)
        assert torch.equal(layer.active_weight, ref.weight) and torch.equal(layer.active_bias, ref.bias)
        assert_zero_outside(layer)

    def test_fused_relu(self):
        layer = GrowLinear(6, 4, activation="relu")
        x = torch.randn(9, 6)
        # One float32 GEMM on each side; the relu is exact.
        torch.testing.assert_close(layer(x), F.relu(F.linear(x, layer.weight, layer.bias)))

    def test_no_bias_and_dtype_device_arguments(self):
        layer = GrowLinear(3, 2, bias=False, dtype=torch.float64, device="cpu")
        assert layer.bias is None and layer.weight.dtype == torch.float64
        x = torch.randn(4, 3, dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=1e-12, atol=1e-12)

    def test_load_nn_linear_state_dict(self):
        ref = nn.Linear(5, 3)
        for capacity in ({}, {"capacity_in": 9, "capacity_out": 8}):
            layer = GrowLinear(5, 3, **capacity)
            layer.load_state_dict(ref.state_dict())
            x = torch.randn(4, 5)
            torch.testing.assert_close(layer(x), ref(x))
            assert_zero_outside(layer)

    def test_nn_linear_loads_growlinear_state_dict(self):
        layer = GrowLinear(5, 3)
        ref = nn.Linear(5, 3)
        result = ref.load_state_dict(layer.state_dict(), strict=False)
        assert result.unexpected_keys == ["_extra_state"] and not result.missing_keys
        x = torch.randn(4, 5)
        torch.testing.assert_close(ref(x), layer(x))

    def test_to_and_from_linear(self):
        layer = GrowLinear(5, 3, capacity_in=8, capacity_out=6, activation="relu")
        layer.grow_out(2)
        linear = layer.to_linear()
        assert (linear.in_features, linear.out_features) == (5, 5)
        x = torch.randn(4, 5)
        torch.testing.assert_close(F.relu(linear(x)), layer(x))
        back = GrowLinear.from_linear(linear, capacity_out=9)
        torch.testing.assert_close(back(x), linear(x))
        assert back.capacity_out == 9 and back.out_features == 5

    def test_repr_shows_active_and_capacity(self):
        text = repr(GrowLinear(4, 3, capacity_in=8, capacity_out=6, activation="relu"))
        assert "in_features=4" in text and "capacity_in=8" in text and "capacity_out=6" in text and "relu" in text


class TestGrowth:
    def test_no_reallocation(self):
        layer = GrowLinear(4, 3, capacity_in=10, capacity_out=9)
        params = [layer.weight, layer.bias]
        ptrs = [p.data_ptr() for p in params]
        layer.grow_out(5)
        layer.grow_in(6)
        layer.shrink_out(2)
        layer.shrink_in(1)
        assert [layer.weight, layer.bias] == params and all(a is b for a, b in zip(params, [layer.weight, layer.bias]))
        assert [p.data_ptr() for p in params] == ptrs
        assert (layer.in_features, layer.out_features) == (1, 2)

    def test_invariant_after_every_call(self):
        layer = GrowLinear(4, 3, capacity_in=10, capacity_out=9, activation="relu")
        layer(torch.randn(5, 4)).sum().backward()
        for call in (
            lambda: layer.grow_out(4),
            lambda: layer.grow_in(3),
            lambda: layer.shrink_out(2),
            lambda: layer.shrink_in(5),
            lambda: layer.grow_in(2, "zero"),
        ):
            call()
            assert_zero_outside(layer)
            layer(torch.randn(5, layer.in_features)).sum().backward()
            assert_zero_outside(layer)

    def test_grow_out_writes_he_rows_and_zero_bias(self):
        layer = GrowLinear(500, 10, capacity_out=1000)
        before = layer.active_weight.clone(), layer.active_bias.clone()
        layer.grow_out(990, generator=torch.Generator().manual_seed(0))
        assert torch.equal(layer.weight[:10], before[0]) and torch.equal(layer.bias[:10], before[1])
        new = layer.weight[10:].double()
        # 495k He draws: the mean's standard error is std/703, the std's relative
        # standard error 1/995; 6 standard errors bound a false failure.
        std = math.sqrt(2 / 500)
        assert abs(new.mean().item()) < 6 * std / 703
        assert abs(new.std().item() / std - 1) < 6 / 995
        assert not layer.bias[10:].any()

    def test_grow_in_he_uses_the_new_fan_in(self):
        layer = GrowLinear(100, 1000, capacity_in=600)
        layer.grow_in(500, generator=torch.Generator().manual_seed(0))
        new = layer.weight[:, 100:].double()
        std = math.sqrt(2 / 600)
        assert abs(new.mean().item()) < 6 * std / 707
        assert abs(new.std().item() / std - 1) < 6 / 1000

    def test_growth_is_reproducible_with_a_generator(self):
        a = GrowLinear(4, 3, capacity_out=8)
        b = copy.deepcopy(a)
        a.grow_out(3, generator=torch.Generator().manual_seed(5))
        b.grow_out(3, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a.weight, b.weight)

    def test_zero_input_columns_preserve_the_function(self):
        torch.manual_seed(0)
        first = GrowLinear(6, 5, capacity_out=12, activation="relu", dtype=torch.float64)
        second = GrowLinear(5, 3, capacity_in=12, dtype=torch.float64)
        x = torch.randn(20, 6, dtype=torch.float64)
        before = second(first(x))
        first.grow_out(7)
        second.grow_in(7, "zero")
        # The new columns are exactly zero, so only the GEMM's summation order may
        # differ: float64 rounding, far below 1e-12 at these sizes.
        torch.testing.assert_close(second(first(x)), before, rtol=0, atol=1e-12)
        assert first.out_features == 12 and second.in_features == 12

    def test_he_input_columns_change_the_function(self):
        first = GrowLinear(6, 5, capacity_out=12, activation="relu")
        second = GrowLinear(5, 3, capacity_in=12)
        x = torch.randn(20, 6)
        before = second(first(x))
        first.grow_out(7)
        second.grow_in(7, "he")
        assert not torch.allclose(second(first(x)), before)

    def test_optimizer_keeps_working_across_growth(self):
        torch.manual_seed(0)
        layer = GrowLinear(4, 3, capacity_in=8, capacity_out=8, activation="relu")
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        for width in (4, 6, 8):
            if width > layer.in_features:
                layer.grow_in(width - layer.in_features)
                layer.grow_out(width - layer.out_features)
            for _ in range(3):
                opt.zero_grad()
                layer(torch.randn(16, layer.in_features)).square().mean().backward()
                opt.step()
                assert_zero_outside(layer)
        assert opt.param_groups[0]["params"][0] is layer.weight
        assert opt.state[layer.weight]["exp_avg"].shape == (8, 8)

    def test_shrink_keeps_the_first_neurons(self):
        layer = GrowLinear(6, 5, capacity_in=8, capacity_out=8)
        w, b = layer.active_weight.clone(), layer.active_bias.clone()
        layer.shrink_out(2)
        layer.shrink_in(4)
        assert torch.equal(layer.active_weight, w[:2, :4]) and torch.equal(layer.active_bias, b[:2])
        assert_zero_outside(layer)


class TestStateDict:
    def test_round_trip_of_a_grown_layer(self):
        layer = GrowLinear(4, 3, capacity_in=10, capacity_out=9, activation="relu")
        layer.grow_out(4)
        layer.grow_in(2)
        state = layer.state_dict()
        assert state["_extra_state"]["in_features"] == 6 and state["_extra_state"]["out_features"] == 7
        fresh = GrowLinear(2, 2, capacity_in=10, capacity_out=9, activation="relu")
        fresh.load_state_dict(state)
        assert (fresh.in_features, fresh.out_features) == (6, 7)
        x = torch.randn(3, 6)
        assert torch.equal(fresh(x), layer(x))

    def test_checkpoint_of_another_capacity_fails_and_changes_nothing(self):
        state = GrowLinear(4, 3, capacity_in=10, capacity_out=9).state_dict()
        layer = GrowLinear(4, 3, capacity_in=10, capacity_out=8)
        before = snapshot(layer)
        with pytest.raises(RuntimeError, match="capacity"):
            layer.load_state_dict(state)
        assert_same(snapshot(layer), before)

    def test_nn_linear_state_dict_of_another_size_fails(self):
        layer = GrowLinear(4, 3, capacity_in=10, capacity_out=9)
        before = snapshot(layer)
        with pytest.raises(RuntimeError, match="size mismatch"):
            layer.load_state_dict(nn.Linear(5, 3).state_dict())
        assert_same(snapshot(layer), before)

    def test_missing_and_unexpected_keys(self):
        layer = GrowLinear(4, 3, bias=False)
        with pytest.raises(RuntimeError, match="Unexpected key"):
            layer.load_state_dict(nn.Linear(4, 3).state_dict())
        with pytest.raises(RuntimeError, match="Missing key"):
            GrowLinear(4, 3).load_state_dict(nn.Linear(4, 3, bias=False).state_dict())


class TestBadInput:
    def test_wrong_input_width(self):
        layer = GrowLinear(4, 3, capacity_in=8)
        with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
            layer(torch.randn(2, 8))

    def test_wrong_dtype_and_device(self):
        layer = GrowLinear(4, 3)
        with pytest.raises(TypeError, match="dtype"):
            layer(torch.randn(2, 4, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="device"):
            layer(torch.randn(2, 4, device="meta"))

    @pytest.mark.parametrize(
        "call, message",
        [
            (lambda l: l.grow_out(7), "capacity is 9"),
            (lambda l: l.grow_in(5), "capacity is 8"),
            (lambda l: l.grow_out(-1), ">= 0"),
            (lambda l: l.shrink_out(0), "between 1 and 3"),
            (lambda l: l.shrink_in(-2), "between 1 and 4"),
            (lambda l: l.shrink_out(5), "use grow"),
            (lambda l: l.grow_in(1, "ones"), "unknown init"),
            (lambda l: l.grow_out(1.5), "must be an int"),
        ],
    )
    def test_bad_resizes_change_nothing(self, call, message):
        layer = GrowLinear(4, 3, capacity_in=8, capacity_out=9)
        layer(torch.randn(2, 4)).sum().backward()
        before = snapshot(layer)
        with pytest.raises((ValueError, TypeError), match=message):
            call(layer)
        assert_same(snapshot(layer), before)

    def test_bad_construction(self):
        with pytest.raises(ValueError, match="capacity"):
            GrowLinear(8, 3, capacity_in=4)
        with pytest.raises(ValueError, match="between 1"):
            GrowLinear(0, 3)
        with pytest.raises(ValueError, match="activation"):
            GrowLinear(3, 3, activation="tanh")


def test_torch_compile_matches_eager():
    layer = GrowLinear(6, 5, capacity_in=9, capacity_out=8, activation="relu")
    x = torch.randn(4, 6, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.weight.grad.shape == (8, 9)
