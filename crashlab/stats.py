"""Rates with confidence intervals, and the comparison of two cells.

Pure functions over counts. The Wilson score interval (Wilson 1927) behaves at 0 and n, where the
normal approximation collapses to a zero-width interval; with no failures the one-sided exact
(Clopper-Pearson) 95 % upper bound, 1 - 0.05^(1/n) (about 3/n, "the rule of three"), is what a
reader of "0 of n" wants to know. Fisher's exact test compares two cells without any large-sample
assumption, which matters at the few dozen states per cell a CI gate can afford.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95 %


@dataclass(frozen=True, slots=True)
class Rate:
    k: int
    n: int
    low: float
    high: float
    upper95: float  # one-sided 95 % upper bound (exact), the number to quote when k == 0

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    def __str__(self) -> str:
        if not self.n:
            return "n/a (0 states)"
        if self.k == 0:
            return f"0/{self.n} (<= {100 * self.upper95:.1f} % at 95 %)"
        return f"{self.k}/{self.n} = {100 * self.value:.1f} % [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k} n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp only the rounding at the ends: the interval is exact there.
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def upper_bound_zero(n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper bound on the rate when 0 of n failed: 1 - (1 - confidence)^(1/n)."""
    return 1.0 if n == 0 else 1 - (1 - confidence) ** (1 / n)


def states_needed(max_rate: float, confidence: float = 0.95) -> int:
    """The fewest states that, all passing, bound the rate below `max_rate`: the smallest n with
    upper_bound_zero(n) < max_rate. The closed form, n > ln(1 - confidence) / ln(1 - max_rate), is
    only nudged where floating point lands on the boundary."""
    if not 0 < max_rate <= 1:
        raise ValueError(f"max_rate must be in (0, 1], got {max_rate}")
    if max_rate == 1:
        return 1
    n = max(1, math.floor(math.log(1 - confidence) / math.log1p(-max_rate)))
    while upper_bound_zero(n, confidence) >= max_rate:
        n += 1
    while n > 1 and upper_bound_zero(n - 1, confidence) < max_rate:
        n -= 1
    return n


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper bound for k of n, by bisection on the binomial CDF."""
    if k >= n:
        return 1.0
    if k == 0:
        return upper_bound_zero(n, confidence)
    alpha = 1 - confidence
    lo, hi = k / n, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), as the regularized incomplete beta I_(1-p)(n - k, k + 1):
    a sum of the k + 1 terms would take seconds for a cell of thousands of states, each term
    overflowing a float on its own (C(5000, 2500) has 1500 digits)."""
    if p <= 0.0 or k >= n:
        return 1.0
    if p >= 1.0:
        return 0.0
    return betainc(n - k, k + 1, 1.0 - p)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's
    method), on the side of x where the fraction converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-16

    def guard(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 100_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + num * d)
            c = guard(1.0 + num / c)
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def rate(k: int, n: int) -> Rate:
    low, high = wilson(k, n)
    return Rate(k, n, low, high, clopper_pearson_upper(k, n))


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p-value of Fisher's exact test for the table [[a, b], [c, d]].

    Rows are the two cells, columns failed / not failed. Sums the probabilities of every table with
    the same margins that is no more likely than the observed one (the usual two-sided definition,
    with a relative tolerance for ties in floating point).
    """
    if min(a, b, c, d) < 0:
        raise ValueError("counts must be non-negative")
    row1, row2, col1 = a + b, c + d, a + c
    n = row1 + row2

    def p_table(x: int) -> float:
        return math.comb(row1, x) * math.comb(row2, col1 - x) / math.comb(n, col1)

    observed = p_table(a)
    lo, hi = max(0, col1 - row2), min(row1, col1)
    total = sum(p for x in range(lo, hi + 1) if (p := p_table(x)) <= observed * (1 + 1e-9))
    return min(1.0, total)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of several p-values, in their order: the i-th
    smallest is multiplied by (m - i), kept monotone, capped at 1. Controls the family-wise error
    rate without assuming the tests independent, which cells sharing a workload are not."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def fisher_rates(a: Rate, b: Rate) -> float:
    """Fisher's exact two-sided p that two rates (k of n each) differ."""
    return fisher_exact(a.k, a.n - a.k, b.k, b.n - b.k)


def compare_many(pairs: list[tuple[Rate, Rate]]) -> list[tuple[float, float]]:
    """Each pair's Fisher p and its Holm adjustment over all the pairs (the p itself when there is
    one): what a report that makes several comparisons at once quotes."""
    pvalues = [fisher_rates(a, b) for a, b in pairs]
    return list(zip(pvalues, holm(pvalues) if len(pvalues) > 1 else pvalues, strict=True))
