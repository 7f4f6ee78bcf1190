"""GrowLinear under torch.autocast: as nn.Linear + F.relu under the same autocast.

Tolerances. Both sides run bfloat16 GEMMs accumulating in float32 and round their
output to bfloat16, but not necessarily with the same GEMM kernel (blocking, summation
order), so an output element may differ by one bfloat16 rounding: 2^-8 relative. The
comparisons allow 2^-7 relative (two roundings) plus an absolute 2^-7 of the tensor's
largest magnitude for elements that are sums with cancellation. float32 gradients that
come out of bfloat16 GEMMs get the same bound. Against float64 math the bound is looser
(the inputs themselves are rounded to bfloat16): 2^-5 of the largest magnitude.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growdense
from growdense import GrowLinear, Wiring
from growdense.models import VAE

BF16 = torch.bfloat16


def close_bf16(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    scale = b.detach().abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-7, atol=2.0**-7 * scale + 1e-12, msg=msg)


def as_nn(layer: GrowLinear) -> nn.Module:
    """An nn.Linear (+ ReLU) holding a copy of the layer's active block."""
    lin = layer.to_linear()
    return nn.Sequential(lin, nn.ReLU()) if layer.activation == "relu" else lin


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("capacity", [False, True], ids=["full", "capacity"])
def test_layer_matches_nn_linear_under_autocast(activation, capacity):
    torch.manual_seed(0)
    cap = {"capacity_in": 48, "capacity_out": 40} if capacity else {}
    layer = GrowLinear(33, 29, activation=activation, **cap)
    ref = as_nn(layer)
    x = torch.randn(7, 5, 33)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x1)
        y_ref = ref(x2)
    assert y.dtype == BF16 and y_ref.dtype == BF16 and y.shape == (7, 5, 29)
    close_bf16(y, y_ref, "output")
    # And against float64 math on the unrounded values: the bfloat16 rounding of inputs,
    # weights and output is within 2^-5 of the output's largest magnitude here.
    want = x.double() @ layer.active_weight.double().T + layer.active_bias.double()
    want = want.relu() if activation == "relu" else want
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2.0**-5 * want.abs().max().item())

    g = torch.randn(7, 5, 29)
    y.backward(g.to(BF16))
    y_ref.backward(g.to(BF16))
    lin = ref[0] if activation == "relu" else ref
    # weights, gradients stay float32; the gradient is zero outside the active block
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32
    assert x1.grad.dtype == torch.float32
    close_bf16(x1.grad, x2.grad, "grad x")
    close_bf16(layer.weight.grad[:29, :33], lin.weight.grad, "grad weight")
    close_bf16(layer.bias.grad[:29], lin.bias.grad, "grad bias")
    if capacity:
        assert layer.weight.grad[29:].abs().sum() == 0 and layer.weight.grad[:, 33:].abs().sum() == 0
        assert layer.bias.grad[29:].abs().sum() == 0


def test_only_the_active_block_is_cast():
    # The cast of a (4096 x 4096) capacity whose active block is 8 x 8 must not touch the
    # capacity: the autocast kernel narrows before casting. Observed through the
    # profiler: the cast's output has the block's size.
    layer = GrowLinear(8, 8, capacity_in=4096, capacity_out=4096)
    x = torch.randn(3, 8)
    with torch.profiler.profile(record_shapes=True) as prof, torch.autocast("cpu", dtype=BF16):
        layer(x)
    shapes = [evt.input_shapes for evt in prof.events() if evt.name == "aten::_to_copy"]
    assert shapes, "no cast recorded"
    assert all(s[0] in ([8, 8], [8], [3, 8]) for s in shapes), shapes


def test_growlinear_chain_matches_nn_chain_under_autocast():
    torch.manual_seed(1)
    chain = nn.Sequential(
        GrowLinear(20, 24, capacity_out=64, activation="relu"),
        GrowLinear(24, 16, capacity_in=64, capacity_out=32, activation="relu"),
        GrowLinear(16, 5, capacity_in=32),
    )
    ref = nn.Sequential(*(as_nn(layer) for layer in chain))
    x = torch.randn(32, 20)
    with torch.autocast("cpu", dtype=BF16):
        y, y_ref = chain(x), ref(x)
    assert y.dtype == BF16
    close_bf16(y, y_ref)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    lins = [m for m in ref.modules() if isinstance(m, nn.Linear)]
    for layer, lin in zip(chain, lins):
        block = layer.weight.grad[: layer.out_features, : layer.in_features]
        # one extra bfloat16 rounding per layer of the chain: 2^-5 relative of the largest
        scale = lin.weight.grad.abs().max().item()
        torch.testing.assert_close(block, lin.weight.grad, rtol=2.0**-5, atol=2.0**-5 * scale)


