"""Evaluating the trained models of a reproduction: IWAE bounds, and the variance of the
log-weight estimators (and of the study's analytic-KL ELBO estimator) against L and K."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

from ..models.evaluation import elbo_estimates, elbo_variance, estimator_variance, iwae_bound
from ..models.vae import VAE
from .config import ReproduceConfig

__all__ = ["evaluate_run", "evaluation_steps"]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def evaluation_steps(cfg: ReproduceConfig) -> int:
    """How many times :func:`evaluate_run` calls its ``on_step``."""
    return 1 + len(cfg.iwae_ks) + 3


def evaluate_run(model: VAE, test: torch.Tensor, cfg: ReproduceConfig,
                 on_step: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """IWAE bounds for each K and the ELBO on the same images; estimator variances against L and K.

    ``variance``: the study's training estimator (L-sample reconstruction term plus the
    analytic KL), whose variance is that of ``log p(x | z)`` and does not vanish at the
    true posterior. ``logw_variance``: the L-sample mean of ``log w = log p(x, z) - log q(z | x)``
    (Eq. 3.3), and ``iwae_variance``: the K-sample IWAE estimator; both vanish when q(z | x)
    is the posterior. ``on_step(what)`` is called after each of the
    :func:`evaluation_steps` pieces (for a progress bar).
    """
    done = on_step if on_step is not None else (lambda what: None)
    x = test if cfg.iwae_images is None else test[: cfg.iwae_images]
    out: dict[str, Any] = {"iwae_images": int(x.shape[0])}
    g = _generator(x.device, cfg.seed + 6)
    out["elbo"] = elbo_estimates(model, x, cfg.samples, 1, generator=g)[0].mean().item()
    done("ELBO")
    out["iwae"] = {}
    t0 = time.perf_counter()
    for k in cfg.iwae_ks:
        out["iwae"][str(k)] = iwae_bound(model, x, k, generator=_generator(x.device, cfg.seed + 7 + k)).mean().item()
        done(f"IWAE K={k}")
    out["iwae_time"] = time.perf_counter() - t0
    xv = test[: cfg.variance_images]
    out["variance_images"] = int(xv.shape[0])
    out["variance_repeats"] = cfg.variance_repeats
    out["variance"] = elbo_variance(model, xv, cfg.variance_ls, cfg.variance_repeats,
                                    generator=_generator(x.device, cfg.seed + 8))
    done("ELBO variance")
    out["logw_variance"] = estimator_variance(model, xv, cfg.variance_ls, cfg.variance_repeats, estimator="elbo",
                                              generator=_generator(x.device, cfg.seed + 9))
    done("log-weight variance")
    out["iwae_variance"] = estimator_variance(model, xv, cfg.variance_ks, cfg.variance_repeats, estimator="iwae",
                                              generator=_generator(x.device, cfg.seed + 10))
    done("IWAE variance")
    return out
