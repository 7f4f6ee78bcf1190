"""The study's variational auto-encoder on :class:`~growdense.GrowLinear` layers.

Encoder ``784 -> h1 -> h2`` (ReLU) with mean and log-variance heads ``h2 -> 20``;
decoder ``20 -> 128 -> 256 -> 784`` (ReLU, then a sigmoid output, applied inside the
loss as logits). The two encoder hidden layers are allocated at their capacity (by
default the study's target 256/128) and change width in place through ``model.wiring``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..layers import GrowLinear
from ..wiring import Wiring

__all__ = ["VAE", "negative_elbo", "gaussian_kl", "bernoulli_nll"]


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """``-log p(x | z)`` of a Bernoulli decoder, summed over the last dimension.

    Equals the binary cross-entropy of ``sigmoid(logits)`` against ``x``, computed from
    the logits for stability. Shape: ``logits.shape[:-1]``.
    """
    x = x.expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic ``KL(N(mu, exp(logvar)) || N(0, I))`` summed over the last dimension."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def negative_elbo(x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-image negative ELBO estimate in nats (the study's loss, Eq. 2.16-2.17).

    ``x``: (B, D) targets in [0, 1]; ``logits``: (L, B, D) decoder logits for L latent
    samples per image; ``mu``, ``logvar``: (B, J). Returns (B,): the mean over the L
    samples of the BCE summed over pixels, plus the analytic KL to N(0, I).

    Computed by the fused op :func:`growdense.ops.negative_elbo` (one pass over the logits
    forward and one backward, float32 accumulation, float32 or bfloat16 logits): the same
    quantity as ``bernoulli_nll(logits, x).mean(0) + gaussian_kl(mu, logvar)``. ``x`` may
    be any shape that broadcasts to (B, D).
    """
    if logits.dim() != 3:
        raise ValueError(
            f"negative_elbo needs logits of shape (L, B, D) (L latent samples per image), got "
            f"{tuple(logits.shape)}; for a single sample pass logits.unsqueeze(0)"
        )
    if x.shape != logits.shape[1:]:
        x = x.expand(logits.shape[1:])
    return ops.negative_elbo(logits, x, mu, logvar)


