"""The CUDA kernels against the CPU reference kernels, on a GPU (skipped without one).

Every CUDA result is compared with ``torch.ops.growdense.linear_reference`` /
``linear_backward_reference`` run in float64 on the CPU on the same inputs (rounded to
the dtype under test first). An element passes when

    |got - want| <= a * |want| + b * scale

where ``scale`` is the same product taken over absolute values (the sum of |terms|,
computed by the same reference ops), plus the spacing of the dtype's subnormal numbers
(float16 results below 2**-14 lose relative precision), and per dtype:

    float64            a = 1e-13,  b = 1e-13
    float32            a = 2**-22, b = 2**-19   full float32 products and sums (TF32 fails this)
    float32 with TF32  a = 2**-22, b = 2**-9    products of inputs rounded to 10 mantissa bits
    float16            a = 2**-10, b = 2**-8    cuBLAS may reduce partial sums in float16
    bfloat16           a = 2**-7,  b = 2**-6    cuBLAS may reduce partial sums in bfloat16

Outside the active block both ``want`` and ``scale`` are zero, so the capacity padding
of a gradient must be exactly zero. Each shape runs through both GEMM paths (``fused``
and ``blas``, set with ``torch.ops.growdense._set_cuda_gemm_path``, as the environment
variable ``GROWDENSE_CUDA_GEMM`` does at start-up) and the automatic choice. The
activations whose backward reads the pre-activation (gelu, gelu_tanh, silu) have a
slope below 1.2, so their outputs get the bound of the linear part times 1.2, and
their gradients a scale that counts |grad| as well as |grad * act'| (the derivative
is computed in the kernel's float precision). Outputs are
poisoned: the tests run with torch's deterministic mode filling uninitialised memory
with NaN, so an output element a kernel does not write reads as NaN and fails. The
inputs' capacity padding holds NaN as well, so a kernel that reads outside the active
block fails too.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from typing import Iterator, Optional

import pytest
import torch

import growdense
from growdense import GrowLinear, ops

if not growdense.cuda_available():
    pytest.skip("needs a GPU and growdense built with its CUDA kernels", allow_module_level=True)

NAN = float("nan")
PATHS = ("fused", "blas", "auto")
DTYPES = {  # name: (dtype, TF32 allowed, (a, b))
    "float64": (torch.float64, False, (1e-13, 1e-13)),
    "float32": (torch.float32, False, (2**-22, 2**-19)),
    "tf32": (torch.float32, True, (2**-22, 2**-9)),
    "float16": (torch.float16, False, (2**-10, 2**-8)),
    "bfloat16": (torch.bfloat16, False, (2**-7, 2**-6)),
}


def _random_shapes(n: int, seed: int) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        cap_in, cap_out = rng.randint(1, 300), rng.randint(1, 300)
        rows = int(math.exp(rng.uniform(0, math.log(4096))))
        shapes.append((rows, (cap_in, cap_out), (rng.randint(1, cap_in), rng.randint(1, cap_out))))
    return shapes


SHAPES = [
    # rows, capacity (in, out), active (in, out)
    (1, (1, 1), (1, 1)),
    (1, (8, 6), (8, 6)),  # batch 1, active = capacity
    (7, (9, 5), (1, 1)),  # active 1
    (33, (70, 65), (70, 65)),  # one row and column past the 32- and 64-wide tiles
    (65, (130, 90), (129, 67)),  # odd sizes, ragged tiles
    (128, (784, 256), (784, 256)),  # the VAE's first encoder layer
    (128, (256, 256), (32, 16)),  # a grown layer at its starting width
    (65536, (40, 24), (33, 17)),  # the largest batch
    *_random_shapes(4, seed=3),
]


def _shape_id(shape) -> str:
    rows, (ci, co), (ai, ao) = shape
    return f"{rows}x{ci}->{co}@{ai}->{ao}"


# ---- helpers ------------------------------------------------------------------------
@contextlib.contextmanager
def forced_gemm_path(path: str) -> Iterator[None]:
    before = torch.ops.growdense._set_cuda_gemm_path(path)
    try:
        yield
    finally:
        torch.ops.growdense._set_cuda_gemm_path(before)


@pytest.fixture(params=PATHS)
def gemm_path(request: pytest.FixtureRequest) -> Iterator[str]:
    with forced_gemm_path(request.param):
        yield request.param


@pytest.fixture
def poisoned() -> Iterator[None]:
    """Uninitialised memory from torch.empty (the ops' outputs) holds NaN."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@contextlib.contextmanager
def allow_tf32(allowed: bool) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def make_inputs(rows, cap_in, cap_out, active_in, active_out, bias, dtype, seed=0):
    """CPU tensors in `dtype`: x (rows, active_in) and capacity buffers whose padding is NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, active_in, generator=g, dtype=torch.float64).to(dtype)
    w = torch.full((cap_out, cap_in), NAN, dtype=torch.float64)
    w[:active_out, :active_in] = torch.randn(active_out, active_in, generator=g, dtype=torch.float64)
    b = None
    if bias:
        b = torch.full((cap_out,), NAN, dtype=torch.float64)
        b[:active_out] = torch.randn(active_out, generator=g, dtype=torch.float64)
        b = b.to(dtype)
    return x, w.to(dtype), b


def _abs(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.abs()


def assert_within(name: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, tol) -> None:
    a, b = tol
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    info = torch.finfo(got.dtype)
    got = got.detach().double().cpu()
    err = (got - want).abs()
    bound = a * want.abs() + b * scale + info.smallest_normal * info.eps  # + the subnormals' spacing
    bad = ~(err <= bound)  # NaN fails
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; first at {index}: "
            f"got {got[index].item()!r}, want {want[index].item()!r}, bound {bound[index].item():.3g}"
        )


@functools.lru_cache(maxsize=64)
def reference_forward(shape, dtype, bias, relu, seed=0):
    """(inputs, float64 reference output, scale), computed once per case for all paths."""
    rows, (ci, co), (ai, ao) = shape
    x, w, b = make_inputs(rows, ci, co, ai, ao, bias, dtype, seed)
    act = "relu" if relu else "none"
    want = torch.ops.growdense.linear_reference(x.double(), w.double(), None if b is None else b.double(), ai, ao, act)
    scale = torch.ops.growdense.linear_reference(
        x.double().abs(), w.double().abs(), _abs(None if b is None else b.double()), ai, ao, "none"
    )
    return (x, w, b), want, scale


# ---- forward ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("bias,relu", [(True, True), (False, False), (True, False), (False, True)])
def test_forward_matches_reference(shape, dtype_name, bias, relu, gemm_path, poisoned):
    dtype, tf32, tol = DTYPES[dtype_name]
    rows, _, (ai, ao) = shape
    (x, w, b), want, scale = reference_forward(shape, dtype, bias, relu)
    with allow_tf32(tf32):
        y = ops.linear(x.cuda(), w.cuda(), None if b is None else b.cuda(), ai, ao, "relu" if relu else None)
    assert y.dtype == dtype and y.device.type == "cuda"
    assert_within(f"y [{gemm_path}]", y, want, scale, tol)


@pytest.mark.parametrize("dtype_name", ["float32", "tf32", "bfloat16"])
def test_forward_decoder_size(dtype_name, gemm_path, poisoned):
    """The VAE decoder's last layer with L = 20 samples per image of a batch of 128."""
    dtype, tf32, tol = DTYPES[dtype_name]
    shape = (2560, (256, 784), (256, 784))
    (x, w, b), want, scale = reference_forward(shape, dtype, True, True)
    with allow_tf32(tf32):
        y = ops.linear(x.cuda(), w.cuda(), b.cuda(), 256, 784, "relu")
    assert_within(f"y [{gemm_path}]", y, want, scale, tol)


# ---- backward -----------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _backward_case(shape, dtype, relu, mask, seed=1):
    """(inputs, float64 reference gradients, scales), computed once per case for all paths."""
    mask = list(mask)
    rows, (ci, co), (ai, ao) = shape
    x, w, b = make_inputs(rows, ci, co, ai, ao, True, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(rows, ao, generator=g, dtype=torch.float64).to(dtype)
    act = "relu" if relu else "none"
    out = None
    if relu:  # the forward's output, with its exact zeros, computed on the GPU as in training
        out = ops.linear(x.cuda(), w.cuda(), b.cuda(), ai, ao, "relu").cpu()
    want = torch.ops.growdense.linear_backward_reference(
        grad.double(), x.double(), w.double(), None if out is None else out.double(), ai, ao, act, mask
    )
    g_kept = grad.double()
    if relu:
        o = out.double()
        g_kept = torch.where((o > 0) | o.isnan(), g_kept, torch.zeros_like(g_kept))
    scale = torch.ops.growdense.linear_backward_reference(
        g_kept.abs(), x.double().abs(), w.double().abs(), None, ai, ao, "none", mask
    )
    return (grad, x, w, out), want, scale


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
def test_backward_matches_reference(shape, dtype_name, relu, gemm_path, poisoned):
    dtype, tf32, tol = DTYPES[dtype_name]
    _, _, (ai, ao) = shape
    mask = [True, True, True]
    (grad, x, w, out), want, scale = _backward_case(shape, dtype, relu, tuple(mask))
    with allow_tf32(tf32):
        got = torch.ops.growdense.linear_backward(
            grad.cuda(), x.cuda(), w.cuda(), None if out is None else out.cuda(), ai, ao,
            "relu" if relu else "none", mask,
        )
    for name, g_, w_, s_ in zip(("grad_x", "grad_weight", "grad_bias"), got, want, scale):
        assert_within(f"{name} [{gemm_path}]", g_, w_, s_, tol)


@pytest.mark.parametrize(
    "mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True], [True, True, False]]
)
@pytest.mark.parametrize("relu", [True, False])
def test_backward_computes_what_is_asked(mask, relu, gemm_path, poisoned):
    shape = (150, (70, 50), (45, 33))
    _, _, (ai, ao) = shape
    (grad, x, w, out), want, scale = _backward_case(shape, torch.float32, relu, tuple(mask))
    got = torch.ops.growdense.linear_backward(
        grad.cuda(), x.cuda(), w.cuda(), None if out is None else out.cuda(), ai, ao, "relu" if relu else "none", mask
    )
    for name, wanted, g_, w_, s_ in zip(("grad_x", "grad_weight", "grad_bias"), mask, got, want, scale):
        if wanted:
            assert_within(f"{name} [{gemm_path}]", g_, w_, s_, DTYPES["float32"][2])
        else:
            assert g_.numel() == 0, name


@forced_gemm_path("blas")
def test_float32_honours_the_tf32_flag():
    """Without TF32, a long float32 reduction on the cuBLAS path keeps float32 accuracy."""
    shape = (512, (4096, 256), (4096, 256))
    (x, w, b), want, scale = reference_forward(shape, torch.float32, True, False)
    with allow_tf32(False):
        y = ops.linear(x.cuda(), w.cuda(), b.cuda(), 4096, 256)
    assert_within("y without TF32", y, want, scale, DTYPES["float32"][2])
    with allow_tf32(True):
        y = ops.linear(x.cuda(), w.cuda(), b.cuda(), 4096, 256)
    assert_within("y with TF32", y, want, scale, DTYPES["tf32"][2])


# ---- the activations that save their pre-activation ----------------------------------
PRE_ACTIVATIONS = tuple(a for a in ops.ACTIVATIONS if a not in ("none", "relu"))
ACT_SHAPES = [SHAPES[0], SHAPES[3], SHAPES[4], SHAPES[5], SHAPES[6], (2560, (256, 784), (256, 784))]


@functools.lru_cache(maxsize=64)
def reference_forward_act(shape, dtype, activation, seed=0):
    rows, (ci, co), (ai, ao) = shape
    x, w, b = make_inputs(rows, ci, co, ai, ao, True, dtype, seed)
    want, want_pre = torch.ops.growdense.linear_forward_reference(
        x.double(), w.double(), b.double(), ai, ao, activation
    )
    scale = torch.ops.growdense.linear_reference(x.double().abs(), w.double().abs(), b.double().abs(), ai, ao, "none")
    return (x, w, b), want, want_pre, scale


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("activation", PRE_ACTIVATIONS)
def test_forward_activations_match_reference(shape, dtype_name, activation, gemm_path, poisoned):
    dtype, tf32, tol = DTYPES[dtype_name]
    _, _, (ai, ao) = shape
    (x, w, b), want, want_pre, scale = reference_forward_act(shape, dtype, activation)
    with allow_tf32(tf32):
        y = ops.linear(x.cuda(), w.cuda(), b.cuda(), ai, ao, activation)
        y2, pre = torch.ops.growdense.linear_forward(x.cuda(), w.cuda(), b.cuda(), ai, ao, activation)
    assert_within(f"y {activation} [{gemm_path}]", y, want, 1.2 * scale, tol)
    assert_within(f"y of linear_forward {activation} [{gemm_path}]", y2, want, 1.2 * scale, tol)
    assert_within(f"pre-activation {activation} [{gemm_path}]", pre, want_pre, scale, tol)


@functools.lru_cache(maxsize=64)
def _backward_case_act(shape, dtype, activation, mask, seed=1):
    mask = list(mask)
    rows, (ci, co), (ai, ao) = shape
    x, w, b = make_inputs(rows, ci, co, ai, ao, True, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(rows, ao, generator=g, dtype=torch.float64).to(dtype)
    pre = (2.5 * torch.randn(rows, ao, generator=g, dtype=torch.float64)).to(dtype)
    want = torch.ops.growdense.linear_backward_reference(
        grad.double(), x.double(), w.double(), pre.double(), ai, ao, activation, mask
    )
    # |act'| < 1.2: 2.2 |grad| bounds |grad act'| plus the derivative's own rounding.
    scale = torch.ops.growdense.linear_backward_reference(
        2.2 * grad.double().abs(), x.double().abs(), w.double().abs(), None, ai, ao, "none", mask
    )
    return (grad, x, w, pre), want, scale


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("activation", PRE_ACTIVATIONS)
def test_backward_activations_match_reference(shape, dtype_name, activation, gemm_path, poisoned):
    dtype, tf32, tol = DTYPES[dtype_name]
    _, _, (ai, ao) = shape
    for mask in ([True, True, True], [False, True, True], [True, False, False]):
        (grad, x, w, pre), want, scale = _backward_case_act(shape, dtype, activation, tuple(mask))
        with allow_tf32(tf32):
            got = torch.ops.growdense.linear_backward(
                grad.cuda(), x.cuda(), w.cuda(), pre.cuda(), ai, ao, activation, mask
            )
        for name, wanted, g_, w_, s_ in zip(("grad_x", "grad_weight", "grad_bias"), mask, got, want, scale):
            if wanted:
                assert_within(f"{name} {activation} {mask} [{gemm_path}]", g_, w_, s_, tol)
            else:
                assert g_.numel() == 0


@pytest.mark.parametrize("activation", PRE_ACTIVATIONS)
def test_grow_linear_activation_trains_on_the_gpu(activation, gemm_path):
    """Autograd end to end on the GPU against F.linear + the functional activation in float64."""
    torch.manual_seed(0)
    layer = GrowLinear(20, 10, capacity_in=64, capacity_out=32, activation=activation, device="cuda",
                       dtype=torch.float64)
    fn = ops.ACTIVATION_FUNCTIONS[activation]
    for batch in (3, 300):
        x = torch.randn(batch, 20, device="cuda", dtype=torch.float64)
        layer.zero_grad()
        layer(x).square().sum().backward()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        y_ref = fn(torch.nn.functional.linear(x, w[:10, :20], b[:10]))
        y_ref.square().sum().backward()
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-10, atol=1e-10)


# ---- layouts, edge cases, streams -----------------------------------------------------
def test_strided_views(gemm_path):
    """A weight that is a view into a wider buffer, a transposed weight, a strided input."""
    x, w, b = make_inputs(37, 50, 40, 29, 23, True, torch.float32, seed=5)
    want = torch.ops.growdense.linear_reference(x.double(), w.double(), b.double(), 29, 23, "relu")
    wide = torch.full((40, 64), NAN, device="cuda")
    wide[:, :50] = w.cuda()
    views = {
        "weight view (row stride 64)": (x.cuda(), wide[:, :50]),
        "transposed weight": (x.cuda(), w.t().contiguous().cuda().t()),
        "strided input": (torch.stack([x, x], dim=2).reshape(37, 58).cuda()[:, ::2], w.cuda()),
    }
    for name, (xv, wv) in views.items():
        y = ops.linear(xv, wv, b.cuda(), 29, 23, "relu")
        torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-4, msg=name)
        gx, gw, gb = torch.ops.growdense.linear_backward(torch.ones_like(y), xv, wv, y, 29, 23, "relu", [True] * 3)
        wx, ww, wb = torch.ops.growdense.linear_backward_reference(
            torch.ones_like(y).double().cpu(), x.double(), w.double(), y.double().cpu(), 29, 23, "relu", [True] * 3
        )
        torch.testing.assert_close(gx.double().cpu(), wx, rtol=1e-5, atol=1e-4, msg=name)
        torch.testing.assert_close(gw.double().cpu(), ww, rtol=1e-5, atol=1e-4, msg=name)
        torch.testing.assert_close(gb.double().cpu(), wb, rtol=1e-5, atol=1e-4, msg=name)


def test_leading_dimensions_and_empty_batch(gemm_path):
    x, w, b = make_inputs(24, 12, 10, 7, 5, True, torch.float32, seed=2)
    xc = x.view(2, 3, 4, 7).cuda()
    y = ops.linear(xc, w.cuda(), b.cuda(), 7, 5, "relu")
    assert y.shape == (2, 3, 4, 5)
    want = torch.ops.growdense.linear_reference(x.double(), w.double(), b.double(), 7, 5, "relu")
    torch.testing.assert_close(y.reshape(24, 5).double().cpu(), want, rtol=1e-5, atol=1e-5)
    y1 = ops.linear(xc[0, 0, 0], w.cuda(), b.cuda(), 7, 5)  # 1-D input
    assert y1.shape == (5,)

    empty = torch.empty(0, 7, device="cuda")
    assert ops.linear(empty, w.cuda(), b.cuda(), 7, 5).shape == (0, 5)
    gx, gw, gb = torch.ops.growdense.linear_backward(
        torch.empty(0, 5, device="cuda"), empty, w.cuda(), torch.empty(0, 5, device="cuda"), 7, 5, "relu", [True] * 3
    )
    assert gx.shape == (0, 7) and gw.shape == (10, 12) and gb.shape == (10,)
    assert not gw.any() and not gb.any()


def test_results_on_a_non_default_stream(gemm_path):
    """The kernels run on the current stream: after a long sleep on it, they see its writes."""
    x, w, b = make_inputs(300, 80, 60, 70, 50, True, torch.float32, seed=9)
    grad = torch.randn(300, 50, dtype=torch.float32)
    y_want = torch.ops.growdense.linear_reference(x.double(), w.double(), b.double(), 70, 50, "relu")
    wc, bc, gc, x_new = w.cuda(), b.cuda(), grad.cuda(), x.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        xs = torch.zeros(300, 70, device="cuda")
        block = torch.zeros(40, 30, device="cuda")
        torch.cuda._sleep(100_000_000)  # the writes below land long after any launch
        xs.copy_(x_new)
        block.fill_(7.0)
        y = ops.linear(xs, wc, bc, 70, 50, "relu")
        gx, gw, gb = torch.ops.growdense.linear_backward(gc, xs, wc, y, 70, 50, "relu", [True] * 3)
        ops.normal_block_(block, (5, 25), (0, 10), 1.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y.double().cpu(), y_want, rtol=1e-5, atol=1e-4)
    wx, ww, wb = torch.ops.growdense.linear_backward_reference(
        grad.double(), x.double(), w.double(), y.double().cpu(), 70, 50, "relu", [True] * 3
    )
    torch.testing.assert_close(gx.double().cpu(), wx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw.double().cpu(), ww, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb.double().cpu(), wb, rtol=1e-5, atol=1e-4)
    inside = block[5:25, 0:10]
    assert (inside != 7.0).all() and inside.std() > 0.5
    outside = block.clone()
    outside[5:25, 0:10] = 7.0
    assert (outside == 7.0).all()


def test_poisoning_is_active(poisoned):
    """The premise of the poisoned tests: fresh allocations read as NaN."""
    assert torch.empty(1000, device="cuda").isnan().all()
    assert torch.empty(3, 5, dtype=torch.bfloat16, device="cuda").isnan().all()


def test_opcheck_on_cuda():
    x = torch.randn(6, 5, device="cuda", requires_grad=True)
    w = torch.zeros(7, 8, device="cuda")
    w[:4, :5] = torch.randn(4, 5, device="cuda")
    w.requires_grad_(True)
    b = torch.zeros(7, device="cuda", requires_grad=True)
    for act in ops.ACTIVATIONS:
        torch.library.opcheck(torch.ops.growdense.linear.default, (x, w, b, 5, 4, act))
        torch.library.opcheck(torch.ops.growdense.linear.default, (x, w, None, 5, 4, act))
        torch.library.opcheck(torch.ops.growdense.linear_forward.default, (x.detach(), w.detach(), None, 5, 4, act))
    pre = torch.randn(6, 4, device="cuda")
    for act in ("gelu", "gelu_tanh", "silu"):
        torch.library.opcheck(
            torch.ops.growdense.linear_backward.default,
            (torch.randn(6, 4, device="cuda"), x.detach(), w.detach(), pre, 5, 4, act, [True, True, True]),
        )
    grad = torch.randn(6, 4, device="cuda")
    out = torch.relu(torch.randn(6, 4, device="cuda"))
    op = torch.ops.growdense.linear_backward.default
    torch.library.opcheck(op, (grad, x.detach(), w.detach(), out, 5, 4, "relu", [True, True, True]))
    torch.library.opcheck(op, (grad, x.detach(), w.detach(), None, 5, 4, "none", [False, True, False]))
    torch.library.opcheck(
        torch.ops.growdense.normal_block_.default, (torch.zeros(6, 5, device="cuda"), 1, 4, 0, 3, 0.5, None)
    )


def test_errors_name_the_problem():
    x = torch.randn(4, 5, device="cuda")
    w = torch.zeros(6, 5, device="cuda")
    with pytest.raises(RuntimeError, match="grad_out is on cpu"):
        torch.ops.growdense.linear_backward(torch.ones(4, 6), x, w, None, 5, 6, "none", [True, True, True])
    with pytest.raises(RuntimeError, match="input is on"):
        ops.linear(x, w.cpu(), None, 5, 6)


# ---- GrowLinear on the GPU ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grow_linear_trains_and_grows_in_place(dtype, gemm_path):
    torch.manual_seed(0)
    layer = GrowLinear(20, 10, capacity_in=64, capacity_out=32, activation="relu", device="cuda", dtype=dtype)
    pointers = (layer.weight.data_ptr(), layer.bias.data_ptr())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)

    def step(batch: int) -> None:
        x = torch.randn(batch, layer.in_features, device="cuda", dtype=dtype)
        y = layer(x)
        want = torch.ops.growdense.linear_reference(
            x.double().cpu(), layer.weight.double().cpu(), layer.bias.double().cpu(),
            layer.in_features, layer.out_features, "relu",
        )
        tol = 1e-4 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol)
        y.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    for batch in (1, 128, 4096):
        step(batch)
    grad_pointers = (layer.weight.grad.data_ptr(), layer.bias.grad.data_ptr())
    layer.grow_out(8)
    layer.grow_in(16)
    assert layer.weight[10:18, :20].abs().sum() > 0  # He rows written by the CUDA kernel
    for batch in (128, 65536):
        step(batch)
    assert (layer.weight.data_ptr(), layer.bias.data_ptr()) == pointers
    assert (layer.weight.grad.data_ptr(), layer.bias.grad.data_ptr()) == grad_pointers
    ao, ai = layer.out_features, layer.in_features
    for t in (layer.weight, layer.weight.grad):
        assert not t[ao:].any() and not t[:, ai:].any()
    for t in (layer.bias, layer.bias.grad):
        assert not t[ao:].any()


