"""GrowLayerNorm and GrowRMSNorm against nn.LayerNorm / nn.RMSNorm of the active width (float64).

Both sides run the same aten kernel (F.layer_norm / F.rms_norm) on the same values, ours
on a view of the capacity tensors: the results agree to the last bits, and the stated
tolerance 1e-12 (float64, sums of at most a few dozen O(1) terms) only allows for a
different summation order.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from growdense import GrowLayerNorm, GrowRMSNorm
from growdense.norms import ramp_step
from grow_module_helpers import (
    CountingBackend,
    active_part,
    assert_outside_zero,
    assert_same_storage,
    storage,
    twin_state,
)

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
CASES = [
    (GrowLayerNorm, nn.LayerNorm, dict()),
    (GrowLayerNorm, nn.LayerNorm, dict(bias=False)),
    (GrowLayerNorm, nn.LayerNorm, dict(elementwise_affine=False)),
    (GrowLayerNorm, nn.LayerNorm, dict(eps=1e-3)),
    (GrowRMSNorm, nn.RMSNorm, dict()),
    (GrowRMSNorm, nn.RMSNorm, dict(eps=1e-6)),
    (GrowRMSNorm, nn.RMSNorm, dict(elementwise_affine=False)),
]
IDS = [f"{g.__name__}-{kw}" for g, _, kw in CASES]


def randomize(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def twin_of(grow, twin_cls, kw) -> nn.Module:
    twin = twin_cls(grow.features, dtype=F64, **kw)
    twin.load_state_dict(twin_state(grow))
    return twin


def compare(grow, twin, x):
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y, y_ref = grow(x1), twin(x2)
    torch.testing.assert_close(y, y_ref, **TOL)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(active_part(grow, name, getattr(grow, name).grad), p.grad, **TOL)
    assert_outside_zero(grow)


@pytest.mark.parametrize("grow_cls,twin_cls,kw", CASES, ids=IDS)
def test_matches_twin_before_and_after_growth(grow_cls, twin_cls, kw):
    torch.manual_seed(0)
    m = grow_cls(5, capacity=12, dtype=F64, **kw)
    twin = twin_cls(5, dtype=F64, **kw)
    randomize(twin, 1)
    m.load_state_dict(twin.state_dict())  # the twin's checkpoint loads as it is
    compare(m, twin, torch.randn(4, 3, 5, dtype=F64))
    before = storage(m)
    for n in (3, 4):  # 5 -> 8 -> 12 (the capacity)
        m.zero_grad()
        m.grow(n)
        assert_same_storage(m, before)
        if m.weight is not None:  # a new slice: weight 1, bias 0
            assert (m.weight[m.features - n : m.features] == 1).all()
        if getattr(m, "bias", None) is not None:
            assert (m.bias[m.features - n : m.features] == 0).all()
        compare(m, twin_of(m, twin_cls, kw), torch.randn(4, 3, m.features, dtype=F64))
    m.zero_grad()
    m.shrink(6)
    assert_outside_zero(m)
    compare(m, twin_of(m, twin_cls, kw), torch.randn(7, 6, dtype=F64))


def test_twin_signature_and_attributes():
    m = GrowLayerNorm((6,), 1e-4, True, False, capacity=10)
    t = nn.LayerNorm((6,), 1e-4, True, False)
    assert m.normalized_shape == t.normalized_shape == (6,)
    assert (m.eps, m.elementwise_affine, m.bias) == (t.eps, t.elementwise_affine, None)
    assert "capacity=10" in repr(m) and "(6,), eps=0.0001" in repr(m)
    r = GrowRMSNorm(6, capacity=8)
    assert r.eps is None and r.normalized_shape == (6,)
    torch.testing.assert_close(r(torch.ones(2, 6)), nn.RMSNorm(6)(torch.ones(2, 6)))


def test_inactive_weight_is_zero_until_grown_and_reset_restores_twin_init():
    m = GrowLayerNorm(4, capacity=9)
    assert m.weight[:4].eq(1).all() and m.weight[4:].eq(0).all() and m.bias.eq(0).all()
    randomize(m, 3)
    m.reset_parameters()
    assert m.weight[:4].eq(1).all() and m.weight[4:].eq(0).all() and m.bias.eq(0).all()


def test_a_checkpoint_of_another_shape_is_refused_and_changes_nothing():
    m = GrowLayerNorm(5, capacity=8)
    randomize(m, 0)
    m._zero_outside()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: the checkpoint has \(4,\).*\(5,\)"):
        m.load_state_dict(nn.LayerNorm(4).state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict({"weight": torch.ones(5)})
    other = GrowLayerNorm(5, capacity=6)
    with pytest.raises(RuntimeError, match="capacity"):
        m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m.state_dict()["weight"], before["weight"], rtol=0, atol=0)


def test_multi_dimensional_normalized_shape_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="normalized_shape must be an int or a 1-tuple"):
        GrowLayerNorm([2, 5])


@pytest.mark.parametrize("grow_cls", [GrowLayerNorm, GrowRMSNorm])
def test_growth_beyond_capacity_is_refused_and_changes_nothing(grow_cls):
    m = grow_cls(4, capacity=6)
    with pytest.raises(ValueError, match="capacity_features of at least 7"):
        m.grow(3)
    with pytest.raises(ValueError, match="unknown init"):
        m.grow(1, init="split-ish")
    assert m.features == 4 and m.weight[4:].eq(0).all()
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 4\)"):
        m(torch.randn(2, 5))


@pytest.mark.parametrize("grow_cls", [GrowLayerNorm, GrowRMSNorm])
def test_state_dict_round_trip_at_grown_width(grow_cls):
    m = grow_cls(4, capacity=10, dtype=F64)
    m.grow(3)
    randomize(m, 2)
    m._zero_outside()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = grow_cls(4, capacity=10, dtype=F64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.features == 7
    x = torch.randn(3, 7, dtype=F64)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    clone = copy.deepcopy(m)
    assert clone.features == 7 and type(clone.features) is int
    torch.testing.assert_close(clone(x), m(x), rtol=0, atol=0)


def ramp_reference(x, w, b, r, eps, kind):
    """The ramped norm of the module docstring, written out in float64 with explicit loops over rows."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        xi = x[i]
        if kind == "layer":
            mean = sum(r[j] * xi[j] for j in range(len(xi))) / r.sum()
            var = sum(r[j] * (xi[j] - mean) ** 2 for j in range(len(xi))) / r.sum()
            out[i] = r * ((xi - mean) / torch.sqrt(var + eps) * w + b)
        else:
            ms = sum(r[j] * xi[j] ** 2 for j in range(len(xi))) / r.sum()
            out[i] = r * (xi / torch.sqrt(ms + eps) * w)
    return out


