"""The report from results alone: tables with CIs and the paper's numbers, the pre-registered
claims, the controls, the seeds and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from groupnorm.study.config import PRESETS
from groupnorm.study.report import render_report
from groupnorm.study.results import append_result

T2 = 4.302652729749752  # t_{0.975, 2}


def _record(
    norm: str,
    batch: int,
    seed: int,
    test: float,
    train: float,
    groups: int | None = None,
    group_size: int | None = None,
    **extra: object,
) -> dict[str, object]:
    spec = {"norm": norm, "batch": batch, "seed": seed, "groups": groups, "group_size": group_size}
    key = f"{norm}-{groups}-{group_size}-N{batch}-s{seed}"
    return {
        "key": key,
        "spec": spec,
        "test_error": test,
        "train_error": train,
        "seconds": 1.0,
        "running_train_error_per_epoch": [train],
        **extra,
    }


def _write(out: Path, gn_spread: float) -> None:
    out.mkdir()
    (out / "config.json").write_text(json.dumps(PRESETS["quick"].to_json()))
    for seed, d in enumerate((-1.0, 0.0, 1.0)):  # per-cell sd 1 -> half-width T2/sqrt(3)
        for n, bn in ((32, 20.0), (8, 22.0), (2, 30.0)):
            pop: dict[str, Any] = {
                "pop_test_error": bn + d - 1 - seed
            }  # population statistics: 1-3 better
            append_result(out, _record("bn", n, seed, bn + d, bn - 3 + d, **pop))
        append_result(out, _record("syncbn", 2, seed, 20.5 + 0.5 * seed, 17.0))
        for n, gn in ((32, 21.0), (8, 21.0 + gn_spread / 2), (2, 21.0 + gn_spread)):
            append_result(out, _record("gn", n, seed, gn + d, gn - 4 + d, groups=16))
        append_result(out, _record("ln", 32, seed, 23.0 + d, 20.0 + d))
        append_result(out, _record("in", 32, seed, 35.0 + d, 30.0 + d))
        for g in (1, 2, 4, 8, 32):  # G=16 at N=32 is the GN arm's cell above (one run)
            append_result(out, _record("gn", 32, seed, 21.0 + g / 32 + d, 18.0, groups=g))


@pytest.mark.slow
def test_report_tables_checks_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "study"
    _write(out, gn_spread=1.0)
    text = render_report(out)
    hw = T2 / math.sqrt(3)
    assert f"| BN | 20.0 ± {hw:.1f} | 22.0 ± {hw:.1f} | 30.0 ± {hw:.1f} |" in text
    assert "| BN, paper | 23.6 | 24.8 | 34.7 |" in text
    assert "| GN, paper | 24.1 | 24.0 | 24.1 |" in text
    assert "| IN, paper | 28.4 |" in text
    assert f"| BN | 17.0 ± {hw:.1f} |" in text  # train error table
    assert "| G | 32 | 16 | 8 | 4 | 2 | 1 |" in text
    assert "| paper (ImageNet) | 24.1 | 24.6 | 24.4 | 24.6 | 24.7 | 25.3 |" in text
    # BN at 2 minus 32 is 10 on every seed (sd 0: t infinite, the interval a point).
    assert "**HOLDS** 1. BN degrades at N=2" in text
    assert "mean d = +10.00 points over 3 seeds" in text
    assert "Per-seed d: s0 +10.00, s1 +10.00, s2 +10.00." in text
    assert "**HOLDS** 3. GN is flat across N" not in text  # GN has no N=16 or 4: undecided
    assert "**n/a** 3. GN is flat across N" in text and "N=16: missing" in text
    assert "**HOLDS** 5. GN < LN at N=32" in text and "**HOLDS** 6. GN < IN at N=32" in text
    # Controls: population statistics 1, 2, 3 points better per seed -> mean -2, CI +/- T2/sqrt 3.
    lo, hi = -2 - T2 / math.sqrt(3), -2 + T2 / math.sqrt(3)
    assert (
        "BN(2), population minus running statistics (same weights): mean -2.00 points over "
        f"3 seeds, 95 % CI [{lo:+.2f}, {hi:+.2f}]" in text
    )
    assert "SyncBN(2) - BN(2): mean -9.00 points over 3 seeds" in text
    assert "- Reported (evaluated on the test set): [0, 1, 2]." in text
    assert "| BN (pop. stats) | 18.0 ± " in text
    for png in ("batch_size.png", "groups.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").read_text() == text


def test_regression_a_sweep_at_one_n_compares_the_configured_gn_arm(tmp_path: Path) -> None:
    """A group sweep run at N=32 alone has every G at its smallest N: the table took GN at the
    config's ``gn_groups`` (16) and the claims the tie's larger key (G=32), so each showed a
    different arm. Both take the config's arm where it was run."""
    out = tmp_path / "study"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**PRESETS["quick"].to_json(), "gn_groups": 16}))
    for seed, d in enumerate((-1.0, 0.0, 1.0)):
        append_result(out, _record("ln", 32, seed, 23.0 + d, 20.0))
        for g, gn in ((16, 21.0), (32, 30.0)):
            append_result(out, _record("gn", 32, seed, gn + d, 18.0, groups=g))
    text = render_report(out, plots=False)
    hw = T2 / math.sqrt(3)
    assert f"| GN | 21.0 ± {hw:.1f} |" in text and "GN with G=16 (" in text
    assert "**HOLDS** 5. GN < LN at N=32" in text and "mean d = +2.00 points" in text


