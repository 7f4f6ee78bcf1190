"""Models built on growdense layers: the study's MNIST VAE and its evaluation, a growable GPT."""

from .evaluation import (elbo_estimates, elbo_variance, estimator_variance, iwae_bound, iwae_gap,
                         log_importance_weights, log_weight_variance)
from .gpt import GPT, PlainGPT
from .vae import VAE, bernoulli_nll, gaussian_kl, negative_elbo

__all__ = [
    "VAE",
    "GPT",
    "PlainGPT",
    "negative_elbo",
    "bernoulli_nll",
    "gaussian_kl",
    "iwae_bound",
    "elbo_estimates",
    "elbo_variance",
    "log_importance_weights",
    "log_weight_variance",
    "estimator_variance",
    "iwae_gap",
]
