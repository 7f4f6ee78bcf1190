"""Evaluating the trained models of a reproduction: IWAE bounds, and the variance of the
log-weight estimators (and of the study's analytic-KL ELBO estimator) against L and K."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..models.evaluation import elbo_estimates, elbo_variance, estimator_variance, iwae_bound
from ..models.vae import VAE
from .config import ReproduceConfig

__all__ = ["evaluate_run"]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def evaluate_run(model: VAE, test: torch.Tensor, cfg: ReproduceConfig) -> dict[str, Any]:
    """IWAE bounds for each K and the ELBO on the same images; estimator variances against L and K.

    ``variance``: the study's training estimator (L-sample reconstruction term plus the
    analytic KL), whose variance is that of ``log p(x | z)`` and does not vanish at the
    true posterior. ``logw_variance``: the L-sample mean of ``log w = log p(x, z) - log q(z | x)``
    (Eq. 3.3), and ``iwae_variance``: the K-sample IWAE estimator; both vanish when q(z | x)
    is the posterior.
    """
    x = test if cfg.iwae_images is None else test[: cfg.iwae_images]
    out: dict[str, Any] = {"iwae_images": int(x.shape[0])}
    g = _generator(x.device, cfg.seed + 6)
    out["elbo"] = elbo_estimates(model, x, cfg.samples, 1, generator=g)[0].mean().item()
    out["iwae"] = {}
    t0 = time.perf_counter()
    for k in cfg.iwae_ks:
        out["iwae"][str(k)] = iwae_bound(model, x, k, generator=_generator(x.device, cfg.seed + 7 + k)).mean().item()
    out["iwae_time"] = time.perf_counter() - t0
    xv = test[: cfg.variance_images]
    out["variance_images"] = int(xv.shape[0])
    out["variance_repeats"] = cfg.variance_repeats
    out["variance"] = elbo_variance(model, xv, cfg.variance_ls, cfg.variance_repeats,
                                    generator=_generator(x.device, cfg.seed + 8))
    out["logw_variance"] = estimator_variance(model, xv, cfg.variance_ls, cfg.variance_repeats, estimator="elbo",
                                              generator=_generator(x.device, cfg.seed + 9))
    out["iwae_variance"] = estimator_variance(model, xv, cfg.variance_ks, cfg.variance_repeats, estimator="iwae",
                                              generator=_generator(x.device, cfg.seed + 10))
    return out
