"""Second reliability round: parametrized layers, capacity messages, growable()'s corner cases,
and checkpoint temporaries."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from growdense import GrowLinear, growable
from growdense.growable import NotGrowableError


def _state(layer: nn.Module) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- defect 1: parametrizations are refused before anything changes ---------------------------
class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("register", [
    lambda layer: parametrize.register_parametrization(layer, "weight", _Double()),
    lambda layer: parametrize.register_parametrization(layer, "bias", _Double()),
    lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
    lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
    lambda layer: torch.nn.utils.spectral_norm(layer),  # the old hook-based one
], ids=["parametrize-weight", "parametrize-bias", "weight_norm", "spectral_norm", "old-spectral_norm"])
def test_parametrization_is_refused_at_registration(register):
    torch.manual_seed(0)
    layer = GrowLinear(4, 3, capacity_out=8)
    before = _state(layer)
    with pytest.raises(RuntimeError, match="does not support parametrizations"):
        register(layer)
    assert type(layer) is GrowLinear and not parametrize.is_parametrized(layer)
    assert _same(before, _state(layer)) and set(layer._parameters) == {"weight", "bias"}
    layer.grow_out(2, generator=torch.Generator().manual_seed(1))  # still an ordinary, growable layer
    x = torch.randn(5, 4)
    ref = x.double() @ layer.weight[:5, :4].double().T + layer.bias[:5].double()  # float64 reference
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-6, atol=1e-6)  # float32 rounding only
    assert layer.weight[3:5].abs().sum() > 0  # the new neurons have their He rows


def test_old_weight_norm_is_refused_at_the_first_resize():
    # torch.nn.utils.weight_norm removes `weight` from the module's Parameters directly (no
    # delattr), so it is caught at the first grow or shrink, before anything changes.
    torch.manual_seed(0)
    layer = GrowLinear(4, 3, capacity_out=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation warning
        torch.nn.utils.weight_norm(layer)
    before = _state(layer)
    for resize in (lambda: layer.grow_out(2), lambda: layer.grow_in(0), lambda: layer.shrink_out(2)):
        with pytest.raises(RuntimeError, match="does not support parametrizations"):
            resize()
        assert (layer.in_features, layer.out_features) == (4, 3) and _same(before, _state(layer))


# ---- defect 8: capacity messages in plain integers --------------------------------------------
def test_capacity_errors_speak_in_plain_integers():
    layer = GrowLinear(4, 3, capacity_out=8)
    messages = []
    for call in (lambda: layer.grow_out(10), lambda: layer.grow_in(1), lambda: layer.shrink_out(5),
                 lambda: layer.shrink_in(9)):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    assert "from 3 to 13: capacity is 8" in messages[0] and "at least 13" in messages[0]
    assert "from 4 to 5: capacity is 4" in messages[1]
    for message in messages:
        assert "DynamicInt" not in message and "_Width" not in message, message
        assert not re.search(r"[A-Za-z_]+\(\d+\)", message), message


# ---- defect 7: growable() and lazy layers, nn.Linear subclasses, models with nothing to grow ---
class _Scaled(nn.Linear):  # its own forward: not what a GrowLinear computes
    def forward(self, x):
        return 3 * super().forward(x)


class _Tagged(nn.Linear):  # nn.Linear's forward: converted
    pass


def _mlp(first: nn.Module, second: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(first, nn.ReLU(), second)


def test_uninitialised_lazy_producer_gets_the_lazy_message():
    model = _mlp(nn.LazyLinear(8), nn.Linear(8, 3))
    with pytest.raises(NotGrowableError, match="lazy layer that has not been initialised") as info:
        growable(model)
    assert list(info.value.problems) == ["0"]
    assert isinstance(model[0], nn.LazyLinear) and isinstance(model[1], nn.ReLU)  # unchanged
    model(torch.randn(2, 5))  # once initialised it converts
    wiring = growable(model)
    assert wiring.widths() == {"0": 8} and isinstance(model[0], GrowLinear)


def test_linear_subclass_with_linears_forward_is_converted():
    model = _mlp(_Tagged(5, 8), _Tagged(8, 3))
    x = torch.randn(4, 5)
    with torch.no_grad():
        expected = model(x).double()
        ref = torch.relu(x.double() @ model[0].weight.double().T + model[0].bias.double())
        ref = ref @ model[2].weight.double().T + model[2].bias.double()  # float64 reference
    wiring = growable(model)
    assert wiring.widths() == {"0": 8} and isinstance(model[0], GrowLinear) and isinstance(model[2], GrowLinear)
    with torch.no_grad():
        got = model(x).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same function, bit for bit
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # float32 rounding only


@pytest.mark.parametrize("first, second, culprit", [
    (lambda: _Scaled(5, 8), lambda: nn.Linear(8, 3), "0"),
    (lambda: nn.Linear(5, 8), lambda: _Scaled(8, 3), "2"),
])
def test_linear_subclass_with_its_own_forward_is_refused_by_name(first, second, culprit):
    model = _mlp(first(), second())
    before = _state(model)
    with pytest.raises(NotGrowableError, match="_Scaled, an nn.Linear subclass with its own forward") as info:
        growable(model)
    assert list(info.value.problems) == [culprit]
    assert _same(before, _state(model)) and not any(isinstance(m, GrowLinear) for m in model.modules())


def test_linear_subclass_holding_more_is_refused():
    class WithScale(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            self.scale = nn.Parameter(torch.ones(()))

    with pytest.raises(NotGrowableError, match=r"holding more than weight and bias \(scale\)"):
        growable(_mlp(WithScale(5, 8), nn.Linear(8, 3)))


@pytest.mark.parametrize("model, why", [
    (lambda: nn.Sequential(nn.Linear(5, 3)), "output layer"),
    (lambda: nn.Sequential(nn.ReLU()), "no nn.Linear"),
])
def test_nothing_growable_is_an_error_unless_allowed(model, why):
    with pytest.raises(NotGrowableError, match="no hidden width") as info:
        growable(model())
    assert why in str(info.value) and "allow_empty=True" in str(info.value)
    wiring = growable(model(), allow_empty=True)
    assert wiring.names() == []


# ---- a kill during save_checkpoint: the next save removes the stray temporary -----------------
_KILLED_SAVE = """
import os, sys, torch
from torch import nn
from growdense.checkpoint import save_checkpoint
os.replace = lambda *a: os._exit(9)  # dies between writing the temporary and renaming it
save_checkpoint(sys.argv[1], nn.Linear(3, 2))
"""


def test_next_save_removes_the_temporary_of_a_killed_save(tmp_path):
    import subprocess
    import sys

    from growdense.checkpoint import load_checkpoint, save_checkpoint

    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "run.pt"
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], env=os.environ.copy(), timeout=120)
    assert proc.returncode == 9
    (stray,) = list(tmp_path.glob(".run.pt.*.tmp"))
    old = stray.stat().st_mtime - 3600
    os.utime(stray, (old, old))  # the next save comes later
    busy = tmp_path / ".run.pt.busy.tmp"  # a save in progress elsewhere: locked, kept
    busy.write_bytes(b"writing")
    os.utime(busy, (old, old))
    fresh = tmp_path / ".run.pt.fresh.tmp"  # just created, not locked yet: kept
    fresh.write_bytes(b"")
    other = tmp_path / ".other.pt.x.tmp"  # another checkpoint's: not ours to judge
    other.write_bytes(b"")
    os.utime(other, (old, old))
    with open(busy, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        save_checkpoint(path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run.pt", ".run.pt.busy.tmp", ".run.pt.fresh.tmp", ".other.pt.x.tmp"])
    loaded = nn.Linear(3, 2)
    load_checkpoint(path, loaded)
    assert torch.equal(loaded.weight, model.weight)
