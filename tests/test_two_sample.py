"""The kernel two-sample test (growdense.experiments.two_sample) against direct computations."""

import itertools
import math

import pytest
import torch

from growdense.experiments.two_sample import median_bandwidth, mmd2_unbiased, mmd_test


def _mmd2_loops(x, y, h):
    """The unbiased MMD² written out term by term (Gretton et al. 2012, Lemma 6)."""
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_statistic_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.5
    # float64 throughout; the two differ only by summation order
    assert mmd2_unbiased(x, y, 1.3) == pytest.approx(_mmd2_loops(x, y, 1.3), rel=1e-10, abs=1e-12)
    assert mmd2_unbiased(y, x, 1.3) == pytest.approx(_mmd2_loops(y, x, 1.3), rel=1e-10, abs=1e-12)


def test_median_bandwidth_is_the_median_pairwise_distance():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(9, 2, 2, generator=g)
    flat = x.reshape(9, -1).double()
    d = sorted(float((flat[i] - flat[j]).norm()) for i, j in itertools.combinations(range(9), 2))
    # 36 distances: torch.median takes the lower of the two middle ones
    assert median_bandwidth(x) == pytest.approx(d[17], rel=1e-9)


def test_p_value_counts_permutations_exactly():
    # With every split of 3 + 3 samples enumerated, the permutation p-value of the observed
    # split is the share of splits whose statistic is at least as large.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, generator=g, dtype=torch.float64) + 2.0
    z = torch.cat([x, y])
    h = 1.0
    observed = mmd2_unbiased(x, y, h)
    splits = [mmd2_unbiased(z[list(s)], z[[i for i in range(6) if i not in s]], h)
              for s in itertools.combinations(range(6), 3)]
    exact = sum(v >= observed - 1e-12 for v in splits) / len(splits)
    result = mmd_test(x, y, bandwidth=h, permutations=4000, generator=torch.Generator().manual_seed(3))
    assert result.mmd2 == pytest.approx(observed, rel=1e-12)
    # 4000 random splits estimate the exact share (2/20 here) to within ~0.005 (binomial sd)
    assert result.p_value == pytest.approx(exact, abs=0.02)


def test_detects_a_shift_and_not_a_resample():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(300, 5, generator=g)
    b = torch.randn(300, 5, generator=g) + torch.tensor([0.6, 0, 0, 0, 0])
    c = torch.randn(300, 5, generator=g)
    shifted = mmd_test(a, b, generator=torch.Generator().manual_seed(0))
    same = mmd_test(a, c, generator=torch.Generator().manual_seed(0))
    assert shifted.p_value < 0.01 and shifted.mmd2 > 0
    assert same.p_value > 0.05
    assert abs(same.mmd2) < shifted.mmd2 / 5


def test_false_rejections_are_rare_under_the_null():
    # 60 pairs from one distribution: at level 0.1 about 6 rejections are expected; more than
    # 14 has probability below 0.2% (binomial), so this fails only for a miscalibrated test.
    g = torch.Generator().manual_seed(5)
    rejections = sum(mmd_test(torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g),
                              permutations=99, generator=g).p_value <= 0.1 for _ in range(60))
    assert rejections <= 14


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="values per sample"):
        mmd_test(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd_test(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="permutations"):
        mmd_test(torch.rand(4, 3), torch.rand(4, 3), permutations=0)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_test(torch.rand(4, 3), torch.rand(4, 3), bandwidth=0.0)