class VAE(nn.Module):
    """The study's MNIST VAE with growable encoder hidden layers ``h1`` and ``h2``.

    Args:
        h1, h2: initial active widths of the two encoder hidden layers.
        capacity: allocated widths ``(capacity_h1, capacity_h2)`` (default: the study's
            target structure 256/128); ``h1``/``h2`` can grow up to these in place.
        latent: latent dimension J.
        decoder: hidden widths of the (fixed) decoder.
        image_size: number of pixels D.
        device, dtype: where to allocate the parameters.
    """

    def __init__(
        self,
        h1: int = 256,
        h2: int = 128,
        *,
        capacity: Sequence[int] = (256, 128),
        latent: int = 20,
        decoder: Sequence[int] = (128, 256),
        image_size: int = 784,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        c1, c2 = int(capacity[0]), int(capacity[1])
        if not (1 <= h1 <= c1 and 1 <= h2 <= c2):
            raise ValueError(f"widths {h1}/{h2} must be between 1 and the capacity {c1}/{c2}")
        f = {"device": device, "dtype": dtype}
        self.latent = latent
        self.image_size = image_size
        self.enc1 = GrowLinear(image_size, h1, capacity_out=c1, activation="relu", **f)
        self.enc2 = GrowLinear(h1, h2, capacity_in=c1, capacity_out=c2, activation="relu", **f)
        self.mu_head = GrowLinear(h2, latent, capacity_in=c2, **f)
        self.logvar_head = GrowLinear(h2, latent, capacity_in=c2, **f)
        d1, d2 = int(decoder[0]), int(decoder[1])
        self.dec1 = GrowLinear(latent, d1, activation="relu", **f)
        self.dec2 = GrowLinear(d1, d2, activation="relu", **f)
        self.dec3 = GrowLinear(d2, image_size, **f)
        self._wiring = None

    # ---- growth ----------------------------------------------------------------
    @property
    def wiring(self) -> Wiring:
        """The ``Wiring`` of the growable layers: ``"h1"`` (enc1 -> enc2) and ``"h2"``
        (enc2 -> mean and log-variance heads). Built on first use."""
        if self._wiring is None:
            w = Wiring()
            w.add("h1", producer=self.enc1, consumers=[self.enc2])
            w.add("h2", producer=self.enc2, consumers=[self.mu_head, self.logvar_head])
            # a plain attribute, not a submodule: keep it out of state_dict/parameters
            object.__setattr__(self, "_wiring", w)
        return self._wiring

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let growth and shrinking keep ``optimizer``'s state consistent (Adam moments)."""
        self.wiring.optimizer = optimizer

    def widths(self) -> tuple[int, int]:
        """The active widths ``(h1, h2)``."""
        return self.enc1.out_features, self.enc2.out_features

    def num_parameters(self) -> int:
        """Number of active parameters (the active blocks of weights and biases)."""
        total = 0
        for layer in self.modules():
            if isinstance(layer, GrowLinear):
                total += layer.in_features * layer.out_features
                total += layer.out_features if layer.bias is not None else 0
        return total

    # ---- the model ---------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of q(z | x) for images ``x`` of shape (B, D)."""
        h = self.enc2(self.enc1(x))
        return self.mu_head(h), self.logvar_head(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Decoder logits (..., D) for latents z (..., J); ``sigmoid`` gives the image."""
        return self.dec3(self.dec2(self.dec1(z)))

    def sample_latents(
        self, mu: Tensor, logvar: Tensor, samples: int, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Reparameterised samples ``z = mu + sigma * eps``, shape (samples, B, J)."""
        eps = self._noise(samples, mu.shape[0], mu.device, mu.dtype, generator)
        return mu + torch.exp(0.5 * logvar) * eps

    def _noise(
        self, samples: int, batch, device: torch.device, dtype: torch.dtype, generator: Optional[torch.Generator]
    ) -> Tensor:
        """``eps ~ N(0, I)`` of shape (samples, batch, latent).

        The latent width is the plain int ``self.latent``, not the heads' active width,
        which ``torch.compile`` traces as a symbolic size that ``torch.randn`` with a
        generator cannot take. Without a generator the draw is ``normal_`` on a new
        tensor (the same numbers as ``torch.randn`` from the default generator), which
        traces with symbolic sizes too (a batch size made dynamic by a recompile).
        """
        shape = (int(samples), batch, self.latent)
        if generator is None:
            return torch.empty(shape, device=device, dtype=dtype).normal_()
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)

    def _noise_for(self, x: Tensor, samples: int, generator: Optional[torch.Generator]) -> Tensor:
        """The noise :meth:`sample_latents` would draw for the encoding of ``x``, drawn before it.

        The encoder draws no random numbers, so drawing first gives the same stream. Under
        ``torch.compile`` a generator is run outside the graph: drawn here, first, it
        splits the trace before the model and leaves the whole model (and its loss) one
        graph. Its dtype is the heads' output dtype (the autocast dtype under autocast).
        """
        w = self.mu_head.weight
        dtype = w.dtype
        if dtype != torch.float64 and torch.is_autocast_enabled(w.device.type):
            dtype = torch.get_autocast_dtype(w.device.type)
        return self._noise(samples, x.shape[0] if x.dim() > 1 else 1, w.device, dtype, generator)

    def _run(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        L, B, J = z.shape
        logits = self.decode_logits(z.reshape(L * B, J)).reshape(L, B, -1)
        return logits, mu, logvar

    def forward(
        self, x: Tensor, samples: int = 1, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (L, B, D), mu (B, J), logvar (B, J))`` for L = ``samples``."""
        return self._run(x, self._noise_for(x, samples, generator))

    def loss(self, x: Tensor, samples: int = 20, generator: Optional[torch.Generator] = None) -> Tensor:
        """The study's training loss: batch mean of the per-image negative ELBO (nats)."""
        eps = self._noise_for(x, samples, generator)
        return negative_elbo(x, *self._run(x, eps)).mean()

    # ---- images --------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Images decoded from the posterior means (as the study's Figure 5)."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode_logits(mu))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` images (mean of p(x | z)) for z drawn from the prior N(0, I)."""
        w = self.dec1.weight
        z = torch.randn((n, self.latent), device=w.device, dtype=w.dtype, generator=generator)
        return torch.sigmoid(self.decode_logits(z))
