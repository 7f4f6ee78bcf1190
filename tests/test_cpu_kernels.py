"""The CPU kernels of every capability this machine runs (default, AVX2, AVX-512, SVE256)
against float64 references, and how the capability is chosen, forced and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import growdense.ops as ops

SUPPORTED = ops.cpu_capabilities()
ALL_NAMES = ("default", "avx2", "avx512", "sve256")


@pytest.fixture(params=SUPPORTED)
def capability(request):
    """Runs the test with the CPU kernels of one capability, then restores the previous."""
    previous = ops._set_cpu_capability(request.param)
    try:
        assert ops.cpu_capability() == request.param
        yield request.param
    finally:
        ops._set_cpu_capability(previous)


def elbo_formula(logits, x, mu, logvar):
    """The negative ELBO as PyTorch's functions compute it, in float64."""
    logits, x, mu, logvar = (t.double() for t in (logits, x, mu, logvar))
    nll = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)
    return nll - 0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


# Every row length from 1 to past two vectors of the widest capability (2 x 16 floats), to
# cover the full-vector loop and each tail length, plus the study's 784.
ROW_LENGTHS = [1, 3, 8, 15, 16, 17, 31, 32, 33, 47, 64, 65, 784]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elbo_matches_the_float64_formula(capability, dtype):
    g = torch.Generator().manual_seed(0)
    for D in ROW_LENGTHS:
        L, B, Z = 3, 4, 5
        logits = (4 * torch.randn(L, B, D, generator=g)).to(dtype).requires_grad_()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.rand(B, D, generator=g, dtype=acc).requires_grad_()
        mu = torch.randn(B, Z, generator=g, dtype=acc).requires_grad_()
        logvar = torch.randn(B, Z, generator=g, dtype=acc).requires_grad_()
        out = ops.negative_elbo(logits, x, mu, logvar)
        ref = elbo_formula(logits, x, mu, logvar)
        # The reference reads the same (rounded) logits in float64: the errors left are the
        # accumulation type's arithmetic (exp within ~20 ulp, sums of L * D terms of size
        # ~4): 1e-5 of the loss's magnitude for float32 is ~100x that; 1e-12 for float64.
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=tol * ref.abs().max().item(), msg=f"D={D}")
        w = torch.randn(B, generator=g, dtype=acc)
        got = torch.autograd.grad(out, (logits, x, mu, logvar), w)
        leaves = [t.detach().double().requires_grad_() for t in (logits, x, mu, logvar)]
        want = torch.autograd.grad(elbo_formula(*leaves), leaves, w.double())
        for name, a, b in zip(("logits", "target", "mu", "logvar"), got, want):
            # grad_logits is stored in the logits' dtype: within half an ulp of it (2^-8
            # relative for bfloat16, 2^-11 for float16) plus float32's few ulp; others 1e-5
            # (float32) or 1e-12 (float64) of the largest entry.
            rel = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}.get(dtype, tol) if name == "logits" else tol
            bound = b.abs().max().item()
            torch.testing.assert_close(a.double(), b, rtol=rel, atol=tol * bound + 1e-30, msg=f"{name}, D={D}")


