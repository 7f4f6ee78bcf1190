"""Compile once, grow many times: a torch.compile'd GrowLinear model across the study's widths.

The active widths are DynamicInts, which torch.compile traces as symbolic sizes, and the
compiled forward is written in aten ops on views of the active block: one graph serves
every width below the capacity, a second one the width equal to it (its strides
differ). Inductor, on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from growdense import GrowLinear, Wiring

pytest.importorskip("torch._inductor")

# The study's schedule: h1 32..256 step 32, h2 16..128 step 16 (8 widths each).
WIDTHS = [(32 * k, 16 * k) for k in range(1, 9)]


def encoder() -> nn.Sequential:
    return nn.Sequential(
        GrowLinear(784, 32, capacity_out=256, activation="relu"),
        GrowLinear(32, 16, capacity_in=256, capacity_out=128, activation="relu"),
        GrowLinear(16, 20, capacity_in=128),
    )


class CountingInductor:
    """A torch.compile backend that counts the graphs it is given and compiles them with inductor."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


def test_compiled_model_grows_through_the_study_widths_with_at_most_two_graphs():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = encoder()
    compiled_model = copy.deepcopy(eager)
    wirings = [Wiring.chain(list(m)) for m in (eager, compiled_model)]
    backend = CountingInductor()
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(16, 784)
    for k, (h1, h2) in enumerate(WIDTHS):
        if k:
            for wiring, seed in zip(wirings, (k, k)):
                wiring.grow("h1", 32, generator=torch.Generator().manual_seed(seed))
                wiring.grow("h2", 16, generator=torch.Generator().manual_seed(seed + 100))
        assert wirings[1].widths() == {"h1": h1, "h2": h2}
        for m in (eager, compiled_model):
            m.zero_grad()
        y_ref = eager(x)
        y = compiled(x)
        # float32 GEMMs of inductor vs ATen's addmm: same products, possibly summed in
        # another order; 784-term sums of O(1) values agree to ~1e-6 relative.
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y.backward(g)
        for a, b in zip(compiled_model.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * b.grad.abs().max().item())
        # zero outside the active block, in the compiled model's gradients too
        first = compiled_model[0]
        assert first.weight.grad[h1:].abs().sum() == 0
        assert compiled_model[1].weight.grad[:, h1:].abs().sum() == 0
        assert compiled_model[1].weight.grad[h2:].abs().sum() == 0
        assert first.out_features == h1 and type(first.out_features) is int
    assert 1 <= backend.graphs <= 2, f"{backend.graphs} graphs for {len(WIDTHS)} widths"


def test_widths_stay_plain_ints_to_eager_code_and_checkpoints():
    layer = GrowLinear(3, 4, capacity_in=8, capacity_out=8)
    layer.grow_in(2)
    state = layer.state_dict()
    extra = state["_extra_state"]
    assert type(extra["in_features"]) is int and extra == {**extra, "in_features": 5, "out_features": 4}
    assert type(layer.in_features) is int and layer.in_features == 5
    assert "in_features=5, out_features=4," in repr(layer)  # printed as plain ints
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # no DynamicInt in what is saved
    other = GrowLinear(3, 4, capacity_in=8, capacity_out=8)
    other.load_state_dict(loaded)
    assert other.in_features == 5
    copy.deepcopy(layer)(torch.randn(2, 5))


# ---- every public module under torch.compile ---------------------------------------
# Tolerances: inductor's float32 kernels compute the same products and sums as the
# eager ops but may sum in another order (and fuse bias/activation into other loops);
# sums of a few hundred O(1) terms agree to ~1e-6 relative, so outputs and gradients are
# compared at rtol 1e-5 with an absolute floor of 1e-5 x the largest magnitude.


def _close(actual, expected, what):
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _grow_both(wirings, k):
    """Grow every wiring the same way (the study's step: +32 / +16)."""
    for wiring in wirings:
        wiring.grow("h1", 32, generator=torch.Generator().manual_seed(k))
        wiring.grow("h2", 16, generator=torch.Generator().manual_seed(k + 100))


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", None])
def test_growlinear_mlp_of_every_activation_compiles_once_across_growth(activation):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(
        GrowLinear(50, 32, capacity_out=256, activation=activation),
        GrowLinear(32, 16, capacity_in=256, capacity_out=128, activation=activation),
        GrowLinear(16, 10, capacity_in=128),
    )
    twin = copy.deepcopy(eager)
    wirings = [Wiring.chain(list(m)) for m in (eager, twin)]
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(twin, backend=counter)
    x = torch.randn(12, 50)
    for k, _ in enumerate(WIDTHS[::3] + [WIDTHS[-1]]):  # 32/16, 128/64, 224/112 and the capacity 256/128
        if k:
            for _ in range(3 if k < 3 else 1):
                _grow_both(wirings, k)
        y_ref, y = eager(x), compiled(x)
        _close(y, y_ref, f"output at {wirings[0].widths()}")
        g = torch.randn_like(y_ref)
        for m in (eager, twin):
            m.zero_grad()
        y_ref.backward(g)
        y.backward(g)
        for (name, a), b in zip(twin.named_parameters(), eager.parameters()):
            _close(a.grad, b.grad, f"{name}.grad at {wirings[0].widths()}")
    assert 1 <= counter.frame_count <= 2, f"{counter.frame_count} graphs"


