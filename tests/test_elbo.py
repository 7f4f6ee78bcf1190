"""The fused negative-ELBO op against today's PyTorch formula in float64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import growdense.ops as ops
from growdense.models import negative_elbo as model_negative_elbo

ROOT = Path(__file__).resolve().parents[1]


def formula(logits, x, mu, logvar):
    """The VAE's loss as plain PyTorch wrote it (BCE with logits expanded L times), in float64."""
    logits, x, mu, logvar = (t.double() for t in (logits, x, mu, logvar))
    nll = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)
    return nll - 0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def make(L, B, D, Z=20, dtype=torch.float32, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(L, B, D, generator=g)).to(dtype).requires_grad_()
    x = torch.rand(B, D, generator=g).requires_grad_()
    mu = torch.randn(B, Z, generator=g).requires_grad_()
    logvar = torch.randn(B, Z, generator=g).requires_grad_()
    return logits, x, mu, logvar


SHAPES = [(1, 1, 7), (20, 1, 784), (1, 5, 784), (20, 128, 784), (3, 4, 33), (2, 3, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_the_float64_formula(shape, dtype):
    inputs = make(*shape, dtype=dtype)
    out = ops.negative_elbo(*inputs)
    assert out.dtype == torch.float32 and out.shape == (shape[1],)
    ref = formula(*inputs)
    # The reference sees the same (already rounded) logits in float64, so the only errors
    # are the float32 arithmetic (exp/log1p within a few ulp, sums of up to L*D = 15,680
    # terms of size ~4): relative 1e-5 of the loss's magnitude is ~100x that.
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * scale)
    g = torch.randn(shape[1], generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, inputs, g)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(formula(*leaves), leaves, g.double())
    for name, a, b in zip(("logits", "target", "mu", "logvar"), got, want):
        assert a.dtype == inputs[("logits", "target", "mu", "logvar").index(name)].dtype
        # float32 gradients: a few ulp of the largest entry. bfloat16 grad_logits are
        # stored in bfloat16: within half an ulp (2^-9 relative) of the float64 value.
        rel = 2.0**-8 if (name == "logits" and dtype == torch.bfloat16) else 1e-5
        bound = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=rel, atol=1e-6 * bound + 1e-30, msg=name)


def test_extreme_logits_stay_finite_and_exact():
    # |v| up to 100: softplus must not overflow, sigmoid must saturate to exactly 0 or 1.
    logits = torch.tensor([[[-100.0, -30.0, 0.0, 30.0, 100.0, 17.0, -17.0]]], requires_grad=True)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.25, 0.75]])
    mu, logvar = torch.zeros(1, 2, requires_grad=True), torch.zeros(1, 2, requires_grad=True)
    out = ops.negative_elbo(logits, x, mu, logvar)
    ref = formula(logits, x, mu, logvar)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)  # float32 of values up to ~100
    (grad,) = torch.autograd.grad(out.sum(), logits)
    leaf = logits.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(formula(leaf, x, mu, logvar).sum(), leaf)
    torch.testing.assert_close(grad.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_rows_are_summed_exactly(dtype):
    # The CPU kernel sums each row's softplus terms as the log of a running product, folded
    # every 64 vectors: rows of 5,000 pixels fold several times, and logits of 0 make every
    # factor 2, the largest the product can reach before a fold.
    g = torch.Generator().manual_seed(3)
    logits = torch.zeros(2, 3, 5000, dtype=dtype)
    logits[1] = 6 * torch.randn(3, 5000, generator=g, dtype=dtype)
    x = torch.rand(3, 5000, generator=g, dtype=dtype)
    mu, logvar = torch.zeros(3, 2, dtype=dtype), torch.zeros(3, 2, dtype=dtype)
    out = ops.negative_elbo(logits, x, mu, logvar)
    ref = formula(logits, x, mu, logvar)
    assert torch.isfinite(out).all()
    # float32: as above, 1e-5 of the magnitude; float64: sums of 10,000 terms of size ~6
    # carry errors near 1e-12 relative, far below this tolerance.
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * ref.abs().max().item())