def test_model_mixing_growlinear_and_nn_linear():
    torch.manual_seed(2)
    model = nn.Sequential(
        GrowLinear(12, 16, capacity_out=32, activation="relu"), nn.Linear(16, 16), nn.ReLU(), GrowLinear(16, 4)
    )
    ref = nn.Sequential(as_nn(model[0]), copy.deepcopy(model[1]), nn.ReLU(), as_nn(model[3]))
    x = torch.randn(10, 12)
    with torch.autocast("cpu", dtype=BF16):
        y, y_ref = model(x), ref(x)
    assert y.dtype == BF16
    close_bf16(y, y_ref)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    close_bf16(model[1].weight.grad, ref[1].weight.grad)
    close_bf16(model[3].weight.grad, ref[3].weight.grad)


def plain_vae_loss(model: VAE, x: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """The VAE's loss written with nn.Linear copies and the PyTorch formula."""
    enc1, enc2, mu_h, lv_h = (as_nn(m) for m in (model.enc1, model.enc2, model.mu_head, model.logvar_head))
    dec = nn.Sequential(as_nn(model.dec1), as_nn(model.dec2), as_nn(model.dec3))
    h = enc2(enc1(x))
    mu, logvar = mu_h(h), lv_h(h)
    eps = torch.randn((samples, *mu.shape), dtype=mu.dtype, generator=generator)
    z = mu + torch.exp(0.5 * logvar) * eps
    logits = dec(z)
    nll = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
    return (nll + kl).mean()


def test_vae_loss_under_autocast_matches_plain_pytorch():
    torch.manual_seed(3)
    model = VAE(64, 32)
    x = torch.rand(16, 784)
    with torch.autocast("cpu", dtype=BF16):
        loss = model.loss(x, samples=4, generator=torch.Generator().manual_seed(5))
        ref = plain_vae_loss(model, x, 4, torch.Generator().manual_seed(5))
    assert loss.dtype == torch.float32
    # ~550 nats; independent bfloat16 roundings through 7 layers: 1% of the value
    torch.testing.assert_close(loss, ref.float(), rtol=1e-2, atol=0)
    with torch.no_grad():
        fp32 = model.loss(x, samples=4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, fp32, rtol=2e-2, atol=0)  # bfloat16 vs float32 model


def test_vae_trains_and_grows_under_autocast():
    torch.manual_seed(4)
    model = VAE(32, 16)
    opt = growdense.optim.Adam(model.parameters(), lr=1e-3)
    model.attach_optimizer(opt)
    x = torch.rand(64, 784).round()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(12):
        if step in (4, 8):
            model.wiring.grow("h1", 32)
            model.wiring.grow("h2", 16)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            loss = model.loss(x, samples=2, generator=gen)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for layer in (model.enc1, model.enc2, model.mu_head):
            w, g = layer.weight, layer.weight.grad
            assert w.dtype == torch.float32 and g.dtype == torch.float32
            o, i = layer.out_features, layer.in_features
            # everything outside the active block stays zero: weights, gradients, Adam state
            for t in (w, g, *(v for v in opt.state[w].values() if torch.is_tensor(v) and v.dim() == 2)):
                assert t[o:].abs().sum() == 0 and t[:, i:].abs().sum() == 0
                assert t.dtype == torch.float32
    assert model.widths() == (96, 48)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_growth_under_autocast_with_wiring_matches_nn_after_growth():
    torch.manual_seed(6)
    layers = [
        GrowLinear(10, 8, capacity_out=24, activation="relu"),
        GrowLinear(8, 6, capacity_in=24, capacity_out=12, activation="relu"),
        GrowLinear(6, 3, capacity_in=12),
    ]
    wiring = Wiring.chain(layers)
    model = nn.Sequential(*layers)
    wiring.grow("h1", 8, generator=torch.Generator().manual_seed(1))
    wiring.grow("h2", 4, generator=torch.Generator().manual_seed(2))
    ref = nn.Sequential(*(as_nn(m) for m in layers))
    x = torch.randn(5, 10)
    with torch.autocast("cpu", dtype=BF16):
        close_bf16(model(x), ref(x))


def test_dtype_mismatch_outside_autocast_is_still_a_clear_error():
    layer = GrowLinear(4, 3)
    with pytest.raises(TypeError, match="GrowLinear got input of dtype torch.bfloat16 but its weight is torch.float32"):
        layer(torch.randn(2, 4, dtype=BF16))
    with torch.autocast("cpu", dtype=BF16):
        assert layer(torch.randn(2, 4, dtype=BF16)).dtype == BF16
        assert layer(torch.randn(2, 4)).dtype == BF16
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        with pytest.raises(TypeError, match="torch.autocast"):
            layer(torch.randn(2, 4, dtype=BF16))
    # the shape check still speaks under autocast
    with torch.autocast("cpu", dtype=BF16), pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 4\)"):
        layer(torch.randn(2, 5))


def test_float64_layers_are_left_alone_by_autocast():
    layer = GrowLinear(4, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=BF16):
        assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_autocast_kernels_are_registered_for_cpu_and_cuda():
    for op in ("growdense::linear", "growdense::negative_elbo"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