def test_elbo_capabilities_agree_on_extreme_logits(capability):
    # +-inf, huge and tiny logits against torch's own binary_cross_entropy_with_logits.
    inf = float("inf")
    v = torch.tensor([[[inf, inf, inf, -inf, -inf, -inf, 100.0, -100.0, 88.0, -88.0, 1e-30, 0.0] * 3]])
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5] * 3])
    v.requires_grad_()
    mu, logvar = torch.zeros(1, 2), torch.zeros(1, 2)
    out = ops.negative_elbo(v, x, mu, logvar)
    leaf = v.detach().double().requires_grad_()
    terms = F.binary_cross_entropy_with_logits(leaf, x.double().expand_as(leaf), reduction="none")
    ref = terms.sum(-1).mean(0)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    # element by element: each logit alone in its own image
    n = x.numel()
    each = ops.negative_elbo(v.detach().reshape(1, n, 1), x.reshape(n, 1), torch.zeros(n, 1), torch.zeros(n, 1))
    want = terms.detach().reshape(-1)
    assert torch.equal(each.isnan(), want.isnan()), (each, want)
    finite = want.isfinite()
    assert torch.equal(each[~finite & ~want.isnan()], want[~finite & ~want.isnan()].float())
    torch.testing.assert_close(each[finite].double(), want[finite], rtol=1e-6, atol=1e-6)  # float32 of up to ~100
    # the gradient of the logits: torch's sigmoid(v) - x, exact 0 / 1 saturation at +-inf
    (grad,) = torch.autograd.grad(ops.negative_elbo(v, x, mu, logvar).sum(), v)
    (want_grad,) = torch.autograd.grad(ref.sum(), leaf)
    assert torch.equal(grad.isnan(), want_grad.isnan())
    # float32 rounding (1e-6 relative); sigmoid(-100) ~ 4e-44 is a float32 subnormal, whose
    # absolute spacing is 1.4e-45: below the smallest normal only an absolute bound holds.
    tiny = torch.finfo(torch.float32).tiny
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=tiny, equal_nan=True)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_linear_epilogues_match_the_float64_reference(capability, activation, dtype):
    # A layer at part of its capacity (the epilogues see strided blocks), every tail length
    # of the output width.
    g = torch.Generator().manual_seed(1)
    fn = ops.ACTIVATION_FUNCTIONS[activation]
    for out_features in (1, 7, 16, 33, 70):
        w = torch.randn(80, 40, generator=g).to(dtype).requires_grad_()
        b = torch.randn(80, generator=g).to(dtype).requires_grad_()
        x = torch.randn(13, 30, generator=g).to(dtype).requires_grad_()
        y = ops.linear(x, w, b, 30, out_features, activation)
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
        ref = F.linear(xd, wd[:out_features, :30], bd[:out_features])
        ref = ref if fn is None else fn(ref)
        # float32: GEMM sums of 30 products (a few ulp of ~10) and the activation's own
        # few ulp; bfloat16: outputs rounded to 8 bits (2^-8 relative) after a float GEMM.
        rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-7, 2**-7), torch.float64: (1e-12, 1e-12)}[dtype]
        torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol * ref.abs().max().item())
        gy = torch.randn(y.shape, generator=g).to(dtype)
        got = torch.autograd.grad(y, (x, w, b), gy)
        want = torch.autograd.grad(ref, (xd, wd, bd), gy.double())
        for name, a, r in zip("xwb", got, want):
            bound = r.abs().max().item()
            torch.testing.assert_close(a.double(), r, rtol=rtol, atol=atol * 4 * bound + 1e-30, msg=name)
            if name in "wb":  # zero outside the active block
                assert not a[out_features:].any()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_linear_epilogues_at_extreme_pre_activations(capability, activation):
    # Infinities, NaN, the exponentials' overflow and underflow points (|z| near 88), the
    # far tails and signed zeros: the float32 epilogues (a fast exponential, GELU's tail
    # written without cancellation) against torch in float64, forward and derivative.
    # Tolerance: the activations' relative error near 1e-6, plus 1e-6 absolute for the
    # erf polynomial's 1.5e-7 and values that underflow.
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([-inf, -1e4, -100.0, -88.8, -87.0, -20.0, -9.0, -5.0, -3.0, -1e-3, -0.0, 0.0,
                      1e-3, 0.7, 3.0, 5.0, 9.0, 20.0, 87.0, 88.8, 100.0, 1e4, inf, nan])
    fn = ops.ACTIVATION_FUNCTIONS[activation]
    # x = 1 and a zero weight: the pre-activation is the bias, so every z reaches the epilogue.
    x = torch.ones(1, 1, requires_grad=True)
    w = torch.zeros(z.numel(), 1)
    b = z.clone().requires_grad_()
    y = ops.linear(x, w, b, 1, z.numel(), activation)
    zd = z.double().requires_grad_()
    ref = fn(zd)
    torch.testing.assert_close(y[0].double(), ref.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)
    (grad_b,) = torch.autograd.grad(y.sum(), b)
    (want,) = torch.autograd.grad(ref.sum(), zd)
    torch.testing.assert_close(grad_b.double(), want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_capability_is_reported_and_consistent():
    compiled = ops.cpu_capabilities(compiled=True)
    assert compiled[0] == "default" and set(compiled) <= set(ALL_NAMES)
    assert SUPPORTED[0] == "default" and set(SUPPORTED) <= set(compiled)
    assert ops.cpu_capability() in SUPPORTED
    from growdense import _C

    assert _C.cpu_capabilities.split() == compiled
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        flags = open("/proc/cpuinfo").read()
        if " avx2 " in flags and " fma " in flags:
            assert "avx2" in SUPPORTED
        if " avx512f " not in flags:
            assert "avx512" not in SUPPORTED


def test_unknown_or_missing_capability_is_refused_and_changes_nothing():
    before = ops.cpu_capability()
    with pytest.raises(ValueError, match=r"'potato' is not a CPU capability; expected one of: default, avx2"):
        ops._set_cpu_capability("potato")
    lacking = [n for n in ALL_NAMES if n not in SUPPORTED]
    for name in lacking:
        with pytest.raises(RuntimeError, match=rf"'{name}' names CPU kernels this (CPU cannot run|build does not)"):
            ops._set_cpu_capability(name)
    assert ops.cpu_capability() == before


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("GROWDENSE_CPU_CAPABILITY", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_environment_variable_forces_a_path(name):
    code = "import growdense.ops as o; print(o.cpu_capability())"
    run = _run(code, GROWDENSE_CPU_CAPABILITY=name.upper())
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == name


def test_the_environment_variable_refuses_what_the_cpu_lacks():
    lacking = [n for n in ALL_NAMES if n not in SUPPORTED]
    for name in lacking + ["potato"]:
        run = _run("import growdense", GROWDENSE_CPU_CAPABILITY=name)
        assert run.returncode != 0
        assert "ImportError" in run.stderr and f"GROWDENSE_CPU_CAPABILITY='{name}'" in run.stderr, run.stderr[-2000:]


def test_aten_cpu_capability_lowers_the_choice():
    # Without the variable, growdense uses what ATen uses, at most: ATen forced to its
    # baseline makes growdense take its own.
    run = _run("import growdense.ops as o; print(o.cpu_capability())", ATEN_CPU_CAPABILITY="default")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "default"


def test_info_prints_the_cpu_kernels():
    run = _run("import growdense.__main__ as m; m.main(['info'])", GROWDENSE_CPU_CAPABILITY="default")
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads(run.stdout)
    assert info["cpu_kernels"] == "default"
    assert info["cpu_kernels_available"] == SUPPORTED
    assert info["cpu_kernels_compiled"] == ops.cpu_capabilities(compiled=True)