def test_claims_not_shown_are_reported_as_such(tmp_path: Path) -> None:
    out = tmp_path / "study"
    _write(out, gn_spread=4.0)  # GN worse at N=2 than at 32
    text = render_report(out, plots=False)
    assert "**HOLDS** 2. BN's degradation exceeds GN's" in text  # 10 - 4 > 0
    assert "mean d = +6.00 points" in text
    assert "N=2: mean d +4.00, 90 % CI [+4.00, +4.00]" in text and "(not shown)" in text
    assert not (out / "batch_size.png").exists()


def test_plan_is_seed_major_and_deduplicated() -> None:
    from groupnorm.study.config import StudyConfig
    from groupnorm.study.runner import plan_runs

    cfg = StudyConfig(arms={"bn": (32, 2), "gn": (32, 2)}, seeds=(0, 1), sweep=True)
    specs = plan_runs(cfg)
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys))
    # Per seed: bn x2, gn x2 (G=16), G sweep 6 (G=16 already there), channels/group sweep 6.
    assert len(specs) == 2 * (4 + 5 + 6)
    assert [s.seed for s in specs] == [0] * 15 + [1] * 15
    assert [s.batch for s in specs[:2]] == [2, 2]  # the longest runs start first
    quick = plan_runs(PRESETS["quick"])
    assert len(quick) == 3 * 8


def test_the_report_names_the_environments_of_its_runs() -> None:
    """Runs are bitwise reproducible within one machine and software stack only: the report
    says which its runs came from, and warns when they came from several."""
    from groupnorm.study.report import _environment_sentence

    def env(cpu: str) -> dict[str, Any]:
        return {"environment": {"torch": "2.13.0", "cpu": cpu, "cpu_capability": "AVX512"}}

    assert _environment_sentence([{}]) == ""
    one = _environment_sentence([env("EPYC"), env("EPYC"), {}])
    assert one == " Runs from torch 2.13.0 on EPYC (AVX512)."
    two = _environment_sentence([env("EPYC"), env("Xeon")])
    assert "2 environments" in two and "EPYC" in two and "Xeon" in two


def test_regression_tables_show_only_the_split_their_header_names(tmp_path: Path) -> None:
    """Records evaluated on the validation split entered the test-error tables (BN at N=2 read
    56.3 ± 38.2 while its claim used the test seeds alone)."""
    out = tmp_path / "study"
    _write(out, gn_spread=1.0)
    for seed in (100, 101):
        append_result(out, _record("bn", 2, seed, 90.0, 80.0, evaluated_on="val"))
    text = render_report(out, plots=False)
    hw = T2 / math.sqrt(3)
    assert f"| BN | 20.0 ± {hw:.1f} | 22.0 ± {hw:.1f} | 30.0 ± {hw:.1f} |" in text
    assert "seeds [0, 1, 2]; 42 runs" in text  # the header counts that split too


def test_regression_a_tuned_report_labels_its_plots_and_sweeps_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under --tune (records and config evaluated on "val") report.md said "Validation error"
    but batch_size.png's panel read "test error, mean and 95 % CI over seeds" and its y axis
    "test error (%)", groups.png's legend "test" and the sweep tables' row "test error"."""
    import matplotlib.figure

    out = tmp_path / "study"
    out.mkdir()
    config = {**PRESETS["quick"].to_json(), "evaluate": "val", "val_size": 64}
    (out / "config.json").write_text(json.dumps(config))
    for seed in (100, 101):
        for n in (32, 2):
            append_result(out, _record("bn", n, seed, 20.0, 15.0, evaluated_on="val"))
        for g in (1, 16):
            append_result(out, _record("gn", 32, seed, 21.0, 16.0, groups=g, evaluated_on="val"))
    labels: dict[str, list[str]] = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig: matplotlib.figure.Figure, path: Path, **kwargs: Any) -> None:
        texts = [t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel())]
        legends = [ax.get_legend() for ax in fig.axes]
        texts += [t.get_text() for lg in legends if lg is not None for t in lg.get_texts()]
        labels[Path(path).name] = texts
        save(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    text = render_report(out)
    assert "Validation error (%)" in text
    assert "| validation error |" in text and "| test error |" not in text
    batch = labels["batch_size.png"]
    assert "validation error, mean and 95 % CI over seeds" in batch
    assert "validation error (%)" in batch and "train error (%)" in batch
    assert not [t for t in batch if "test" in t]
    assert "validation" in labels["groups.png"] and "test" not in labels["groups.png"]


def test_regression_a_tuned_report_called_its_undecided_claims_test_error_with_missing_cells(
    tmp_path: Path,
) -> None:
    """A --tune report (every run evaluated on the validation split) said the claims were on
    "test error (%)" and gave each "n/a ... needs every cell involved, with 2+ common seeds",
    claim 4 included, whose cells BN(32) and GN(32) it held with 2 seeds each: the claims are
    decided on test-split runs alone, and a tuning study has none."""
    out = tmp_path / "study"
    out.mkdir()
    config = {**PRESETS["quick"].to_json(), "evaluate": "val", "val_size": 64}
    (out / "config.json").write_text(json.dumps(config))
    for seed in (100, 101):
        for n in (32, 2):
            append_result(out, _record("bn", n, seed, 20.0 + seed, 15.0, evaluated_on="val"))
            append_result(out, _record("gn", n, seed, 21.0, 16.0, groups=16, evaluated_on="val"))
    text = render_report(out, plots=False)
    claims = text[text.index("## Pre-registered claims") : text.index("## Seeds")]
    assert "evaluated on the validation split" in claims and "no claim is decided" in claims
    assert "needs every cell" not in claims and "n/a" not in claims and "**" not in claims
    assert "- 4. BN <= GN at N=32. Test: d = BN(32) - GN(32) per seed" in claims
