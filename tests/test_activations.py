"""The fused activations (GELU, its tanh form, SiLU) and autograd's completeness.

Every result is compared with ``torch.nn.functional`` math on the active block in
float64 (``F.gelu`` / ``F.silu`` of ``F.linear``): forward, backward, before and after
growth; double backward (``create_graph=True``, ``gradgradcheck``) below and at
capacity; ``torch.func`` transforms over ``functional_call`` of a ``GrowLinear``.

Tolerances: float64 results are sums of at most ~50 products of O(1) values computed in
another order than the reference's, so rtol = atol = 1e-12 leaves a wide margin over
the ~1e-15 rounding. bfloat16: inputs exact in bfloat16, float accumulation, one
rounding of the output to 8 mantissa bits (relative 2**-8) plus the activation's own
rounding: rtol = atol = 2**-6 of the data's scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import growdense  # noqa: F401  (loads the ops)
from growdense import GrowLinear, ops

OPS = {"fast": ops.linear, "reference": ops.linear_reference}
NEW = ("gelu", "gelu_tanh", "silu")
ALL = ("none", "relu", *NEW)
F64 = {"rtol": 1e-12, "atol": 1e-12}


def act_fn(name):
    fn = ops.ACTIVATION_FUNCTIONS[name]
    return (lambda y: y) if fn is None else fn


def expected(x, weight, bias, active_in, active_out, activation):
    w = weight[:active_out, :active_in].double()
    b = None if bias is None else bias[:active_out].double()
    return act_fn(activation)(F.linear(x.double(), w, b))


def make_case(batch, cap_in, cap_out, ai, ao, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, ai, generator=g, dtype=torch.float64)
    w = torch.zeros(cap_out, cap_in, dtype=torch.float64)
    w[:ao, :ai] = torch.randn(ao, ai, generator=g, dtype=torch.float64)
    b = torch.zeros(cap_out, dtype=torch.float64)
    b[:ao] = torch.randn(ao, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), (b.to(dtype) if bias else None)


CASES = [
    ((6,), (9, 7), (5, 4)),  # below capacity
    ((3, 2), (8, 6), (8, 6)),  # at capacity, extra leading dimension
    ((), (6, 5), (3, 2)),  # 1-D input
    ((0,), (6, 5), (3, 2)),  # empty batch
    ((40,), (64, 50), (47, 33)),
]


def test_activations_are_listed():
    assert ops.ACTIVATIONS == ALL


@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", NEW)
def test_forward_and_backward_match_functional(which, case, bias, activation):
    batch, (ci, co), (ai, ao) = case
    x, w, b = make_case(batch, ci, co, ai, ao, bias, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y = OPS[which](leaves[0], leaves[1], leaves[2] if bias else None, ai, ao, activation)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y_ref = expected(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, ai, ao, activation)
    torch.testing.assert_close(y, y_ref, **F64)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.shape == got.shape
        torch.testing.assert_close(got.grad, want.grad, **F64)
    assert not leaves[1].grad[ao:].any() and not leaves[1].grad[:, ai:].any()
    if bias:
        assert not leaves[2].grad[ao:].any()


@pytest.mark.parametrize("activation", NEW)
def test_gradients_accumulate_into_grad_like_nn_linear(activation):
    """Two backward passes through a layer below capacity (the in-place accumulation path)."""
    torch.manual_seed(0)
    layer = GrowLinear(5, 4, capacity_in=9, capacity_out=7, activation=activation, dtype=torch.float64)
    ref = layer.to_linear()
    x = torch.randn(11, 5, dtype=torch.float64)
    for _ in range(2):
        layer(x).square().sum().backward()
        act_fn(activation)(ref(x)).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad[:4, :5], ref.weight.grad, **F64)
    torch.testing.assert_close(layer.bias.grad[:4], ref.bias.grad, **F64)
    assert not layer.weight.grad[4:].any() and not layer.weight.grad[:, 5:].any() and not layer.bias.grad[4:].any()


def _reference_net(layers, x):
    h = x
    for layer in layers:
        h = act_fn(layer.activation)(F.linear(h, layer.active_weight, layer.active_bias))
    return h


@pytest.mark.parametrize("activation", NEW)
def test_layers_before_and_after_growth(activation):
    """A producer/consumer pair grown in place: outputs and gradients stay F.linear's."""
    torch.manual_seed(1)
    a = GrowLinear(6, 4, capacity_out=12, activation=activation, dtype=torch.float64)
    b = GrowLinear(4, 3, capacity_in=12, activation=activation, dtype=torch.float64)
    x = torch.randn(9, 6, dtype=torch.float64)

    def check():
        for layer in (a, b):
            layer.zero_grad(set_to_none=True)
        y = b(a(x))
        torch.testing.assert_close(y, _reference_net([a, b], x), **F64)
        y.sum().backward()
        grads = [p.grad.clone() for p in (a.weight, a.bias, b.weight, b.bias)]
        params = [p.detach().clone().requires_grad_() for p in (a.weight, a.bias, b.weight, b.bias)]
        h = act_fn(activation)(F.linear(x, params[0][: a.out_features, :6], params[1][: a.out_features]))
        out = act_fn(activation)(F.linear(h, params[2][:, : b.in_features], params[3]))
        out.sum().backward()
        for got, p in zip(grads, params):
            torch.testing.assert_close(got, p.grad, **F64)

    check()
    a.grow_out(5)
    b.grow_in(5)
    check()
    a.shrink_out(6)
    b.shrink_in(6)
    check()


