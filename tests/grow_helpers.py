"""Small models and independent references shared by the growth tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growdense import GrowLinear, Wiring


class TinyEncoder(nn.Module):
    """The study's encoder in miniature: in -> h1 -> h2 -> (mu, logvar) heads.

    h2 has two consumers (the heads), like the VAE's mean and log-variance layers.
    """

    def __init__(self, d_in=6, h1=5, h2=4, latent=3, cap1=12, cap2=10, dtype=torch.float32):
        super().__init__()
        kw = {"dtype": dtype}
        self.enc1 = GrowLinear(d_in, h1, capacity_out=cap1, activation="relu", **kw)
        self.enc2 = GrowLinear(h1, h2, capacity_in=cap1, capacity_out=cap2, activation="relu", **kw)
        self.mu = GrowLinear(h2, latent, capacity_in=cap2, **kw)
        self.logvar = GrowLinear(h2, latent, capacity_in=cap2, **kw)

    def forward(self, x):
        h = self.enc2(self.enc1(x))
        return torch.cat([self.mu(h), self.logvar(h)], dim=-1)

    def wiring(self, optimizer=None, **kwargs) -> Wiring:
        wiring = Wiring(optimizer, **kwargs)
        wiring.add("h1", self.enc1, [self.enc2])
        wiring.add("h2", self.enc2, [self.mu, self.logvar])
        return wiring


def reference_forward(model: TinyEncoder, x: torch.Tensor) -> torch.Tensor:
    """The same network computed with plain ``F.linear`` on the active blocks, read by hand."""

    def lin(layer, v, relu):
        w = layer.weight[: layer.out_features, : layer.in_features]
        b = layer.bias[: layer.out_features]
        y = F.linear(v, w, b)
        return torch.relu(y) if relu else y

    h = lin(model.enc2, lin(model.enc1, x, True), True)
    return torch.cat([lin(model.mu, h, False), lin(model.logvar, h, False)], dim=-1)


def snapshot(model: nn.Module, optimizer=None) -> dict:
    """Deep copy of parameters, gradients, widths and optimizer state, for "nothing changed" checks."""
    snap = {}
    for name, p in model.named_parameters():
        snap[name] = p.detach().clone()
        snap[name + ".grad"] = None if p.grad is None else p.grad.clone()
    for name, m in model.named_modules():
        if isinstance(m, GrowLinear):
            snap[name + ".widths"] = (m.in_features, m.out_features)
    if optimizer is not None:
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                snap[f"state{i}.{key}"] = value.clone() if isinstance(value, torch.Tensor) else value
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert x == y, key


def train_step(model, optimizer, x, target):
    optimizer.zero_grad()
    loss = F.mse_loss(model(x), target)
    loss.backward()
    optimizer.step()
    return loss.detach()
