"""The growdense ops against float64 PyTorch math on the active block.

Tolerances: results are compared with a float64 computation. A float32 output is a
sum of K products rounded to float32; its error is bounded by about K * 2**-24 times
the sum of |terms|, so the checks use rtol=1e-5 and atol=1e-5 * K (K <= 200 here).
bfloat16 inputs are rounded to 8 bits of mantissa before the (float) accumulation and
the result is rounded again, so it gets rtol=atol=2**-6 relative to the data's scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import growdense  # noqa: F401  (loads the ops)
from growdense import ops, protocol

OPS = {"fast": ops.linear, "reference": ops.linear_reference}


def make_case(batch_shape, cap_in, cap_out, active_in, active_out, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, active_in, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.zeros(cap_out, cap_in, dtype=torch.float64)
    weight[:active_out, :active_in] = torch.randn(active_out, active_in, generator=g, dtype=torch.float64)
    b = None
    if bias:
        b = torch.zeros(cap_out, dtype=torch.float64)
        b[:active_out] = torch.randn(active_out, generator=g, dtype=torch.float64)
        b = b.to(dtype)
    return x, weight.to(dtype), b


def expected(x, weight, bias, active_in, active_out, activation):
    """Float64 PyTorch math on the active block: the independent reference."""
    w = weight[:active_out, :active_in].double()
    b = None if bias is None else bias[:active_out].double()
    y = F.linear(x.double(), w, b)
    return F.relu(y) if activation == "relu" else y


def tolerance(dtype, k):
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12 * k}
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5 * k}
    return {"rtol": 2**-6, "atol": 2**-6 * k**0.5}


CASES = [
    # batch shape, capacity (in, out), active (in, out)
    ((5,), (8, 6), (3, 4)),
    ((1,), (8, 6), (8, 6)),  # active = capacity, batch 1
    ((7,), (9, 5), (1, 1)),  # active = 1
    ((2, 3), (16, 10), (11, 7)),  # extra leading dimension
    ((2, 1, 4), (13, 12), (13, 3)),
    ((), (6, 6), (5, 2)),  # 1-D input, as nn.Linear accepts
    ((0,), (6, 6), (5, 2)),  # empty batch
    ((33,), (200, 70), (130, 65)),
]


@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_float64_math(which, case, bias, activation, dtype):
    batch_shape, (cap_in, cap_out), (ai, ao) = case
    x, w, b = make_case(batch_shape, cap_in, cap_out, ai, ao, bias, dtype)
    y = OPS[which](x, w, b, ai, ao, activation)
    assert y.shape == (*batch_shape, ao) and y.dtype == dtype
    torch.testing.assert_close(y.double(), expected(x, w, b, ai, ao, activation), **tolerance(dtype, ai))


@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_float64_math(which, case, bias, activation, dtype):
    batch_shape, (cap_in, cap_out), (ai, ao) = case
    x, w, b = make_case(batch_shape, cap_in, cap_out, ai, ao, bias, dtype, seed=1)
    grad_out = torch.randn(*batch_shape, ao, generator=torch.Generator().manual_seed(2), dtype=dtype)
    leaves = [t.detach().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    OPS[which](leaves[0], leaves[1], leaves[2] if bias else None, ai, ao, activation).backward(grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = expected(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, ai, ao, activation)
    y_ref.backward(grad_out.double())
    rows = max(1, x.numel() // ai)
    for got, want, k in zip(leaves, ref_leaves, (ao, rows, rows)):
        assert got.grad.shape == got.shape
        torch.testing.assert_close(got.grad.double(), want.grad, **tolerance(dtype, k))
    # Outside the active block the gradients are exactly zero.
    assert not leaves[1].grad[ao:].any() and not leaves[1].grad[:, ai:].any()
    if bias:
        assert not leaves[2].grad[ao:].any()


@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("activation", ["relu", None])
def test_bfloat16(which, activation):
    x, w, b = make_case((17,), 40, 30, 33, 21, True, torch.bfloat16)
    y = OPS[which](x, w, b, 33, 21, activation)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected(x, w, b, 33, 21, activation), **tolerance(torch.bfloat16, 33))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    cap_in=st.integers(1, 24),
    cap_out=st.integers(1, 24),
    frac_in=st.floats(0, 1),
    frac_out=st.floats(0, 1),
    bias=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_and_reference_agree_on_random_shapes(rows, cap_in, cap_out, frac_in, frac_out, bias, relu, seed):
    ai, ao = max(1, round(frac_in * cap_in)), max(1, round(frac_out * cap_out))
    x, w, b = make_case((rows,), cap_in, cap_out, ai, ao, bias, torch.float64, seed)
    activation = "relu" if relu else None
    want = expected(x, w, b, ai, ao, activation)
    for op in OPS.values():
        torch.testing.assert_close(op(x, w, b, ai, ao, activation), want, **tolerance(torch.float64, ai))


@pytest.mark.parametrize("which", OPS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", None])
def test_gradcheck(which, bias, activation):
    x, w, b = make_case((4, 2), 7, 6, 5, 3, bias, torch.float64, seed=3)
    # Keep pre-activations away from 0, where relu is not differentiable.
    if activation == "relu":
        b = None if b is None else b + torch.sign(b) * 0.5
    inputs = tuple(t.detach().requires_grad_() for t in (x, w) + ((b,) if bias else ()))

    def f(*args):
        return OPS[which](args[0], args[1], args[2] if bias else None, 5, 3, activation)

    assert torch.autograd.gradcheck(f, inputs)


def test_opcheck_every_op():
    x, w, b = make_case((3, 2), 9, 7, 5, 4, True, torch.float32)
    args = (x, w, b, 5, 4, "relu")
    for name in ("linear", "linear_reference"):
        op = getattr(torch.ops.growdense, name).default
        torch.library.opcheck(op, args)
        grad_args = (x.requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), 5, 4, "relu")
        torch.library.opcheck(op, grad_args)
        x = x.detach()
    out = ops.linear(x, w, b, 5, 4, "relu")
    grad = torch.randn_like(out)
    for name in ("linear_backward", "linear_backward_reference"):
        op = getattr(torch.ops.growdense, name).default
        torch.library.opcheck(op, (grad, x, w, out, 5, 4, "relu", [True, True, True]))
        torch.library.opcheck(op, (grad, x, w, None, 5, 4, "none", [False, True, False]))
    torch.library.opcheck(torch.ops.growdense.normal_block_.default, (torch.zeros(6, 5), 1, 4, 0, 3, 0.5, None))


def test_outputs_not_requested_are_empty():
    x, w, _ = make_case((3,), 6, 5, 4, 2, False)
    grad = torch.ones(3, 2)
    for op in (torch.ops.growdense.linear_backward, torch.ops.growdense.linear_backward_reference):
        gx, gw, gb = op(grad, x, w, None, 4, 2, "none", [False, True, False])
        assert gx.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape


def test_linear_reads_the_block_in_place():
    """Values outside the active block never reach the output (they are not even read)."""
    x, w, b = make_case((4,), 10, 8, 6, 5, True, torch.float64)
    poisoned_w, poisoned_b = w.clone(), b.clone()
    poisoned_w[5:] = float("nan")
    poisoned_w[:, 6:] = float("nan")
    poisoned_b[5:] = float("nan")
    for op in OPS.values():
        torch.testing.assert_close(op(x, poisoned_w, poisoned_b, 6, 5, None), op(x, w, b, 6, 5, None))


@pytest.mark.parametrize("which", OPS)
def test_op_argument_errors(which):
    x, w, b = make_case((3,), 6, 5, 4, 2, True)
    op = OPS[which]
    with pytest.raises(ValueError, match="active in_features is 4"):
        op(torch.randn(3, 5), w, b, 4, 2)
    with pytest.raises(ValueError, match="capacity_out=5"):
        op(x, w, b, 4, 6)
    with pytest.raises(TypeError, match="dtype"):
        op(x.double(), w, b, 4, 2)
    with pytest.raises(ValueError, match="activation"):
        op(x, w, b, 4, 2, "swish")


class TestNormalBlock:
    def test_writes_only_the_block(self):
        t = torch.full((7, 9), 3.0)
        ops.normal_block_(t, (2, 5), (1, 8), 0.1)
        inside = torch.zeros_like(t, dtype=torch.bool)
        inside[2:5, 1:8] = True
        assert torch.all(t[~inside] == 3.0)
        assert torch.all(t[inside] != 3.0)

    def test_reproducible_with_a_generator(self):
        a, b = torch.zeros(5, 5), torch.zeros(5, 5)
        ops.normal_block_(a, (0, 5), (2, 4), 1.0, torch.Generator().manual_seed(7))
        ops.normal_block_(b, (0, 5), (2, 4), 1.0, torch.Generator().manual_seed(7))
        assert torch.equal(a, b)

    def test_statistics(self):
        # 400k draws: the sample mean has standard error std/632, the sample std a
        # relative standard error of 1/894; 6 standard errors bound a false failure.
        t = torch.zeros(1000, 500, dtype=torch.float64)
        ops.normal_block_(t, (100, 900), (0, 500), 0.25, torch.Generator().manual_seed(0))
        block = t[100:900]
        assert abs(block.mean().item()) < 6 * 0.25 / 632
        assert abs(block.std().item() / 0.25 - 1) < 6 / 894

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
    @pytest.mark.parametrize(
        "shape, rows, cols",
        [
            ((40, 30), (3, 17), (0, 30)),  # whole rows: contiguous
            ((40, 30), (3, 17), (4, 25)),  # a strided block in one staging chunk
            ((300, 200), (0, 300), (0, 150)),  # many chunks of whole rows
            ((3, 9000), (0, 3), (1, 8999)),  # rows longer than a chunk: one row per chunk
            ((6, 5), (1, 4), (0, 3)),  # fewer than 16 values: torch's serial path
        ],
    )
    def test_equals_its_pure_torch_twin(self, dtype, shape, rows, cols):
        # The kernel and protocol.normal_ draw in the same order (protocol.draw_normal_), from
        # the same generator: equal bit for bit, and the generator ends in the same state.
        a, b = torch.full(shape, 2.0, dtype=dtype), torch.full(shape, 2.0, dtype=dtype)
        ga, gb = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        ops.normal_block_(a, rows, cols, 0.5, ga)
        protocol.normal_(b, (slice(*rows), slice(*cols)), 0.5, gb)
        assert torch.equal(a, b)
        assert torch.equal(torch.randn(8, generator=ga), torch.randn(8, generator=gb))
        inside = torch.zeros(shape, dtype=torch.bool)
        inside[slice(*rows), slice(*cols)] = True
        assert torch.all(a[~inside] == 2.0)

    def test_strided_statistics(self):
        # A block narrower than its rows is staged in chunks: the values are still N(0, std^2)
        # and independent across chunks (lag-1 correlation along and across rows near 0).
        # 300k draws: mean standard error std/548, std relative error 1/775, a correlation's
        # standard error 1/548; 6 standard errors bound a false failure.
        t = torch.zeros(1000, 400, dtype=torch.float64)
        ops.normal_block_(t, (0, 1000), (50, 350), 2.0, torch.Generator().manual_seed(1))
        block = t[:, 50:350]
        assert abs(block.mean().item()) < 6 * 2.0 / 548
        assert abs(block.std().item() / 2.0 - 1) < 6 / 775
        x = block / 2.0
        along = (x[:, 1:] * x[:, :-1]).mean().item()
        across = (x[1:] * x[:-1]).mean().item()
        assert abs(along) < 6 / 548 and abs(across) < 6 / 548

    def test_bad_block(self):
        t = torch.zeros(4, 4)
        with pytest.raises(ValueError, match="rows"):
            ops.normal_block_(t, (2, 5), (0, 4), 1.0)
        with pytest.raises(ValueError, match="columns"):
            ops.normal_block_(t, (0, 4), (3, 2), 1.0)
        with pytest.raises(ValueError, match="standard deviation"):
            ops.normal_block_(t, (0, 4), (0, 4), -1.0)
        assert not t.any()


def test_cuda_gemm_path_is_set_through_an_op():
    """The path is read from GROWDENSE_CUDA_GEMM once; the op changes it and returns the previous one."""
    before = torch.ops.growdense._set_cuda_gemm_path("fused")
    try:
        assert before in ("auto", "fused", "blas")
        assert torch.ops.growdense._set_cuda_gemm_path("blas") == "fused"
        with pytest.raises(ValueError, match="not one of auto, fused, blas"):
            torch.ops.growdense._set_cuda_gemm_path("cublas")
        assert torch.ops.growdense._set_cuda_gemm_path("auto") == "blas"  # the failed call changed nothing
    finally:
        torch.ops.growdense._set_cuda_gemm_path(before)