def test_models_negative_elbo_is_the_fused_op_and_the_old_formula():
    logits, x, mu, logvar = make(20, 6, 784)
    got = model_negative_elbo(x, logits, mu, logvar)
    torch.testing.assert_close(got, ops.negative_elbo(logits, x, mu, logvar), rtol=0, atol=0)
    # Same tolerance as above: float32 arithmetic over 15,680 terms.
    ref = formula(logits, x, mu, logvar)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    # A target that broadcasts to (B, D), as the old expand_as accepted.
    one = torch.rand(1, 784)
    torch.testing.assert_close(
        model_negative_elbo(one, logits, mu, logvar), ops.negative_elbo(logits, one.expand(6, 784), mu, logvar)
    )


def test_gradcheck_float64():
    inputs = make(3, 4, 9, Z=5, dtype=torch.float64, scale=2.0)
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(torch.ops.growdense.negative_elbo, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    logits, x, mu, logvar = make(3, 4, 37, Z=5, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = (logits, x.detach().to(acc).requires_grad_(), mu.detach().to(acc), logvar.detach().to(acc).requires_grad_())
    torch.library.opcheck(torch.ops.growdense.negative_elbo.default, args)
    grad = torch.randn(4, dtype=acc)
    for mask in ([True, True, True, True], [True, False, False, False], [False, False, True, True]):
        torch.library.opcheck(
            torch.ops.growdense.negative_elbo_backward.default,
            (grad, *(t.detach() for t in args), mask),
        )


def test_only_requested_gradients_are_computed():
    logits, x, mu, logvar = make(2, 3, 10)
    out = ops.negative_elbo(logits, x.detach(), mu, logvar.detach())
    gl, gm = torch.autograd.grad(out.sum(), (logits, mu))
    ld, md = logits.detach().double().requires_grad_(), mu.detach().double().requires_grad_()
    wl, wm = torch.autograd.grad(formula(ld, x, md, logvar).sum(), (ld, md))
    torch.testing.assert_close(gl.double(), wl, rtol=1e-5, atol=1e-7)  # float32 vs float64
    torch.testing.assert_close(gm.double(), wm, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((20, 784), (4, 784), (4, 20), (4, 20)), r"logits of shape \(L, B, D\)"),
        (((0, 4, 784), (4, 784), (4, 20), (4, 20)), "at least one latent sample"),
        (((2, 4, 784), (4, 783), (4, 20), (4, 20)), r"target must have shape \(B, D\) = \(4, 784\)"),
        (((2, 4, 784), (3, 784), (4, 20), (4, 20)), r"target must have shape"),
        (((2, 4, 784), (4, 784), (5, 20), (5, 20)), r"mu must have shape \(B, Z\) with B = 4"),
        (((2, 4, 784), (4, 784), (4, 20), (4, 19)), "logvar must have the shape of mu"),
    ],
)
def test_wrong_shapes_give_a_clear_error(shapes, match):
    tensors = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        torch.ops.growdense.negative_elbo(*tensors)


def test_wrong_dtypes_give_a_clear_error():
    logits = torch.zeros(2, 3, 5, dtype=torch.bfloat16)
    x, mu = torch.zeros(3, 5, dtype=torch.bfloat16), torch.zeros(3, 2)
    with pytest.raises(TypeError, match=r"target must be Float \(the accumulation type of BFloat16 logits\)"):
        torch.ops.growdense.negative_elbo(logits, x, mu, mu)
    with pytest.raises(TypeError, match="float64, float32, bfloat16 or float16 logits"):
        torch.ops.growdense.negative_elbo(logits.int(), x.float(), mu, mu)
    # The Python entry point converts target, mu and logvar itself.
    ops.negative_elbo(logits, x, mu.bfloat16(), mu.half())


