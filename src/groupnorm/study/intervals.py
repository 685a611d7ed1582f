"""Confidence intervals and tests over seeds: Student's t, with no SciPy.

For n runs with mean m and sample standard deviation s (divisor n - 1), the 95 % interval of the
mean is ``m +/- t_{0.975, n-1} * s / sqrt(n)``. Paired comparisons (:func:`paired`) apply it to
the per-seed differences d_i = a_i - b_i; the equivalence test (:func:`tost`, Schuirmann's two
one-sided tests) declares |mean d| < margin when both ``t_lo = (m + margin) / se`` and
``t_hi = (m - margin) / se`` are significant at alpha, one-sided; that is the same as the
``1 - 2 alpha`` interval lying inside (-margin, margin). The t quantile is found by bisection
on the t CDF, ``F(t) = 1 - I_{nu/(nu+t^2)}(nu/2, 1/2) / 2`` for t >= 0, with the regularized
incomplete beta function I evaluated by its continued fraction (modified Lentz's method).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Paired", "Summary", "Tost", "paired", "summarize", "t_cdf", "t_quantile", "tost"]


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


def _check_finite(values: Sequence[float]) -> None:
    """Training records no NaN or Inf (a diverged run raises), so one comes from an edited or
    foreign record: an error naming it, not statistics' AttributeError deep inside stdev."""
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"a result is not finite ({bad[0]!r} among {len(values)} values)")


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean and t-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` of ``values``."""
    if not values:
        raise ValueError("summarize needs at least one value")
    _check_finite(values)
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Summary(mean, math.nan, 1)
    s = statistics.stdev(values)
    return Summary(mean, t_quantile((1 + confidence) / 2, n - 1) * s / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    """A paired comparison over n seeds: mean difference, its standard error, the t statistic
    ``mean / se`` (df = n - 1) and the two-sided ``confidence`` interval (lo, hi)."""

    n: int
    mean: float
    se: float
    t: float
    lo: float
    hi: float
    confidence: float


def paired(diffs: Sequence[float], confidence: float = 0.95) -> Paired:
    """Student's t interval of the mean of per-seed differences (at least two)."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 differences, got {n}")
    _check_finite(diffs)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile((1 + confidence) / 2, n - 1) * se
    t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else math.nan
    return Paired(n, mean, se, t, mean - half, mean + half, confidence)


@dataclass(frozen=True)
class Tost:
    """Two one-sided tests of ``|mean| < margin``: both t statistics (df = n - 1), their
    one-sided p values, the ``1 - 2 alpha`` interval, and whether equivalence is shown."""

    n: int
    mean: float
    margin: float
    t_lo: float
    t_hi: float
    p: float  # the larger of the two one-sided p values
    lo: float
    hi: float
    equivalent: bool


def tost(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> Tost:
    """Schuirmann's TOST on per-seed differences: H0 ``mean <= -margin`` or ``mean >= margin``
    is rejected (equivalence shown) when ``max(p_lo, p_hi) < alpha``, with
    ``p_lo = 1 - F(t_lo)``, ``p_hi = F(t_hi)`` and F the t CDF with n - 1 df."""
    _check_finite(diffs)
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    ci = paired(diffs, 1 - 2 * alpha)
    df = ci.n - 1
    if ci.se > 0:
        t_lo, t_hi = (ci.mean + margin) / ci.se, (ci.mean - margin) / ci.se
        p = max(1 - t_cdf(t_lo, df), t_cdf(t_hi, df))
    else:  # identical differences: equivalent exactly when inside the margin
        t_lo, t_hi = math.inf, -math.inf
        p = 0.0 if abs(ci.mean) < margin else 1.0
    return Tost(ci.n, ci.mean, margin, t_lo, t_hi, p, ci.lo, ci.hi, p < alpha)
