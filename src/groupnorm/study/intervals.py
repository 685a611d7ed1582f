"""Confidence intervals over seeds: Student's t, with no SciPy.

For n runs with mean m and sample standard deviation s (divisor n - 1), the 95 % interval of the
mean is ``m +/- t_{0.975, n-1} * s / sqrt(n)``. The t quantile is found by bisection on the t
CDF, ``F(t) = 1 - I_{nu/(nu+t^2)}(nu/2, 1/2) / 2`` for t >= 0, with the regularized incomplete
beta function I evaluated by its continued fraction (modified Lentz's method).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "summarize", "t_cdf", "t_quantile"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (converges for x < (a+1)/(a+b+2))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with ``t_cdf(t, df) == p``, for 0 < p < 1 (bisection to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Mean, 95 % CI half-width (NaN for a single run) and count of one cell's runs."""

    mean: float
    half_width: float
    n: int

    def fmt(self, digits: int = 1) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean and t-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` of ``values``."""
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Summary(mean, math.nan, 1)
    s = statistics.stdev(values)
    return Summary(mean, t_quantile((1 + confidence) / 2, n - 1) * s / math.sqrt(n), n)
