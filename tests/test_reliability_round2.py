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