@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("activation", NEW)
def test_bfloat16(which, activation):
    x, w, b = make_case((17,), 40, 30, 33, 21, True, torch.bfloat16, seed=5)
    y = OPS[which](x, w, b, 33, 21, activation)
    assert y.dtype == torch.bfloat16
    want = expected(x, w, b, 33, 21, activation)
    scale = F.linear(x.double().abs(), w[:21, :33].double().abs(), b[:21].double().abs())
    err = (y.double() - want).abs()
    assert (err <= 2**-6 * (want.abs() + scale)).all()


@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", NEW)
def test_gradcheck(which, bias, activation):
    x, w, b = make_case((4, 2), 7, 6, 5, 3, bias, seed=6)
    inputs = tuple(t.requires_grad_() for t in (x, w) + ((b,) if bias else ()))

    def f(*args):
        return OPS[which](args[0], args[1], args[2] if bias else None, 5, 3, activation)

    assert torch.autograd.gradcheck(f, inputs)


# ---- double backward ------------------------------------------------------------------
@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("capacity", ["below", "at"])
@pytest.mark.parametrize("activation", ALL)
def test_gradgradcheck(which, capacity, activation):
    ci, co = (7, 6) if capacity == "below" else (5, 3)
    x, w, b = make_case((4,), ci, co, 5, 3, True, seed=7)
    if activation == "relu":  # keep pre-activations away from the kink at 0
        b[:3] += torch.sign(b[:3]) * 0.5
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())

    def f(x_, w_, b_):
        return OPS[which](x_, w_, b_, 5, 3, activation)

    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("capacity", ["below", "at"])
@pytest.mark.parametrize("activation", ALL)
def test_create_graph_matches_nn_linear(capacity, activation):
    """Gradient of a gradient penalty w.r.t. weight and bias, as with nn.Linear."""
    torch.manual_seed(2)
    cap = {"capacity_in": 9, "capacity_out": 8} if capacity == "below" else {}
    layer = GrowLinear(5, 4, activation=activation, dtype=torch.float64, **cap)
    ref = layer.to_linear()
    x = torch.randn(6, 5, dtype=torch.float64)

    def penalty(y, params):
        gs = torch.autograd.grad(y.square().sum(), params, create_graph=True)
        return sum(g.square().sum() for g in gs)

    got = torch.autograd.grad(penalty(layer(x), [layer.weight, layer.bias]), [layer.weight, layer.bias])
    want = torch.autograd.grad(penalty(act_fn(activation)(ref(x)), [ref.weight, ref.bias]), [ref.weight, ref.bias])
    torch.testing.assert_close(got[0][:4, :5], want[0], **F64)
    torch.testing.assert_close(got[1][:4], want[1], **F64)
    assert not got[0][4:].any() and not got[0][:, 5:].any() and not got[1][4:].any()


