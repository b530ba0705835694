"""The statistics: mean ± std over seeds, and the paired t-test against the baseline (Student t, no scipy)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .common import CI_LEVEL

# ------------------------------------------------------------------------------------------- statistics
# Student's t without scipy (not a dependency): the CDF through the regularized incomplete beta function,
# evaluated by its continued fraction (Lentz's method, as in Numerical Recipes §6.4), and the quantile by
# bisection on that CDF. Accuracy ~1e-12, far below the 3 printed digits.


def _beta_cf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast only below (a + 1) / (a + b + 2); use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, e.g. t_quantile(0.975, 2) = 4.303 (the 95% two-sided critical value)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def mean_ci(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean of ``values`` (n - 1 df); None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean, std = mean_std(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def paired_test(diffs: Sequence[float], level: float = CI_LEVEL) -> dict:
    """Paired t-test on per-seed differences: ``{n, mean, std, ci95, p}``; ci95 and p are None below 2 pairs.

    Identical differences (std 0) give a zero-width interval at the mean and p = 0, or p = 1 when they are
    all 0: no seed-to-seed spread, so the sign of the mean is certain."""
    n = len(diffs)
    mean, std = mean_std(diffs)
    out: dict[str, Any] = {"n": n, "mean": mean, "std": std, "ci95": None, "p": None}
    if n < 2:
        return out
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    out["ci95"] = [mean - half, mean + half]
    if std == 0.0:
        out["p"] = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (std / math.sqrt(n))
        out["p"] = min(1.0, 2.0 * t_cdf(-abs(t), n - 1))
    return out


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None stays None and is not counted): a p that
    stays below 0.05 adjusted keeps the family-wise error rate at 5% however many tests the table holds."""
    ranked = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out: list[float | None] = [None] * len(ps)
    running, m = 0.0, len(ranked)
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out