@pytest.mark.parametrize("grow_cls,kind", [(GrowLayerNorm, "layer"), (GrowRMSNorm, "rms")])
def test_zero_out_ramp_is_exact_at_growth_continuous_and_ends_at_the_plain_norm(grow_cls, kind):
    torch.manual_seed(0)
    m = grow_cls(6, capacity=10, dtype=F64, eps=1e-5)
    randomize(m, 5)
    m._zero_outside()
    x_old = torch.randn(5, 6, dtype=F64)
    y_old = m(x_old)
    m.grow(3, "zero_out", ramp_steps=4)
    assert m.ramping
    x = torch.cat([x_old, 10 * torch.randn(5, 3, dtype=F64)], dim=1)  # whatever the new features hold
    y = m(x)
    # Exact at the growth: the old outputs as before, the new ones zero (1e-12: same values, other kernels).
    torch.testing.assert_close(y[:, :6], y_old, **TOL)
    assert y[:, 6:].abs().max() == 0
    w = m.weight[:9].detach()
    b = m.bias[:9].detach() if getattr(m, "bias", None) is not None else torch.zeros(9, dtype=F64)
    for step in range(1, 5):
        ramp_step(m)
        r = torch.cat([torch.ones(6, dtype=F64), torch.full((3,), min(step / 4, 1.0), dtype=F64)])
        torch.testing.assert_close(m(x), ramp_reference(x, w, b, r, 1e-5, kind), **TOL)
    assert not m.ramping
    twin = (nn.LayerNorm if kind == "layer" else nn.RMSNorm)(9, eps=1e-5, dtype=F64)
    twin.load_state_dict(twin_state(m))
    torch.testing.assert_close(m(x), twin(x), **TOL)


