"""The CPU backward of GrowLinear (float32, no activation or ReLU): the ReLU mask and the
bias gradient in one pass, the weight's gradient added into ``.grad`` by its GEMM; and, for
the other activations, that adding into ``.grad`` gives the op's own bits.

Each gradient is compared with the float64 formula (``F.linear`` on the active block).
Tolerance: float32 sums of up to ~600 products of O(1) terms against float64 agree to
~1e-6 relative; the bias gradient sums over up to 600 rows in blocks: rtol 2e-5 with an
absolute floor of 2e-5 x the largest magnitude.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from growdense import GrowLinear


def _close(actual, expected, what):
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")


def _reference(layer: GrowLinear, x: torch.Tensor, g: torch.Tensor):
    """Float64 gradients (x, capacity-shaped weight, bias) of sum(g * layer(x))."""
    ai, ao = layer.in_features, layer.out_features
    w = layer.weight.detach().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = F.linear(x64, w[:ao, :ai], b[:ao])
    if layer.activation == "relu":
        y = torch.relu(y)
    return torch.autograd.grad((y * g.double()).sum(), (x64, w, b))


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("partial", [False, True], ids=["at-capacity", "below-capacity"])
@pytest.mark.parametrize("grad_there", [False, True], ids=["grad-None", "grad-accumulated"])
@pytest.mark.parametrize("threads", [1, 2])
def test_backward_matches_float64(activation, partial, grad_there, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        cap = (48, 40) if partial else (33, 40)
        layer = GrowLinear(40 if not partial else 30, 33, capacity_in=cap[1], capacity_out=cap[0],
                           activation=activation)
        x = torch.randn(3, 200, layer.in_features, generator=gen, requires_grad=True)
        g = torch.randn(3, 200, layer.out_features, generator=gen)
        before_w = before_b = None
        if grad_there:
            # .grad present: the backward adds into its active block in place
            layer.weight.grad = torch.zeros_like(layer.weight)
            layer.bias.grad = torch.zeros_like(layer.bias)
            layer.weight.grad[: layer.out_features, : layer.in_features] = torch.randn(
                layer.out_features, layer.in_features, generator=gen)
            layer.bias.grad[: layer.out_features] = torch.randn(layer.out_features, generator=gen)
            before_w, before_b = layer.weight.grad.clone(), layer.bias.grad.clone()
            kept = layer.weight.grad
        y = layer(x)
        (y * g).sum().backward()
        ref_x, ref_w, ref_b = _reference(layer, x, g)
        if grad_there:
            assert layer.weight.grad is kept  # added in place, not replaced
            ref_w = ref_w + before_w.double()
            ref_b = ref_b + before_b.double()
        _close(x.grad, ref_x, "x.grad")
        _close(layer.weight.grad, ref_w, "weight.grad")
        _close(layer.bias.grad, ref_b, "bias.grad")
        ao, ai = layer.out_features, layer.in_features
        assert not layer.weight.grad[ao:].any() and not layer.weight.grad[:, ai:].any()
        assert not layer.bias.grad[ao:].any()
    finally:
        torch.set_num_threads(previous)


def test_relu_mask_follows_threshold_backward_at_zero_and_nan():
    """Where the output is 0 the gradient is 0; a NaN output passes the gradient, as
    torch.threshold_backward (ReLU's backward) does."""
    layer = GrowLinear(2, 3, activation="relu")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [float("nan"), 0.0]]))
        layer.bias.zero_()
    x = torch.tensor([[1.0, 5.0], [2.0, -1.0]], requires_grad=True)
    y = layer(x)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y.backward(g)
    expected = torch.ops.aten.threshold_backward(g, y.detach(), 0)
    torch.testing.assert_close(layer.bias.grad, expected.sum(0), rtol=0, atol=0)


def test_op_backward_gives_the_same_gradients_as_the_reference_op():
    """growdense::linear_backward (fused CPU pass) against growdense::linear_backward_reference."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 12, generator=gen)
    x = torch.randn(70, 9, generator=gen)
    g = torch.randn(70, 11, generator=gen)
    y = torch.ops.growdense.linear(x, w, torch.randn(16, generator=gen), 9, 11, "relu")
    for act, saved in (("relu", y), ("none", None)):
        fast = torch.ops.growdense.linear_backward(g, x, w, saved, 9, 11, act, [True, True, True])
        ref = torch.ops.growdense.linear_backward_reference(g, x, w, saved, 9, 11, act, [True, True, True])
        for name, a, b in zip(("x", "weight", "bias"), fast, ref):
            # float32 against the plain-loop float32 reference: sums of 9-70 terms
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{act} {name}: {m}")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("partial", [False, True], ids=["at-capacity", "below-capacity"])
def test_accumulating_into_grad_gives_the_ops_own_bits(activation, partial):
    # With a `.grad` there, the autograd kernel applies the activation's derivative itself and
    # adds into the gradient's block in place; without one, the op's own backward runs. On the
    # CPU both apply the same derivative kernel, so adding into a zero `.grad` gives exactly the
    # gradients of a backward that starts from None (0 + v == v in float).
    gen = torch.Generator().manual_seed(2)
    layer = GrowLinear(30 if partial else 40, 33, capacity_in=40, capacity_out=48 if partial else 33,
                       activation=activation)
    x = torch.randn(4, 50, layer.in_features, generator=gen, requires_grad=True)
    g = torch.randn(4, 50, layer.out_features, generator=gen)
    layer(x).backward(g)
    fresh = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad = None
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.bias.grad = torch.zeros_like(layer.bias)
    kept = layer.weight.grad
    layer(x).backward(g)
    assert layer.weight.grad is kept  # the in-place path ran
    for name, a, b in zip(("x", "weight", "bias"), (x.grad, layer.weight.grad, layer.bias.grad), fresh):
        assert torch.equal(a, b), name
