"""A kernel two-sample test: are two sets of images drawn from the same distribution?

The statistic is the unbiased squared maximum mean discrepancy (MMD²) with a Gaussian
kernel ``k(a, b) = exp(-|a - b|² / (2 h²))``; its p-value comes from permuting the pooled
samples between the two sets (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012).
MMD² is 0 in expectation when both sets come from one distribution and grows with how
far apart the two distributions are, so values computed with the same bandwidth compare
pairs of models on one scale.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["MMDResult", "median_bandwidth", "mmd2_unbiased", "mmd_test"]


class MMDResult(NamedTuple):
    mmd2: float  # the unbiased MMD² of the two sets
    p_value: float  # (1 + #permutations at least as large) / (1 + permutations)
    bandwidth: float  # the kernel's h


def _flat(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"{what} must be a tensor of at least 2 samples (n, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * a @ b.T).clamp_min_(0.0)


def median_bandwidth(x: Tensor) -> float:
    """The median distance between distinct samples of ``x`` (n, ...): the usual choice of h."""
    x = _flat(x, "x")
    d = _sq_dists(x, x)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return float(d[i, j].median().sqrt())


def _kernel(z: Tensor, bandwidth: float) -> Tensor:
    return torch.exp(-_sq_dists(z, z) / (2.0 * bandwidth**2))


def _statistics(k: Tensor, member: Tensor) -> Tensor:
    """Unbiased MMD² for each column of ``member`` (N, P), 1 where a pooled sample belongs to
    the first set; ``k`` is the pooled (N, N) kernel matrix."""
    a = member.to(k.dtype)
    n = a.sum(0)
    m = len(k) - n
    diag = torch.diagonal(k)
    ka = k @ a
    total, diag_total = k.sum(), diag.sum()
    a_k_a = (a * ka).sum(0)
    a_k_1 = ka.sum(0)
    diag_a = diag @ a
    s_xx = a_k_a - diag_a
    s_yy = total - 2.0 * a_k_1 + a_k_a - (diag_total - diag_a)
    s_xy = a_k_1 - a_k_a
    return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must hold samples of one size, got {x.shape[1]} and {y.shape[1]} values per sample")
    return x, y


def mmd2_unbiased(x: Tensor, y: Tensor, bandwidth: float) -> float:
    """The unbiased MMD² between the samples ``x`` (n, ...) and ``y`` (m, ...), Gaussian kernel of width h."""
    x, y = _check_pair(x, y)
    member = torch.zeros(len(x) + len(y), 1, dtype=torch.float64)
    member[: len(x)] = 1.0
    return float(_statistics(_kernel(torch.cat([x, y]), bandwidth), member)[0])


def mmd_test(
    x: Tensor,
    y: Tensor,
    *,
    bandwidth: Optional[float] = None,
    permutations: int = 200,
    generator: Optional[torch.Generator] = None,
) -> MMDResult:
    """Kernel two-sample test of ``x`` (n, ...) against ``y`` (m, ...), in float64 on the CPU.

    ``bandwidth``: the kernel's h (default: :func:`median_bandwidth` of the pooled samples;
    give a fixed one to compare several pairs on one scale). The p-value permutes the
    pooled samples ``permutations`` times with ``generator``.
    """
    x, y = _check_pair(x.detach().cpu(), y.detach().cpu())
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")
    z = torch.cat([x, y])
    h = median_bandwidth(z) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be positive, got {h}")
    k = _kernel(z, h)
    n, total = len(x), len(z)
    member = torch.zeros(total, permutations + 1, dtype=torch.float64)
    member[:n, 0] = 1.0
    for p in range(1, permutations + 1):
        member[torch.randperm(total, generator=generator)[:n], p] = 1.0
    stats = _statistics(k, member)
    observed = stats[0]
    # Splits with the same statistic (the observed one swapped, when n == m) differ only by rounding.
    ties = 1e-10 * max(1.0, float(observed.abs()))
    p_value = (1 + int((stats[1:] >= observed - ties).sum())) / (1 + permutations)
    return MMDResult(float(observed), p_value, h)
