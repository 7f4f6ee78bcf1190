"""The study's growing VAE the reallocating way, in plain PyTorch (the benchmarks' baseline).

Same architecture as ``growdense.models.VAE``: encoder ``784 -> h1 -> h2`` (ReLU), mean
and log-variance heads ``h2 -> 20``, decoder ``20 -> 128 -> 256 -> 784`` (ReLU, logits
out), all ``nn.Linear``. Growing a hidden width by n, as the study did: every layer it
touches is replaced by a new, larger ``nn.Linear`` (allocated and initialised by its
constructor), the old weights are copied into its first rows/columns, the new rows and
columns get He-normal values (fan_in = the new layer's in_features) and the new biases
zero; then the caller rebuilds the optimizer (Adam's moments are lost).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def negative_elbo(x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-image negative ELBO: BCE (from logits) summed over pixels, mean over the L
    samples, plus the analytic KL to N(0, I). ``logits`` (L, B, D), ``x`` (B, D)."""
    rec = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
    return rec + kl


@torch.no_grad()
def expanded(old: nn.Linear, in_features: int, out_features: int, generator: Optional[torch.Generator] = None) -> nn.Linear:
    """A new ``nn.Linear(in_features, out_features)`` holding ``old`` in its first
    rows/columns, He-normal values in the new ones (fan_in = ``in_features``), new bias zero."""
    w = old.weight
    new = nn.Linear(in_features, out_features, device=w.device, dtype=w.dtype)
    o, i = old.out_features, old.in_features
    std = math.sqrt(2.0 / in_features)
    new.weight[:o, :i].copy_(w)
    if in_features > i:
        new.weight[:o, i:].normal_(0.0, std, generator=generator)
    if out_features > o:
        new.weight[o:].normal_(0.0, std, generator=generator)
    new.bias[:o].copy_(old.bias)
    new.bias[o:].zero_()
    return new


class ReallocVAE(nn.Module):
    """The study's VAE on ``nn.Linear`` layers that grow by reallocation."""

    def __init__(self, h1: int, h2: int, *, latent: int = 20, decoder=(128, 256), image_size: int = 784,
                 device=None, dtype=None) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.enc1 = nn.Linear(image_size, h1, **f)
        self.enc2 = nn.Linear(h1, h2, **f)
        self.mu_head = nn.Linear(h2, latent, **f)
        self.logvar_head = nn.Linear(h2, latent, **f)
        self.dec1 = nn.Linear(latent, decoder[0], **f)
        self.dec2 = nn.Linear(decoder[0], decoder[1], **f)
        self.dec3 = nn.Linear(decoder[1], image_size, **f)

    def widths(self) -> tuple[int, int]:
        return self.enc1.out_features, self.enc2.out_features

    def grow(self, n1: int, n2: int, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n1`` neurons to h1 and ``n2`` to h2 by replacing the layers they touch."""
        h1, h2 = self.widths()
        self.enc1 = expanded(self.enc1, self.enc1.in_features, h1 + n1, generator)
        self.enc2 = expanded(self.enc2, h1 + n1, h2 + n2, generator)
        self.mu_head = expanded(self.mu_head, h2 + n2, self.mu_head.out_features, generator)
        self.logvar_head = expanded(self.logvar_head, h2 + n2, self.logvar_head.out_features, generator)

    def forward(self, x: Tensor, samples: int = 1, generator: Optional[torch.Generator] = None):
        h = F.relu(self.enc2(F.relu(self.enc1(x))))
        mu, logvar = self.mu_head(h), self.logvar_head(h)
        eps = torch.randn((samples, *mu.shape), device=mu.device, dtype=mu.dtype, generator=generator)
        z = mu + torch.exp(0.5 * logvar) * eps
        L, B, J = z.shape
        d = F.relu(self.dec2(F.relu(self.dec1(z.reshape(L * B, J)))))
        return self.dec3(d).reshape(L, B, -1), mu, logvar