@pytest.mark.parametrize("grow_cls", [GrowLayerNorm, GrowRMSNorm])
def test_a_norm_whose_every_active_feature_ramps_from_zero_outputs_zeros(grow_cls):
    """A shrink may keep only features still entering at factor 0 (keep="norm" after a zero_out
    growth): every feature is then weighted 0, so nothing passes: zeros, not 0/0."""
    from growdense import GrowLinear, Wiring

    torch.manual_seed(0)
    m = grow_cls(4, capacity=8, dtype=F64, eps=1e-5)
    randomize(m, 4)
    m._zero_outside()
    writer = GrowLinear(3, 4, capacity_out=8, dtype=F64)
    reader = GrowLinear(4, 3, capacity_in=8, dtype=F64)
    wiring = Wiring()
    wiring.add_width("stream", [(writer, "out"), m, (reader, "in")])
    wiring.grow("stream", 2, init="zero_out", ramp_steps=3)
    wiring.shrink("stream", 2, keep=[4, 5])  # the two new features only
    assert m.ramping and m._ramp[:2].abs().max() == 0
    y = m(torch.randn(3, 2, dtype=F64))
    assert torch.equal(y, torch.zeros_like(y))
    ramp_step(m)  # then they enter as any ramp does
    x = torch.randn(3, 2, dtype=F64)
    r = torch.full((2,), 1 / 3, dtype=F64)
    w = m.weight[:2].detach()
    b = m.bias[:2].detach() if getattr(m, "bias", None) is not None else torch.zeros(2, dtype=F64)
    torch.testing.assert_close(m(x), ramp_reference(x, w, b, r, 1e-5, "layer" if grow_cls is GrowLayerNorm else "rms"),
                               **TOL)


def test_a_ramp_survives_a_checkpoint():
    m = GrowLayerNorm(4, capacity=8, dtype=F64)
    m.grow(2, "zero_out", ramp_steps=3)
    m.ramp_step()
    fresh = GrowLayerNorm(4, capacity=8, dtype=F64)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(3, 6, dtype=F64)
    assert fresh.ramping
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    for mod in (m, fresh):
        mod.ramp_step()
        mod.ramp_step()
    assert not fresh.ramping and not m.ramping


def _module_db_samples(twin_cls):
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db

    info = next(i for i in module_db if i.module_cls is twin_cls)
    return info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=True)


@pytest.mark.parametrize("grow_cls,twin_cls", [(GrowLayerNorm, nn.LayerNorm), (GrowRMSNorm, nn.RMSNorm)])
def test_drop_in_over_torch_module_db_samples(grow_cls, twin_cls):
    ran = 0
    for sample in _module_db_samples(twin_cls):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        shape = args[0] if args else kwargs["normalized_shape"]
        if not isinstance(shape, int) and len(shape) != 1:
            with pytest.raises(ValueError, match="1-tuple"):
                grow_cls(*args, **kwargs)
            continue
        torch.manual_seed(0)
        twin = twin_cls(*args, **kwargs, dtype=F64)
        randomize(twin, 7)
        m = grow_cls(*args, **kwargs, dtype=F64, capacity=int(shape if isinstance(shape, int) else shape[0]) + 3)
        m.load_state_dict(twin.state_dict())
        (x,) = sample.forward_input.args
        compare(m, twin, x.detach())
        ran += 1
    assert ran >= 3


@pytest.mark.parametrize("grow_cls", [GrowLayerNorm, GrowRMSNorm])
def test_compile_across_eight_widths_uses_at_most_two_graphs(grow_cls):
    torch._dynamo.reset()
    m = grow_cls(4, capacity=32)
    eager = copy.deepcopy(m)
    backend = CountingBackend()
    compiled = torch.compile(m, backend=backend)
    for k in range(8):
        if k:
            m.grow(4)
            eager.grow(4)
        x = torch.randn(3, m.features, requires_grad=True)
        y = compiled(x)
        y_ref = eager(x)
        # float32, the same ops traced or eager: agree to rounding (sums of <= 32 terms).
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert_outside_zero(m)
    assert m.features == 32
    assert 1 <= backend.graphs <= 2, f"{backend.graphs} graphs for 8 widths"


@pytest.mark.parametrize("grow_cls", [GrowLayerNorm, GrowRMSNorm])
def test_autocast_cpu_bfloat16(grow_cls):
    m = grow_cls(16, capacity=24)
    randomize(m, 0)
    m._zero_outside()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert torch.isfinite(y).all()
    # bf16 keeps 8 bits of mantissa: about 1e-2 relative to the outputs (O(1) here).
    torch.testing.assert_close(y.float(), m(x), rtol=3e-2, atol=3e-2)


def test_growth_spec_declares_the_rider_tensors():
    pytest.importorskip("growdense.protocol")
    from growdense import protocol

    m = GrowLayerNorm(4, capacity=8)
    spec = m.growth_spec()
    assert spec.widths == ("features",) and spec.role("features") == protocol.RIDER
    # weight and bias, then the ramp's factor and rate (they move with their features)
    assert [(t.name, t.fill) for t in spec.tensors] == [("weight", 1.0), ("bias", 0.0), ("_ramp", 1.0), ("_ramp_rate", 0.0)]
    assert protocol.capacity(m, "features") == 8 and m.active_width("features") == 4
