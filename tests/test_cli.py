"""The CLI as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from groupnorm.cli import main


def test_demo_prints_the_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "0.44548731" in out and "0.4455" in out  # exact value beside the article's
    assert "differ from the exact values by up to 1.5e-04" in out
    assert "single element" in out  # the G = C = 8 warning
    assert "uneven=True: 16x2 + 16x1 (C=48)" in out
    assert "choose_num_groups(48) -> 24" in out


def test_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "torch    available" in out and "FAIL" not in out
    assert "mask= and process_group= run the torch backend's composite ops" in out


@pytest.mark.slow
def test_entry_point_runs_as_a_program() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "groupnorm.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in done.stdout and "check" in done.stdout
