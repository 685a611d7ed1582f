"""The report's statistics: Student's t quantiles (no SciPy) and the 95 % interval."""

from __future__ import annotations

import math

import pytest

from groupnorm.study.intervals import paired, summarize, t_cdf, t_quantile, tost

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


def _f2(t: float) -> float:
    """The t CDF with 2 degrees of freedom in closed form."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


T95_2 = 2.9200  # t_{0.95, 2}, one-sided 5 % (tables)


def test_paired_interval_by_hand() -> None:
    # d = (1, 2, 6): mean 3, s = sqrt((4 + 1 + 9) / 2) = sqrt(7), se = sqrt(7 / 3).
    ci = paired([1.0, 2.0, 6.0])
    se = math.sqrt(7 / 3)
    assert (ci.n, ci.mean) == (3, pytest.approx(3.0))
    assert ci.se == pytest.approx(se)
    assert ci.t == pytest.approx(3.0 / se)
    assert (ci.lo, ci.hi) == (
        pytest.approx(3.0 - TABLE[2] * se, abs=1e-3),
        pytest.approx(3.0 + TABLE[2] * se, abs=1e-3),
    )
    ninety = paired([1.0, 2.0, 6.0], 0.90)
    assert ninety.hi == pytest.approx(3.0 + T95_2 * se, abs=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        paired([1.0])


@pytest.mark.parametrize("margin,equivalent", [(4.0, True), (3.5, False), (1.5, False)])
def test_tost_by_hand(margin: float, equivalent: bool) -> None:
    # d = (1, 2, 3): mean 2, s = 1, se = 1/sqrt(3), df = 2.
    d = [1.0, 2.0, 3.0]
    se = 1 / math.sqrt(3)
    t_lo, t_hi = (2 + margin) / se, (2 - margin) / se
    p = max(1 - _f2(t_lo), _f2(t_hi))
    res = tost(d, margin)
    assert res.t_lo == pytest.approx(t_lo) and res.t_hi == pytest.approx(t_hi)
    assert res.p == pytest.approx(p, abs=1e-9)
    assert res.equivalent is equivalent is (p < 0.05)
    # The same decision as the 90 % interval lying inside the margin.
    assert (res.lo, res.hi) == (
        pytest.approx(2 - T95_2 * se, abs=1e-3),
        pytest.approx(2 + T95_2 * se, abs=1e-3),
    )
    assert (-margin < res.lo and res.hi < margin) is equivalent


def test_tost_margin_4_is_the_textbook_p() -> None:
    # margin 4: t_hi = -2 sqrt(3) = -3.4641, p = 1/2 - 3.4641 / (2 sqrt(14)) = 0.03709.
    assert tost([1.0, 2.0, 3.0], 4.0).p == pytest.approx(0.037089, abs=1e-6)
    with pytest.raises(ValueError, match="margin must be > 0"):
        tost([1.0, 2.0], 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_regression_a_result_that_is_not_finite_is_named(bad: float) -> None:
    """A NaN or Inf result (only an edited record holds one) raised AttributeError from inside
    statistics.stdev, which the CLI does not catch: a traceback."""
    for call in (
        lambda: summarize([1.0, bad, 2.0]),
        lambda: paired([1.0, bad]),
        lambda: tost([1.0, bad], margin=1.0),
    ):
        with pytest.raises(ValueError, match="a result is not finite"):
            call()