def test_under_autocast_the_loss_is_float32_from_bfloat16_logits():
    logits, x, mu, logvar = make(4, 3, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb, mb, vb = logits.bfloat16(), mu.bfloat16(), logvar.bfloat16()
        out = torch.ops.growdense.negative_elbo(lb, x, mb, vb)  # autocast casts mu, logvar up
    assert out.dtype == torch.float32
    ref = formula(lb, x, mb, vb)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    out.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.float32
    assert mu.grad is not None and mu.grad.dtype == torch.float32


def test_baseline_cpu_kernel_matches_too():
    # The kernels are compiled once per CPU capability (tests/test_cpu_kernels.py covers
    # each); ATEN_CPU_CAPABILITY (read once per process) lowers growdense's choice with
    # ATen's, selecting the baseline compilation here.
    code = (
        "import torch, growdense.ops as ops\n"
        "import torch.nn.functional as F\n"
        "torch.manual_seed(0)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    l = (4 * torch.randn(3, 5, 37)).to(dt).requires_grad_(); x = torch.rand(5, 37)\n"
        "    m = torch.randn(5, 4, requires_grad=True); v = torch.randn(5, 4, requires_grad=True)\n"
        "    out = ops.negative_elbo(l, x, m, v)\n"
        "    ld = l.detach().double().requires_grad_()\n"
        "    ref = F.binary_cross_entropy_with_logits(ld, x.double().expand_as(ld), reduction='none').sum(-1).mean(0)\n"
        "    ref = ref - 0.5 * (1 + v.double() - m.double() ** 2 - v.double().exp()).sum(-1)\n"
        "    assert (out.double() - ref).abs().max() < 1e-4, (out, ref)\n"
        "    g, = torch.autograd.grad(out.sum(), l); w, = torch.autograd.grad(ref.sum(), ld)\n"
        "    assert ((g.double() - w).abs() <= 2**-8 * w.abs() + 1e-6).all()\n"
        "print('ok', torch.backends.cpu.get_cpu_capability())\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok DEFAULT"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (20, 128, 784), (3, 5, 33)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernels_match_the_float64_formula(shape, dtype):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("growdense::negative_elbo", "CUDA"):
        pytest.skip("growdense was built without its CUDA kernels")
    inputs = [t.detach().cuda().requires_grad_() for t in make(*shape, dtype=dtype)]
    out = ops.negative_elbo(*inputs)
    assert out.dtype == torch.float32 and out.is_cuda
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = formula(*leaves)
    # float32 arithmetic on the GPU (expf/log1pf within a few ulp), as on the CPU
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=0, atol=1e-5 * ref.abs().max().item())
    g = torch.randn(shape[1])
    got = torch.autograd.grad(out, inputs, g.cuda())
    want = torch.autograd.grad(ref, leaves, g.double())
    for name, a, b in zip(("logits", "target", "mu", "logvar"), got, want):
        rel = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}.get(dtype, 1e-5) if name == "logits" else 1e-5
        torch.testing.assert_close(a.double().cpu(), b, rtol=rel, atol=1e-6 * b.abs().max().item() + 1e-30, msg=name)


# ---- second derivatives (a gradient penalty through the loss) ---------------------------


