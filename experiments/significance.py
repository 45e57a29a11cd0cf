"""Hypothesis tests of the protocol: one-sided p-values against an effect size, and Holm's
step-down correction across an experiment's criteria.

Every test here asks whether per-seed values lie beyond a threshold (the minimum effect
the criterion claims), so its null hypothesis is "the effect is at most the threshold":

- `t`: Student's t-test of the mean (values roughly normal: accuracies, losses).
- `sign`: the exact sign test of the median: how many seeds lie beyond the threshold,
  against Binomial(n, 1/2) (discrete or heavy-tailed values: counts, censored steps,
  timing ratios); seeds exactly at the threshold are left out, as usual.
- `permutation`: the exact paired permutation (sign-flip) test of the mean of
  values - threshold: under the null each seed's difference is as likely negative as
  positive, so all 2^n sign patterns are equally likely (a symmetric but not necessarily
  normal distribution). Exact for n <= EXACT_MAX seeds; beyond, a fixed-seed Monte Carlo
  estimate with (1 + hits) / (1 + draws).

`within` (equivalence, |effect| <= margin) is two one-sided tests (TOST): its p-value is the
larger of the p-values of "> -margin" and "< +margin".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

P_TESTS = ("t", "sign", "permutation")
EXACT_MAX = 16  # 2^16 sign patterns: exact enumeration stays well under a second
MONTE_CARLO_DRAWS = 200_000


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def t_p(values: Sequence[float], threshold: float, greater: bool) -> float:
    """One-sided p-value of Student's t-test that the mean is above (`greater`) or below
    `threshold`; nan with fewer than 2 finite values; a constant sample gives 0 or 1."""
    from scipy import stats

    v = _finite(values)
    n = v.size
    if n < 2:
        return math.nan
    d = (v - threshold) if greater else (threshold - v)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return 0.0 if d.mean() > 0 else 1.0
    t = float(d.mean()) / (sd / math.sqrt(n))
    return float(stats.t.sf(t, n - 1))


def sign_p(values: Sequence[float], threshold: float, greater: bool) -> float:
    """One-sided p-value of the exact sign test: P(Binomial(m, 1/2) >= k), k the seeds
    beyond `threshold`, m the seeds not equal to it; 1 when every seed equals it."""
    v = _finite(values)
    d = (v - threshold) if greater else (threshold - v)
    d = d[d != 0]
    m, k = d.size, int(np.sum(d > 0))
    if m == 0:
        return 1.0 if v.size else math.nan
    return sum(math.comb(m, i) for i in range(k, m + 1)) / 2**m


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics
    (x_(k), x_(n+1-k)), k the largest rank with P(Binomial(n, 1/2) < k) <= (1 - level) / 2,
    so the coverage is at least `level` whatever the distribution; (nan, nan) when n is too
    small for any such k (n < 6 at 95%)."""
    v = np.sort(_finite(values))
    n = v.size
    tail = (1.0 - level) / 2.0
    below, k = 0.0, 0  # below: P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return math.nan, math.nan
    return float(v[k - 1]), float(v[n - k])


def permutation_p(values: Sequence[float], threshold: float, greater: bool) -> float:
    """One-sided p-value of the paired sign-flip permutation test of the mean of
    values - threshold: the share of sign patterns whose mean is at least the observed one."""
    v = _finite(values)
    n = v.size
    if n == 0:
        return math.nan
    d = (v - threshold) if greater else (threshold - v)
    observed = float(d.sum())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).sum()))  # equal sums that differ in rounding count as ties
    if n <= EXACT_MAX:
        patterns = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2^n, n) bits
        sums = ((1 - 2 * patterns) * d).sum(axis=1)
        return float(np.mean(sums >= observed - tolerance))
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(MONTE_CARLO_DRAWS, n))
    hits = int(np.sum((signs * d).sum(axis=1) >= observed - tolerance))
    return (1 + hits) / (1 + MONTE_CARLO_DRAWS)


_TESTS = {"t": t_p, "sign": sign_p, "permutation": permutation_p}


def p_value(values: Sequence[float], compare: str, threshold: float, test: str) -> float:
    """p-value of the null "the effect is not beyond `threshold`" for `compare` in
    greater / less / within (TOST with margin `threshold`); nan when it cannot be computed."""
    if test not in _TESTS:
        raise ValueError(f"`test`={test!r}: a p-value test is one of {', '.join(P_TESTS)}.")
    f = _TESTS[test]
    if compare == "greater":
        return f(values, threshold, True)
    if compare == "less":
        return f(values, threshold, False)
    if compare == "within":
        return max(f(values, -threshold, True), f(values, threshold, False))
    raise ValueError(f"`compare`={compare!r}: use greater, less or within.")


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (reject hypothesis i at familywise level alpha
    when adjusted[i] <= alpha). nan p-values are left out of the family and stay nan."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
