"""Probabilistic evaluation of a VAE: importance-sampled log-likelihood and ELBO variance."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from .vae import VAE, bernoulli_nll, gaussian_kl

__all__ = ["log_importance_weights", "iwae_bound", "elbo_estimates", "elbo_variance"]

_LOG_2PI = math.log(2.0 * math.pi)


def _log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


@torch.no_grad()
def log_importance_weights(
    model: VAE, x: Tensor, samples: int, generator: Optional[torch.Generator] = None, max_rows: int = 32768
) -> Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``samples`` draws z_k ~ q(z | x); shape (K, B).

    The decoder runs on chunks of at most ``max_rows`` latent rows.
    """
    mu, logvar = model.encode(x)
    B = x.shape[0]
    chunk = max(1, max_rows // max(B, 1))
    out = []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        z = model.sample_latents(mu, logvar, k, generator)  # (k, B, J)
        logits = model.decode_logits(z.reshape(k * B, -1)).reshape(k, B, -1)
        log_px_z = -bernoulli_nll(logits, x)
        log_pz = _log_normal(z, torch.zeros_like(mu), torch.zeros_like(logvar))
        log_qz = _log_normal(z, mu, logvar)
        out.append(log_px_z + log_pz - log_qz)
    return torch.cat(out, 0)


@torch.no_grad()
def iwae_bound(
    model: VAE,
    x: Tensor,
    samples: int = 1000,
    *,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-image importance-weighted bound ``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` (nats).

    With K = ``samples`` importance samples from the encoder. A lower bound on
    ``log p(x)`` whose expectation increases with K towards ``log p(x)`` (Burda et al.,
    2016); K = 1 is a single-sample ELBO. Returns shape (N,).
    """
    was_training = model.training
    model.eval()
    values = []
    for start in range(0, x.shape[0], batch_size):
        lw = log_importance_weights(model, x[start : start + batch_size], samples, generator)
        values.append(torch.logsumexp(lw, 0) - math.log(samples))
    model.train(was_training)
    return torch.cat(values)


@torch.no_grad()
def elbo_estimates(
    model: VAE,
    x: Tensor,
    samples: int,
    repeats: int = 1,
    *,
    batch_size: int = 256,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``repeats`` independent draws of the study's L-sample ELBO estimator (Eq. 2.16) per image.

    Returns shape (repeats, N): each entry averages ``samples`` reconstruction terms and
    adds the analytic KL, in nats (the negative of the training loss).
    """
    out = torch.empty(repeats, x.shape[0], device=x.device, dtype=x.dtype)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        mu, logvar = model.encode(xb)
        kl = gaussian_kl(mu, logvar)
        for r in range(repeats):
            z = model.sample_latents(mu, logvar, samples, generator)
            L, B, J = z.shape
            logits = model.decode_logits(z.reshape(L * B, J)).reshape(L, B, -1)
            out[r, start : start + B] = -bernoulli_nll(logits, xb).mean(0) - kl
    return out


@torch.no_grad()
def elbo_variance(
    model: VAE,
    x: Tensor,
    sample_counts: Iterable[int] = (1, 2, 5, 10, 20, 50, 100),
    repeats: int = 20,
    *,
    generator: Optional[torch.Generator] = None,
) -> list[dict[str, float]]:
    """Variance of the L-sample ELBO estimator across independent draws, for each L.

    For each L: ``var`` is the per-image variance over ``repeats`` draws, averaged over
    the images of ``x``; ``mean`` the average estimate (nats per image).
    """
    was_training = model.training
    model.eval()
    rows = []
    for L in sample_counts:
        est = elbo_estimates(model, x, int(L), repeats, generator=generator)
        var = est.var(0, unbiased=True)
        rows.append({"L": int(L), "mean": est.mean().item(), "var": var.mean().item(), "std": var.mean().sqrt().item()})
    model.train(was_training)
    return rows
