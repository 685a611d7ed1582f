"""The study's pre-registered protocol: its claims, their tests and thresholds, fixed in code
before the real run and reported whatever the outcome.

Every claim is decided from ``results.jsonl`` alone: test error (%) of runs evaluated on the test
set, paired by seed (runs of one seed share their training images and their initialization
seed), over the seeds every compared cell has. Intervals are Student's t over seeds
(:mod:`groupnorm.study.intervals`); each claim is judged on its own at the 5 % level (no
correction for the six claims: a reader can apply one from the printed statistics).

1. **BN degrades at small batches**: d = BN(N=2) - BN(N=32); holds if the 95 % CI of mean d lies
   above 0.
2. **GN does not, and that is the difference**: d = (BN(2) - BN(32)) - (GN(2) - GN(32)); holds if
   the 95 % CI lies above 0.
3. **GN is flat across N**: for each N in 16, 8, 4, 2, d = GN(N) - GN(32); two one-sided tests
   (TOST, alpha 0.05 each) against the margin +/- :data:`MARGIN` points; holds if equivalence is
   shown at every N (the 90 % CI inside the margin at each; an intersection-union test, so no
   correction is needed).
4. **BN <= GN at N=32** (non-inferiority): d = BN(32) - GN(32); holds if the 95 % CI's upper end
   is below +:data:`MARGIN`.
5. **GN < LN at N=32**: d = LN(32) - GN(32); holds if the 95 % CI lies above 0.
6. **GN < IN at N=32**: d = IN(32) - GN(32); holds if the 95 % CI lies above 0.

A claim whose cells have fewer than two common seeds is "n/a", as is claim 3 while any N is
missing. The GN arm is the GN setting (G, or channels per group) that was run at N=2, so a group
sweep's extra N=32 cells never enter the claims; a sweep run at N=32 alone takes the config's
GN arm (:func:`gn_setting`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from groupnorm.study.intervals import paired, tost

__all__ = ["MARGIN", "Claim", "cell_errors", "decide"]

MARGIN = 1.0  # percentage points of test error: the equivalence and non-inferiority margin
CONFIDENCE = 0.95
ALPHA = 0.05  # per one-sided test of the TOST
FLAT_BATCHES = (16, 8, 4, 2)

Cells = dict[tuple[str, int], dict[int, float]]


@dataclass(frozen=True)
class Claim:
    """One pre-registered claim: the test, its statistics and verdict (True, False or None
    when the results lack the cells), and the per-seed differences behind it (label -> seed ->
    d; the label is "d", or "N=16" etc. for the flatness claim)."""

    name: str
    test: str
    verdict: bool | None
    statistics: str
    diffs: dict[str, dict[int, float]]


def gn_setting(
    records: Sequence[dict[str, Any]], declared: tuple[str, int] | None = None
) -> tuple[str, int] | None:
    """("groups" or "group_size", value) of the GN arm the claims compare and the report's
    tables show: the GN setting run at the smallest N. Where several were (a group sweep run
    at N=32 alone), ``declared``, the study config's GN arm, if it is among them; otherwise
    the one run most (ties to the larger key)."""
    runs = [r["spec"] for r in records if r["spec"]["norm"] == "gn"]
    if not runs:
        return None
    smallest = min(s["batch"] for s in runs)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for s in runs:
        if s["batch"] == smallest:
            kind = "groups" if s.get("groups") is not None else "group_size"
            counts[(kind, s[kind])] += 1
    if declared in counts:
        return declared
    return max(counts, key=lambda k: (counts[k], k))


def cell_errors(
    records: Iterable[dict[str, Any]],
    what: str = "test_error",
    declared: tuple[str, int] | None = None,
) -> Cells:
    """(arm, N) -> seed -> ``what`` for the runs evaluated on the test set; arm is "bn", "gn"
    (the GN arm's setting only, :func:`gn_setting`), "ln", "in", "syncbn", "gnws"."""
    records = [r for r in records if r.get("evaluated_on", "test") == "test"]
    gn = gn_setting(records, declared)
    out: Cells = defaultdict(dict)
    for r in records:
        s = r["spec"]
        if s["norm"] in ("gn", "gnws") and gn is not None and s.get(gn[0]) != gn[1]:
            continue
        if what in r:
            out[(s["norm"], int(s["batch"]))][int(s["seed"])] = float(r[what])
    return dict(out)


def _diffs(
    cells: Cells, plus: Sequence[tuple[str, int]], minus: Sequence[tuple[str, int]]
) -> dict[int, float] | None:
    """Per seed: sum of the ``plus`` cells minus sum of the ``minus`` cells, over the seeds all
    of them have; None if a cell is missing."""
    involved = [*plus, *minus]
    if any(c not in cells for c in involved):
        return None
    seeds = sorted(set.intersection(*(set(cells[c]) for c in involved)))
    return {s: sum(cells[c][s] for c in plus) - sum(cells[c][s] for c in minus) for s in seeds}


MISSING = "needs every cell involved, with 2+ common seeds"


def _ci(d: dict[int, float]) -> tuple[str, float, float]:
    """The statistics line of a paired 95 % interval, and its ends."""
    ci = paired(list(d.values()), CONFIDENCE)
    text = (
        f"mean d = {ci.mean:+.2f} points over {ci.n} seeds, t = {ci.t:.2f} (df {ci.n - 1}), "
        f"95 % CI [{ci.lo:+.2f}, {ci.hi:+.2f}]"
    )
    return text, ci.lo, ci.hi


def _above_zero(name: str, test: str, d: dict[int, float] | None) -> Claim:
    if d is None or len(d) < 2:
        return Claim(name, test, None, MISSING, {"d": d or {}})
    text, lo, _ = _ci(d)
    return Claim(name, test, lo > 0, text, {"d": d})


def decide(
    records: Iterable[dict[str, Any]], declared: tuple[str, int] | None = None
) -> list[Claim]:
    """The six pre-registered claims, decided from the run records (``declared``: the study
    config's GN arm, see :func:`gn_setting`)."""
    cells = cell_errors(records, declared=declared)
    bn2, bn32, gn2, gn32 = ("bn", 2), ("bn", 32), ("gn", 2), ("gn", 32)
    claims = [
        _above_zero(
            "1. BN degrades at N=2",
            "d = BN(2) - BN(32) per seed; holds if the 95 % CI lies above 0",
            _diffs(cells, [bn2], [bn32]),
        ),
        _above_zero(
            "2. BN's degradation exceeds GN's (interaction)",
            "d = (BN(2) - BN(32)) - (GN(2) - GN(32)) per seed; holds if the 95 % CI lies above 0",
            _diffs(cells, [bn2, gn32], [bn32, gn2]),
        ),
    ]
    flat_test = (
        f"d = GN(N) - GN(32) per seed for N = {', '.join(map(str, FLAT_BATCHES))}; TOST with "
        f"margin +/-{MARGIN:g} points, alpha {ALPHA:g} per side; holds if equivalent at every N"
    )
    parts: list[str] = []
    verdicts: list[bool | None] = []
    flat_d: dict[str, dict[int, float]] = {}
    for n in FLAT_BATCHES:
        d = _diffs(cells, [("gn", n)], [gn32])
        if d is None or len(d) < 2:
            parts.append(f"N={n}: missing")
            verdicts.append(None)
            continue
        t = tost(list(d.values()), MARGIN, ALPHA)
        parts.append(
            f"N={n}: mean d {t.mean:+.2f}, 90 % CI [{t.lo:+.2f}, {t.hi:+.2f}], t_lo "
            f"{t.t_lo:.2f}, t_hi {t.t_hi:.2f} (df {t.n - 1}), p {t.p:.3f} "
            f"({'equivalent' if t.equivalent else 'not shown'})"
        )
        verdicts.append(t.equivalent)
        flat_d[f"N={n}"] = d
    flat = None if None in verdicts else all(bool(v) for v in verdicts)
    claims.append(Claim("3. GN is flat across N", flat_test, flat, "; ".join(parts), flat_d))
    d = _diffs(cells, [bn32], [gn32])
    test = f"d = BN(32) - GN(32) per seed; holds if the 95 % CI's upper end < +{MARGIN:g}"
    if d is None or len(d) < 2:
        claims.append(Claim("4. BN <= GN at N=32", test, None, MISSING, {"d": d or {}}))
    else:
        text, _, hi = _ci(d)
        claims.append(Claim("4. BN <= GN at N=32", test, hi < MARGIN, text, {"d": d}))
    for k, other in (("5", "ln"), ("6", "in")):
        claims.append(
            _above_zero(
                f"{k}. GN < {other.upper()} at N=32",
                f"d = {other.upper()}(32) - GN(32) per seed; holds if the 95 % CI lies above 0",
                _diffs(cells, [(other, 32)], [gn32]),
            )
        )
    return claims