# ---- torch.func ------------------------------------------------------------------------
def _layer_pair(capacity, activation):
    torch.manual_seed(3)
    cap = {"capacity_in": 10, "capacity_out": 7} if capacity == "below" else {}
    layer = GrowLinear(6, 4, activation=activation, dtype=torch.float64, **cap)
    return layer, layer.to_linear()


@pytest.mark.parametrize("capacity", ["below", "at"])
@pytest.mark.parametrize("activation", ALL)
def test_torch_func_grad_and_jacrev(capacity, activation):
    layer, ref = _layer_pair(capacity, activation)
    fn = act_fn(activation)
    x = torch.randn(5, 6, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    ref_params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p, inp):
        return functional_call(layer, p, (inp,)).square().sum()

    def ref_loss(p, inp):
        return fn(functional_call(ref, p, (inp,))).square().sum()

    g = grad(loss)(params, x)
    g_ref = grad(ref_loss)(ref_params, x)
    torch.testing.assert_close(g["weight"][:4, :6], g_ref["weight"], **F64)
    torch.testing.assert_close(g["bias"][:4], g_ref["bias"], **F64)
    assert not g["weight"][4:].any() and not g["weight"][:, 6:].any() and not g["bias"][4:].any()

    j = jacrev(lambda p, inp: functional_call(layer, p, (inp,)))(params, x)
    j_ref = jacrev(lambda p, inp: fn(functional_call(ref, p, (inp,))))(ref_params, x)
    torch.testing.assert_close(j["weight"][..., :4, :6], j_ref["weight"], **F64)
    torch.testing.assert_close(j["bias"][..., :4], j_ref["bias"], **F64)

    jx = jacrev(lambda inp: functional_call(layer, params, (inp,)))(x)
    jx_ref = jacrev(lambda inp: fn(functional_call(ref, ref_params, (inp,))))(x)
    torch.testing.assert_close(jx, jx_ref, **F64)