# ---- normal_block_ --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_normal_block_writes_only_the_block(dtype):
    t = torch.full((50, 70), 3.0, device="cuda", dtype=dtype)
    ops.normal_block_(t, (10, 30), (5, 69), 0.5)
    block = t[10:30, 5:69]
    assert not (block == 3.0).any()
    rest = t.clone()
    rest[10:30, 5:69] = 3.0
    assert (rest == 3.0).all()


def test_normal_block_in_a_transposed_view():
    base = torch.zeros(60, 80, device="cuda")
    t = base.t()  # 80 x 60, strides (1, 80)
    ops.normal_block_(t, (7, 50), (3, 31), 1.0)
    written = torch.zeros_like(t, dtype=torch.bool)
    written[7:50, 3:31] = True
    assert (t[written] != 0).all() and (t[~written] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_normal_block_statistics(dtype):
    t = torch.zeros(1200, 1000, device="cuda", dtype=dtype)
    ops.normal_block_(t, (100, 1100), (0, 1000), 0.25)
    v = t[100:1100].double()
    n = v.numel()
    assert abs(v.mean().item()) < 5 * 0.25 / math.sqrt(n)
    assert abs(v.std().item() / 0.25 - 1) < 0.01
    within = (v.abs() < 0.25).double().mean().item()
    assert abs(within - 0.6827) < 0.005
    assert abs((v.abs() < 0.5).double().mean().item() - 0.9545) < 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_block_draws_do_not_repeat(dtype):
    """Threads use distinct Philox subsequences and consecutive calls distinct offsets.

    Each thread writes the four normals of one draw to four consecutive elements; two
    threads (or two calls) sharing random numbers would repeat a whole group of four,
    which independent draws never do.
    """
    torch.manual_seed(1)
    a = torch.zeros(1200, 1000, device="cuda", dtype=dtype)  # more values than threads x 4
    b = torch.zeros_like(a)
    ops.normal_block_(a, (0, 1200), (0, 1000), 1.0)
    ops.normal_block_(b, (0, 1200), (0, 1000), 1.0)
    groups = torch.cat([a.flatten(), b.flatten()]).view(-1, 4)
    assert torch.unique(groups, dim=0).shape[0] == groups.shape[0]


def test_normal_block_is_reproducible():
    shape, rows, cols = (40, 30), (3, 33), (2, 29)
    torch.manual_seed(123)
    a = ops.normal_block_(torch.zeros(shape, device="cuda"), rows, cols, 1.0)
    b = ops.normal_block_(torch.zeros(shape, device="cuda"), rows, cols, 1.0)
    torch.manual_seed(123)
    c = ops.normal_block_(torch.zeros(shape, device="cuda"), rows, cols, 1.0)
    assert torch.equal(a, c) and not torch.equal(a, b)

    state = torch.cuda.get_rng_state()
    g1 = torch.Generator(device="cuda").manual_seed(7)
    g2 = torch.Generator(device="cuda").manual_seed(7)
    d = ops.normal_block_(torch.zeros(shape, device="cuda"), rows, cols, 1.0, g1)
    e = ops.normal_block_(torch.zeros(shape, device="cuda"), rows, cols, 1.0, g2)
    assert torch.equal(d, e)
    assert torch.equal(torch.cuda.get_rng_state(), state)  # the default generator did not move


def test_normal_block_edge_cases():
    t = torch.full((5, 6), 2.0, device="cuda")
    ops.normal_block_(t, (2, 2), (0, 6), 1.0)  # empty block: nothing written
    ops.normal_block_(t, (0, 5), (3, 3), 1.0)
    assert (t == 2.0).all()
    ops.normal_block_(t, (1, 4), (1, 5), 0.0)
    assert (t[1:4, 1:5] == 0).all()
    with pytest.raises(RuntimeError):
        ops.normal_block_(t, (0, 5), (0, 6), 1.0, torch.Generator())  # a CPU generator
    with pytest.raises(ValueError):
        ops.normal_block_(t, (0, 6), (0, 6), 1.0)
