"""The report's statistics: Student's t quantiles (no SciPy) and the 95 % interval."""

from __future__ import annotations

import math

import pytest

from groupnorm.study.intervals import summarize, t_cdf, t_quantile

# Two-sided 95 % critical values t_{0.975, df} from standard tables.
TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 29: 2.0452, 120: 1.9799}


@pytest.mark.parametrize("df,expected", sorted(TABLE.items()))
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_cdf_closed_forms() -> None:
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.025, 4) == pytest.approx(-TABLE[4], abs=1e-4)


def test_summarize() -> None:
    s = summarize([20.0, 22.0, 24.0])
    assert s.mean == pytest.approx(22.0)
    assert s.half_width == pytest.approx(TABLE[2] * 2.0 / math.sqrt(3), rel=1e-4)
    assert s.n == 3
    one = summarize([5.0])
    assert one.n == 1 and math.isnan(one.half_width)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