@pytest.mark.parametrize("capacity", ["below", "at"])
@pytest.mark.parametrize("activation", ALL)
def test_torch_func_vmap_and_per_sample_gradients(capacity, activation):
    layer, ref = _layer_pair(capacity, activation)
    fn = act_fn(activation)
    x = torch.randn(8, 6, dtype=torch.float64)
    target = torch.randn(8, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    ref_params = {k: v.detach() for k, v in ref.named_parameters()}

    y = vmap(lambda inp: functional_call(layer, params, (inp,)))(x)
    torch.testing.assert_close(y, fn(ref(x)).detach(), **F64)

    def loss(p, inp, t):
        return (functional_call(layer, p, (inp.unsqueeze(0),)) - t).square().sum()

    def ref_loss(p, inp, t):
        return (fn(functional_call(ref, p, (inp.unsqueeze(0),))) - t).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    per_sample_ref = vmap(grad(ref_loss), in_dims=(None, 0, 0))(ref_params, x, target)
    assert per_sample["weight"].shape == (8, *layer.weight.shape)
    torch.testing.assert_close(per_sample["weight"][:, :4, :6], per_sample_ref["weight"], **F64)
    torch.testing.assert_close(per_sample["bias"][:, :4], per_sample_ref["bias"], **F64)
    assert not per_sample["weight"][:, 4:].any() and not per_sample["weight"][:, :, 6:].any()
    # The per-sample gradients add up to the batch gradient of the fused op.
    (layer(x) - target).square().sum().backward()
    torch.testing.assert_close(per_sample["weight"].sum(0), layer.weight.grad, **F64)


def test_ops_linear_under_torch_func():
    x, w, b = make_case((5,), 8, 6, 4, 3, seed=8)
    g = grad(lambda w_: ops.linear(x, w_, b, 4, 3, "gelu").sum())(w)
    w_ref = w[:3, :4].clone().requires_grad_()
    F.gelu(F.linear(x, w_ref, b[:3])).sum().backward()
    torch.testing.assert_close(g[:3, :4], w_ref.grad, **F64)
    assert not g[3:].any() and not g[:, 4:].any()


# ---- the ops' contracts ---------------------------------------------------------------
@pytest.mark.parametrize("which", ["linear_forward", "linear_forward_reference"])
@pytest.mark.parametrize("activation", ALL)
def test_linear_forward_returns_what_the_backward_reads(which, activation):
    x, w, b = make_case((2, 3), 9, 7, 5, 4, seed=9)
    y, saved = getattr(torch.ops.growdense, which)(x, w, b, 5, 4, activation)
    torch.testing.assert_close(y, expected(x, w, b, 5, 4, activation), **F64)
    if activation in ("gelu", "gelu_tanh", "silu"):
        torch.testing.assert_close(saved, F.linear(x, w[:4, :5], b[:4]), **F64)
    else:
        assert saved.numel() == 0


@pytest.mark.parametrize("activation", NEW)
def test_opcheck(activation):
    x, w, b = make_case((3, 2), 9, 7, 5, 4, True, torch.float32, seed=10)
    for name in ("linear", "linear_reference"):
        op = getattr(torch.ops.growdense, name).default
        torch.library.opcheck(op, (x, w, b, 5, 4, activation))
        torch.library.opcheck(
            op, (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), 5, 4, activation)
        )
    for name in ("linear_forward", "linear_forward_reference"):
        torch.library.opcheck(getattr(torch.ops.growdense, name).default, (x, w, b, 5, 4, activation))
    _, saved = torch.ops.growdense.linear_forward(x, w, b, 5, 4, activation)
    grad_out = torch.randn(saved.shape)
    for name in ("linear_backward", "linear_backward_reference"):
        op = getattr(torch.ops.growdense, name).default
        torch.library.opcheck(op, (grad_out, x, w, saved, 5, 4, activation, [True, True, True]))
        torch.library.opcheck(op, (grad_out, x, w, saved, 5, 4, activation, [False, True, False]))


def test_backward_needs_what_the_activation_reads():
    x, w, _ = make_case((3,), 6, 5, 4, 2, seed=11)
    with pytest.raises(ValueError, match="gelu backward needs the forward's pre-activation"):
        torch.ops.growdense.linear_backward(torch.ones(3, 2, dtype=torch.float64), x, w, None, 4, 2, "gelu",
                                            [True, True, True])
    with pytest.raises(ValueError, match="relu backward needs the forward's output"):
        torch.ops.growdense.linear_backward_reference(torch.ones(3, 2, dtype=torch.float64), x, w, None, 4, 2,
                                                      "relu", [True, True, True])


def test_unknown_activation_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="gelu_tanh"):
        GrowLinear(3, 2, activation="swish")
    x, w, b = make_case((3,), 6, 5, 4, 2, seed=12)
    with pytest.raises(ValueError, match="'silu'"):
        torch.ops.growdense.linear(x, w, b, 4, 2, "tanh")


def test_grow_linear_with_gelu_is_a_drop_in_for_nn_linear_and_gelu():
    torch.manual_seed(4)
    ref = nn.Linear(7, 5)
    layer = GrowLinear.from_linear(ref, capacity_in=16, capacity_out=8, activation="gelu")
    x = torch.randn(3, 7)
    # One float32 GEMM of the same values on each side, then the same erf GELU.
    torch.testing.assert_close(layer(x), F.gelu(ref(x)), rtol=1e-6, atol=1e-6)
    assert "activation=gelu" in repr(layer)


@pytest.mark.parametrize("activation", NEW)
def test_torch_compile_matches_eager(activation):
    torch.manual_seed(5)
    layer = GrowLinear(6, 5, capacity_in=9, capacity_out=8, activation=activation, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), **F64)
    y.sum().backward()
    compiled_grad = layer.weight.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(compiled_grad, layer.weight.grad, **F64)
