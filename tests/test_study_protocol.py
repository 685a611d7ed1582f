"""The pre-registered claims, decided from synthetic run records whose answers are known."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest

from groupnorm.study.protocol import MARGIN, decide

T975_3, T95_3 = 3.1824, 2.3534  # t_{0.975, 3} and t_{0.95, 3} (tables)
SEEDS = (0, 1, 2, 3)
BN32 = (20.0, 21.0, 22.0, 23.0)
BN_DROP = (5.0, 6.0, 7.0, 8.0)
GN32 = (22.0, 22.5, 23.0, 23.5)
GN_WOBBLE = (0.1, -0.1, 0.2, -0.2)


def _rec(
    norm: str,
    n: int,
    seed: int,
    err: float,
    groups: int | None = None,
    on: str = "test",
) -> dict[str, Any]:
    spec = {"norm": norm, "batch": n, "seed": seed, "groups": groups, "group_size": None}
    return {
        "key": f"{norm}{groups}-N{n}-s{seed}",
        "spec": spec,
        "test_error": err,
        "evaluated_on": on,
    }


def _records(
    gn_at_4: float = 0.0, ln: tuple[float, ...] = (2.0, 3.0, 2.5, 3.5)
) -> list[dict[str, Any]]:
    out = []
    for i, s in enumerate(SEEDS):
        out += [_rec("bn", 32, s, BN32[i]), _rec("bn", 2, s, BN32[i] + BN_DROP[i])]
        out.append(_rec("gn", 32, s, GN32[i], groups=4))
        for n in (16, 8, 4, 2):
            out.append(_rec("gn", n, s, GN32[i] + GN_WOBBLE[i] + (gn_at_4 if n == 4 else 0), 4))
        out.append(_rec("ln", 32, s, GN32[i] + ln[i]))
        out.append(_rec("in", 32, s, GN32[i] + (0.5, -0.5, 0.2, -0.2)[i]))
        out.append(_rec("gn", 32, s, 99.0, groups=1))  # a sweep cell: not the GN arm
        out.append(_rec("bn", 2, s + 100, 99.0, on="val"))  # a tuning run: never a claim
    return out


def _ci(d: list[float], t: float) -> tuple[float, float]:
    m, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    return m - t * se, m + t * se


def test_claims_hold_where_the_data_say_so() -> None:
    claims = {c.name.split(".")[0]: c for c in decide(_records())}
    assert [claims[k].verdict for k in "123456"] == [True, True, True, True, True, False]
    lo, hi = _ci(list(BN_DROP), T975_3)
    assert f"95 % CI [{lo:+.2f}, {hi:+.2f}]" in claims["1"].statistics
    assert "mean d = +6.50 points over 4 seeds" in claims["1"].statistics
    assert claims["1"].diffs["d"] == dict(zip(SEEDS, BN_DROP, strict=True))
    inter = [b - g for b, g in zip(BN_DROP, GN_WOBBLE, strict=True)]
    lo, hi = _ci(inter, T975_3)
    assert f"95 % CI [{lo:+.2f}, {hi:+.2f}]" in claims["2"].statistics
    lo, hi = _ci(list(GN_WOBBLE), T95_3)
    assert f"N=2: mean d +0.00, 90 % CI [{lo:+.2f}, {hi:+.2f}]" in claims["3"].statistics
    assert set(claims["3"].diffs) == {"N=16", "N=8", "N=4", "N=2"}
    _, hi = _ci([b - g for b, g in zip(BN32, GN32, strict=True)], T975_3)
    assert hi < MARGIN and f"{hi:+.2f}]" in claims["4"].statistics


def test_claims_fail_or_are_undecided_when_the_data_do_not_show_them() -> None:
    # GN 3 points worse at N=4 only: flatness is not shown (one N suffices to fail).
    claims = decide(_records(gn_at_4=3.0))
    assert claims[2].verdict is False and "N=4: mean d +3.00" in claims[2].statistics
    # LN better than GN on one seed by enough that the interval reaches below 0.
    assert decide(_records(ln=(2.0, -3.0, 2.5, 0.1)))[4].verdict is False
    # Without GN at N=8 flatness cannot be decided; without BN at all, claims 1, 2 and 4 neither.
    partial = [r for r in _records() if not (r["spec"]["norm"] == "gn" and r["spec"]["batch"] == 8)]
    assert decide(partial)[2].verdict is None
    no_bn = [r for r in _records() if r["spec"]["norm"] != "bn"]
    assert [c.verdict for c in decide(no_bn)][:4] == [None, None, True, None]


@pytest.mark.parametrize("keep", [1, 3])
def test_claims_pair_by_seed_and_need_two(keep: int) -> None:
    # BN at N=2 only for seeds 0..keep-1: the claim uses just the common seeds (one is none).
    recs = [
        r
        for r in _records()
        if not (r["spec"]["norm"] == "bn" and r["spec"]["batch"] == 2 and r["spec"]["seed"] >= keep)
    ]
    first = decide(recs)[0]
    assert first.verdict is (None if keep < 2 else True)
    if keep == 3:
        assert first.diffs["d"] == {0: 5.0, 1: 6.0, 2: 7.0}