def test_gradgradcheck_float64():
    inputs = make(3, 4, 9, Z=5, dtype=torch.float64, scale=2.0)
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    assert torch.autograd.gradgradcheck(torch.ops.growdense.negative_elbo, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_penalty_matches_the_formula(dtype):
    # d/d(inputs) of |d loss / d(logits, mu, logvar)|^2, through create_graph=True: the
    # fused op's second derivatives against the formula's, both by autograd.
    logits, x, mu, logvar = (t.detach().to(dtype).requires_grad_() for t in make(2, 3, 11, Z=4, scale=2.0))

    def penalty(fn, tensors):
        out = fn(*tensors).sum()
        grads = torch.autograd.grad(out, (tensors[0], tensors[2], tensors[3]), create_graph=True)
        return sum(g.square().sum() for g in grads)

    got = torch.autograd.grad(penalty(ops.negative_elbo, (logits, x, mu, logvar)), (logits, x, mu, logvar))
    leaves = [t.detach().double().requires_grad_() for t in (logits, x, mu, logvar)]
    want = torch.autograd.grad(penalty(formula, leaves), leaves)
    for name, a, b in zip(("logits", "target", "mu", "logvar"), got, want):
        assert a is not None and b.abs().max() > 0, name
        # float32: sigmoid and exp within a few ulp, products of them: 1e-5 relative
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


# ---- torch.func transforms ---------------------------------------------------------------


def test_torch_func_grad_and_vmap_of_the_op():
    logits, x, mu, logvar = (t.detach() for t in make(3, 5, 17, Z=4))
    per_sample = torch.func.vmap(
        torch.func.grad(lambda l, t, m, v: ops.negative_elbo(l[:, None], t[None], m[None], v[None]).sum(),
                        argnums=(0, 2, 3)),
        in_dims=(1, 0, 0, 0),
    )(logits, x, mu, logvar)
    leaves = [t.double().requires_grad_() for t in (logits, mu, logvar)]
    want = torch.autograd.grad(formula(leaves[0], x, leaves[1], leaves[2]).sum(), leaves)
    # Images are independent: sample b's gradient is row b of the batch gradient.
    got = (per_sample[0].transpose(0, 1), per_sample[1], per_sample[2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)  # float32 vs float64


def test_per_sample_gradients_of_the_vae_loss():
    from torch.func import functional_call, grad, vmap

    from growdense.models import VAE

    torch.manual_seed(0)
    model = VAE(8, 6, capacity=(16, 8), latent=3, decoder=(5, 7), image_size=12)
    B, L = 4, 2
    x = torch.rand(B, 12)
    eps = torch.randn(B, L, 1, 3)  # each image's noise, so that both sides see the same

    class LossOf(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x, eps):
            self.vae._noise_for = lambda x, samples, generator=None: eps  # (L, 1, latent): this image's noise
            try:
                return self.vae.loss(x, L)
            finally:
                del self.vae._noise_for

    wrapper = LossOf(model)
    params = {k: v.detach() for k, v in wrapper.named_parameters()}
    per_sample = vmap(grad(lambda p, xi, ei: functional_call(wrapper, p, (xi[None], ei))), in_dims=(None, 0, 0))(
        params, x, eps
    )
    for b in range(B):
        mu, logvar = model.encode(x[b : b + 1])
        z = mu + torch.exp(0.5 * logvar) * eps[b]
        logits = model.decode_logits(z.reshape(L, 3)).reshape(L, 1, 12)
        loss = formula(logits, x[b : b + 1], mu, logvar).mean()
        names = [n for n, p in model.named_parameters()]
        want = torch.autograd.grad(loss, [p for n, p in model.named_parameters()])
        for name, w in zip(names, want):
            # float32 forward and backward of a small network: 1e-5 relative
            torch.testing.assert_close(per_sample["vae." + name][b], w, rtol=1e-5, atol=1e-6, msg=name)


# ---- infinite logits ---------------------------------------------------------------------


def test_infinite_logits_give_what_torch_gives():
    inf = float("inf")
    for v, t in ((inf, 0.0), (inf, 0.5), (inf, 1.0), (-inf, 0.0), (-inf, 1.0), (-inf, 0.5)):
        logits = torch.tensor([[[v, 1.5]]], requires_grad=True)
        x = torch.tensor([[t, 1.0]])
        zeros = torch.zeros(1, 1)
        out = ops.negative_elbo(logits, x, zeros, zeros)
        want = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)
        torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-6, atol=0, msg=f"{v}, {t}")
        (grad,) = torch.autograd.grad(out.sum(), logits)
        (want_grad,) = torch.autograd.grad(want.sum(), logits)
        torch.testing.assert_close(grad, want_grad, equal_nan=True, rtol=1e-6, atol=0, msg=f"{v}, {t}")
    # +inf with target 0 is inf, as torch gives, not NaN
    assert ops.negative_elbo(torch.tensor([[[inf]]]), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1)).item() == inf
