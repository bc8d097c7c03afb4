"""Statistics against published values and their defining properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crashlab import stats


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (0, 100, 0.0, 0.0370),  # the classic zero-numerator case
    (8, 30, 0.1418, 0.4445),  # 8/30 corrupt states, DESIGN.md's barrier=0 measurement
    (30, 30, 0.8865, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_known_values(k: int, n: int, low: float, high: float) -> None:
    got = stats.wilson(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_upper_bound_when_nothing_failed() -> None:
    # 1 - 0.05^(1/n): close to the rule of three for large n.
    assert stats.upper_bound_zero(30) == pytest.approx(0.09503, abs=1e-5)
    assert stats.upper_bound_zero(100) == pytest.approx(0.02951, abs=1e-5)
    assert stats.upper_bound_zero(3000) == pytest.approx(3 / 3000, rel=0.01)
    assert str(stats.rate(0, 30)) == "0/30 (<= 9.5 % at 95 %)"


@pytest.mark.parametrize("max_rate", [0.001, 0.01, 0.02, 0.05, 0.09, 0.1, 0.5, 1 - 0.05 ** (1 / 4), 1.0])
def test_states_needed_is_the_smallest_n_whose_bound_is_below_the_rate(max_rate: float) -> None:
    n = stats.states_needed(max_rate)
    assert stats.rate(0, n).upper95 < max_rate
    assert n == 1 or stats.rate(0, n - 1).upper95 >= max_rate
    with pytest.raises(ValueError, match="max_rate"):
        stats.states_needed(0)


def test_clopper_pearson_upper_matches_binomial_tail() -> None:
    u = stats.clopper_pearson_upper(8, 30)
    assert stats.binom_cdf(8, 30, u) == pytest.approx(0.05, abs=1e-6)


@given(st.integers(1, 120), st.data())
def test_binom_cdf_is_the_exact_binomial_sum(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    p = data.draw(st.floats(0.001, 0.999))
    exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    assert stats.binom_cdf(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_bounds_of_cells_of_thousands_of_states() -> None:
    """Pooled claims reach tens of thousands of states: no overflow, the tail still exact."""
    for k, n in ((2500, 5000), (9000, 20000), (3, 60000)):
        u = stats.rate(k, n).upper95
        assert k / n < u < 1 and stats.binom_cdf(k, n, u) == pytest.approx(0.05, abs=1e-9)


@pytest.mark.parametrize(("table", "p"), [
    ((1, 9, 11, 3), 0.002759),  # Fisher's lady tasting tea, as usually tabulated
    ((0, 30, 8, 22), 0.004575),  # 0/30 vs 8/30
    ((3, 1, 1, 3), 0.4857),
    ((5, 5, 5, 5), 1.0),
])
def test_fisher_exact_known_values(table: tuple[int, int, int, int], p: float) -> None:
    assert stats.fisher_exact(*table) == pytest.approx(p, abs=5e-5)


@given(st.integers(1, 400), st.data())
def test_wilson_contains_the_estimate(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    low, high = stats.wilson(k, n)
    assert 0 <= low <= k / n <= high <= 1
    if 0 < k < n:
        assert low < k / n < high


@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), st.integers(0, 20))
def test_fisher_is_a_probability_and_symmetric(a: int, b: int, c: int, d: int) -> None:
    if a + b + c + d == 0:
        return
    p = stats.fisher_exact(a, b, c, d)
    assert 0 < p <= 1
    assert p == pytest.approx(stats.fisher_exact(c, d, a, b), rel=1e-9)
    assert math.isclose(p, stats.fisher_exact(b, a, d, c), rel_tol=1e-9)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        stats.wilson(5, 3)
