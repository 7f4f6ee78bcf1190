"""The log-weight estimators against a linear-Gaussian model whose posterior is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from growdense.models import estimator_variance, iwae_gap, log_importance_weights, log_weight_variance


class LinearGaussian(nn.Module):
    """p(z) = N(0, I_2), p(x | z) = N(A z, s^2 I_3) with A^T A diagonal, so the exact posterior
    N(S A^T x / s^2, S), S = (I + A^T A / s^2)^-1, is a diagonal Gaussian: an encoder can be exact.
    ``shift`` moves the encoder's mean away from the posterior's."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
        self.s2 = 0.25
        self.shift = shift

    def encode(self, x):
        ata = (self.A * self.A).sum(0)  # diagonal of A^T A
        var = 1.0 / (1.0 + ata / self.s2)
        mu = var * (x @ self.A) / self.s2 + self.shift
        return mu, var.log().expand_as(mu)

    def log_likelihood(self, x, z):
        mean = z @ self.A.T  # (k, B, 3)
        return (-0.5 * (math.log(2 * math.pi * self.s2) + (x - mean).pow(2) / self.s2)).sum(-1)

    def log_marginal(self, x):
        cov = self.A @ self.A.T + self.s2 * torch.eye(3, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), cov).log_prob(x)


@pytest.fixture
def x():
    return torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2


def test_exact_posterior_log_weights_equal_log_px(x):
    lw = log_importance_weights(LinearGaussian(), x, 50, torch.Generator().manual_seed(1))
    # float64: log w = log p(x) exactly up to rounding of terms of size ~10
    torch.testing.assert_close(lw, LinearGaussian().log_marginal(x).expand_as(lw), rtol=0, atol=1e-12)


def test_log_weight_variance_vanishes_only_at_the_posterior(x):
    exact = log_weight_variance(LinearGaussian(), x, 200, generator=torch.Generator().manual_seed(2))
    off = log_weight_variance(LinearGaussian(shift=0.5), x, 200, generator=torch.Generator().manual_seed(2))
    assert exact.shape == (7,)
    assert exact.max().item() < 1e-24  # float64 rounding only: values ~10, eps ~1e-15, squared
    assert off.min().item() > 1e-2  # a 0.5 shift against posterior std <= 0.45: clearly nonzero


def test_estimator_variances_against_L_and_K(x):
    for estimator in ("elbo", "iwae"):
        rows = estimator_variance(LinearGaussian(), x, (1, 4, 16), 8, estimator=estimator,
                                  generator=torch.Generator().manual_seed(3))
        key = "L" if estimator == "elbo" else "K"
        assert [r[key] for r in rows] == [1, 4, 16]
        assert all(r["var"] < 1e-24 for r in rows)  # exact posterior: every estimate is log p(x)
        assert rows[0]["mean"] == pytest.approx(LinearGaussian().log_marginal(x).mean().item(), abs=1e-10)
        off = estimator_variance(LinearGaussian(shift=0.5), x, (1, 16), 400, estimator=estimator,
                                 generator=torch.Generator().manual_seed(4))
        assert off[0]["var"] > 1e-2 and 0 < off[1]["var"] < off[0]["var"]
    # the L-sample mean of log w has variance Var(log w) / L: 400 repeats, so within ~15% (3 sigma of a
    # chi-square with 399 degrees of freedom, averaged over 7 images); allow 30%
    off = estimator_variance(LinearGaussian(shift=0.5), x, (1, 16), 400, generator=torch.Generator().manual_seed(5))
    assert off[1]["var"] * 16 == pytest.approx(off[0]["var"], rel=0.3)


def test_iwae_gap(x):
    exact = iwae_gap(LinearGaussian(), x, 32, generator=torch.Generator().manual_seed(6))
    assert exact["gap"] == pytest.approx(0.0, abs=1e-10)  # all weights equal: logsumexp - log K = log w
    assert exact["iwae"] == pytest.approx(LinearGaussian().log_marginal(x).mean().item(), abs=1e-10)
    off = iwae_gap(LinearGaussian(shift=0.5), x, 1000, generator=torch.Generator().manual_seed(6))
    truth = LinearGaussian().log_marginal(x).mean().item()
    # a lower bound that tightens with K: ELBO < IWAE <= log p(x) (up to Monte Carlo noise at K=1000)
    assert off["gap"] > 0.05 and off["elbo"] < off["iwae"] < truth + 0.01
    assert off["logw_var"] > 1e-2 and exact["logw_var"] < 1e-24


def test_estimator_arguments_are_checked(x):
    with pytest.raises(ValueError, match="estimator"):
        estimator_variance(LinearGaussian(), x, (1,), 4, estimator="kl")
    with pytest.raises(ValueError, match="repeats"):
        estimator_variance(LinearGaussian(), x, (1,), 1)
    with pytest.raises(ValueError, match="samples"):
        log_weight_variance(LinearGaussian(), x, 1)
