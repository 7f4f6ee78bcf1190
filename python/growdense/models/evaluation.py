"""Probabilistic evaluation of a VAE: importance-sampled log-likelihood and estimator variances.

Everything here is built on the log importance weight ``log w = log p(x, z) - log q(z | x)``
for ``z ~ q(z | x)``. Its mean is the ELBO; ``log (1/K) sum_k w_k`` is the IWAE bound; and
its variance over z is zero exactly when q(z | x) is the true posterior p(z | x) (then
``log w = log p(x)`` for every z). A model needs ``encode(x) -> (mu, logvar)`` of a diagonal
Gaussian q, and either ``log_likelihood(x, z) -> log p(x | z)`` or the Bernoulli decoder
``decode_logits(z)`` of :class:`~growdense.models.VAE`; the prior is N(0, I).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from .vae import VAE, bernoulli_nll, gaussian_kl

__all__ = ["log_importance_weights", "iwae_bound", "elbo_estimates", "elbo_variance", "log_weight_variance",
           "estimator_variance", "iwae_gap"]

_LOG_2PI = math.log(2.0 * math.pi)


def _log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def _log_likelihood(model, x: Tensor, z: Tensor) -> Tensor:
    """``log p(x | z)`` for latents z of shape (k, B, J): shape (k, B)."""
    if hasattr(model, "log_likelihood"):
        return model.log_likelihood(x, z)
    k, B, J = z.shape
    logits = model.decode_logits(z.reshape(k * B, J)).reshape(k, B, -1)
    return -bernoulli_nll(logits, x)


@torch.no_grad()
def log_importance_weights(
    model, x: Tensor, samples: int, generator: Optional[torch.Generator] = None, max_rows: int = 32768
) -> Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``samples`` draws z_k ~ q(z | x); shape (K, B).

    The decoder runs on chunks of at most ``max_rows`` latent rows.
    """
    mu, logvar = model.encode(x)
    B = x.shape[0]
    chunk = max(1, max_rows // max(B, 1))
    std = torch.exp(0.5 * logvar)
    out = []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        eps = torch.randn((k, *mu.shape), device=mu.device, dtype=mu.dtype, generator=generator)
        z = mu + std * eps  # (k, B, J), as VAE.sample_latents draws it
        log_pz = _log_normal(z, torch.zeros_like(mu), torch.zeros_like(logvar))
        log_qz = _log_normal(z, mu, logvar)
        out.append(_log_likelihood(model, x, z) + log_pz - log_qz)
    return torch.cat(out, 0)


@torch.no_grad()
def iwae_bound(
    model,
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


def _in_eval(fn):
    """Run ``fn(model, ...)`` with the model in eval mode, restoring its mode after."""

    def wrapper(model, *args, **kwargs):
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            if hasattr(model, "train"):
                model.train(was_training)

    wrapper.__doc__, wrapper.__name__, wrapper.__wrapped__ = fn.__doc__, fn.__name__, fn
    return wrapper


@_in_eval
@torch.no_grad()
def log_weight_variance(
    model, x: Tensor, samples: int = 100, *, batch_size: int = 64, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Per-image variance of one log importance weight ``log w`` over z ~ q(z | x); shape (N,).

    Estimated (unbiased) from ``samples`` draws per image. Zero, up to rounding, when q(z | x)
    is the exact posterior; the further q is from it, the larger.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate a variance, got {samples}")
    out = [log_importance_weights(model, x[s : s + batch_size], samples, generator).var(0, unbiased=True)
           for s in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


@_in_eval
@torch.no_grad()
def estimator_variance(
    model,
    x: Tensor,
    counts: Iterable[int] = (1, 2, 5, 10, 20, 50, 100),
    repeats: int = 20,
    *,
    estimator: str = "elbo",
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
) -> list[dict[str, float]]:
    """Variance over independent draws of a log-weight estimator of ``log p(x)``, for each sample count.

    ``estimator="elbo"``: the L-sample mean of ``log w`` (the study's Eq. 3.3; its variance is
    ``Var(log w) / L``); ``"iwae"``: the K-sample bound ``log (1/K) sum_k w_k``. Both have zero
    variance for every count when q(z | x) is the exact posterior. For each count n: ``var``
    is the per-image variance over ``repeats`` draws averaged over the images, ``std`` its
    square root, ``mean`` the average estimate (nats per image).
    """
    if estimator not in ("elbo", "iwae"):
        raise ValueError(f"estimator must be 'elbo' or 'iwae', got {estimator!r}")
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to estimate a variance, got {repeats}")
    key = "L" if estimator == "elbo" else "K"
    rows = []
    for n in counts:
        n = int(n)
        means, variances = [], []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            lw = log_importance_weights(model, xb, n * repeats, generator).reshape(repeats, n, xb.shape[0])
            est = lw.mean(1) if estimator == "elbo" else torch.logsumexp(lw, 1) - math.log(n)
            means.append(est.mean(0))
            variances.append(est.var(0, unbiased=True))
        var = torch.cat(variances).mean().item()
        rows.append({key: n, "mean": torch.cat(means).mean().item(), "var": var, "std": math.sqrt(max(var, 0.0))})
    return rows


@_in_eval
@torch.no_grad()
def iwae_gap(
    model, x: Tensor, samples: int = 100, *, batch_size: int = 64, generator: Optional[torch.Generator] = None
) -> dict[str, float]:
    """The ELBO, the IWAE bound and their gap from the same ``samples`` log weights per image.

    Returns means over the images (nats per image): ``elbo`` (mean of ``log w``), ``iwae``
    (``log (1/K) sum_k w_k`` with K = ``samples``), ``gap`` = iwae - elbo (>= 0; it shrinks
    to 0 as q approaches the posterior), and ``logw_var`` (the per-image variance of ``log w``).
    """
    elbo, iwae, var = [], [], []
    for s in range(0, x.shape[0], batch_size):
        lw = log_importance_weights(model, x[s : s + batch_size], samples, generator)
        elbo.append(lw.mean(0))
        iwae.append(torch.logsumexp(lw, 0) - math.log(samples))
        var.append(lw.var(0, unbiased=True) if samples > 1 else torch.full_like(lw[0], float("nan")))
    e, i, v = torch.cat(elbo).mean().item(), torch.cat(iwae).mean().item(), torch.cat(var).mean().item()
    return {"samples": int(samples), "images": int(x.shape[0]), "elbo": e, "iwae": i, "gap": i - e, "logw_var": v}
