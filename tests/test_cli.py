"""The CLI as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from groupnorm.cli import SIGPIPE_STATUS, main


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


@pytest.mark.slow
@pytest.mark.parametrize("command", ["demo", "check"])
def test_regression_a_closed_pipe_ends_quietly(command: str) -> None:
    """`groupnorm demo | head -1` and `groupnorm check | head -2` ended in a BrokenPipeError
    traceback (demo with status 1)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line written as printed, as on a tty
    with subprocess.Popen(
        [sys.executable, "-m", "groupnorm.cli", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"=" if command == "demo" else b"groupnorm ")
        proc.stdout.close()  # the reader goes away, like head after its lines
        err = proc.stderr.read().decode()
        assert proc.wait() == SIGPIPE_STATUS, err
    assert err == ""


@pytest.mark.slow
def test_regression_a_closed_pipe_under_study_is_not_an_error() -> None:
    """``groupnorm study`` reported a reader gone from its stdout (`study --report DIR | head
    -1`) as "groupnorm study: error: [Errno 32] Broken pipe", status 2: its handler of bad
    --out and data paths caught every OSError."""
    code = (
        "import sys\n"
        "from groupnorm.study import cli\n"
        "def gone(args): raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli._run = gone\n"
        "from groupnorm.cli import main\n"
        "sys.exit(main(['study', '--report', 'runs']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (SIGPIPE_STATUS, "")