def test_growable_converted_mlp_compiles_across_growth():
    from torch._dynamo.testing import CompileCounterWithBackend

    from growdense import growable

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))
    wiring = growable(model, capacity=8.0)
    eager = copy.deepcopy(model)  # zero_out growth preserves the function: the copy stays the reference
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(6, 40)
    names = sorted(wiring.widths())
    for k in range(4):
        if k:
            for name in names:
                wiring.grow(name, 16, init="zero_out")
        y = compiled(x)
        _close(y, eager(x), f"output at {wiring.widths()}")
    assert 1 <= counter.frame_count <= 2, f"{counter.frame_count} graphs"


def _vae_pair():
    from growdense.models.vae import VAE

    torch.manual_seed(0)
    eager = VAE(32, 16)
    return eager, copy.deepcopy(eager)


@pytest.mark.parametrize("with_generator", [False, True], ids=["no-generator", "generator"])
@pytest.mark.parametrize("what", ["forward", "loss"])
def test_vae_and_its_loss_compile_across_the_study_widths(what, with_generator, monkeypatch):
    """torch.compile(vae) and torch.compile(vae.loss): at most 2 graphs over the 8 widths,
    outputs and gradients equal to eager, samples an int, with and without a generator."""
    from torch._dynamo.testing import CompileCounterWithBackend

    # Without a generator inductor would draw the noise with its own generator; its
    # fallback to aten's draws the eager stream, so the two sides can be compared.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    eager, twin = _vae_pair()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(twin if what == "forward" else twin.loss, backend=counter)
    run_eager = eager if what == "forward" else eager.loss
    x = torch.rand(8, 784)
    for k, widths in enumerate(WIDTHS):
        if k:
            _grow_both([eager.wiring, twin.wiring], k)
        assert twin.widths() == widths
        outs = []
        for fn in (run_eager, compiled):
            torch.manual_seed(1000 + k)
            gen = torch.Generator().manual_seed(k) if with_generator else None
            outs.append(fn(x, 2, gen))
        ref, got = outs
        if what == "forward":
            for name, a, b in zip(("logits", "mu", "logvar"), got, ref):
                _close(a, b, f"{name} at {widths}")
            scalar_ref = sum((t * t).sum() for t in ref)
            scalar_got = sum((t * t).sum() for t in got)
        else:
            _close(got, ref, f"loss at {widths}")
            scalar_ref, scalar_got = ref, got
        if what == "loss" or k in (0, len(WIDTHS) - 1):  # gradients: every width for the loss
            for m in (eager, twin):
                m.zero_grad(set_to_none=True)
            scalar_ref.backward()
            scalar_got.backward()
            for (name, a), b in zip(twin.named_parameters(), eager.parameters()):
                _close(a.grad, b.grad, f"{name}.grad at {widths}")
    assert 1 <= counter.frame_count <= 2, f"{counter.frame_count} graphs over {len(WIDTHS)} widths"


def test_vae_training_step_compiles_and_matches_eager():
    """A compiled loss inside a training step (growdense's Adam, growth with the optimizer
    attached): the parameters after each step equal eager's."""
    from growdense.optim import Adam

    torch._dynamo.reset()
    eager, twin = _vae_pair()
    opts = []
    for m in (eager, twin):
        opts.append(Adam(m.parameters(), lr=1e-3))
        m.attach_optimizer(opts[-1])
    loss_fn = torch.compile(twin.loss, backend="inductor")
    x = torch.rand(16, 784)
    for step in range(4):
        if step == 2:
            _grow_both([eager.wiring, twin.wiring], step)
        for m, opt, fn in ((eager, opts[0], eager.loss), (twin, opts[1], loss_fn)):
            opt.zero_grad()
            fn(x, 2, torch.Generator().manual_seed(step)).backward()
            opt.step()
        for (name, a), b in zip(twin.named_parameters(), eager.parameters()):
            # Adam divides by sqrt(v) + eps: on the first steps a gradient differing in its
            # last bits moves a weight by up to ~lr relative to where eager's lands, most
            # where the gradient is near eps (seen: one weight in 200,704 off by 2.7e-6 when
            # the compiled loss rounds differently from the fused kernel). 1% of lr bounds it.
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-2 * 1e-3, msg=lambda m: f"{name} step {step}: {m}")


def test_negative_elbo_op_compiles_with_its_gradients():
    from torch._dynamo.testing import CompileCounterWithBackend

    from growdense.models.vae import negative_elbo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 30, generator=g, requires_grad=True)
    x = torch.rand(5, 30, generator=g)
    mu = torch.randn(5, 4, generator=g, requires_grad=True)
    logvar = torch.randn(5, 4, generator=g, requires_grad=True)
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(lambda *a: negative_elbo(*a).sum(), backend=counter)
    got = fn(x, logits, mu, logvar)
    grads = torch.autograd.grad(got, (logits, mu, logvar))
    # float64 formula as the reference
    l64, m64, v64 = (t.detach().double().requires_grad_() for t in (logits, mu, logvar))
    ref = (torch.nn.functional.binary_cross_entropy_with_logits(l64, x.double().expand_as(l64), reduction="none")
           .sum(-1).mean(0) - 0.5 * (1 + v64 - m64**2 - v64.exp()).sum(-1)).sum()
    ref_grads = torch.autograd.grad(ref, (l64, m64, v64))
    # float32 sums of 30-90 terms against float64: ~1e-6 relative.
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
