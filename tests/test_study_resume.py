"""A study killed mid-run resumes without repeating or losing a finished run, and its results
file never holds a half-written record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groupnorm.cli import main
from groupnorm.study.config import PRESETS
from groupnorm.study.results import RESULTS, append_result, read_results, repair
from groupnorm.study.runner import plan_runs

ARGS = ["study", "--preset", "tiny", "--no-progress"]
STUDY = [sys.executable, "-m", "groupnorm.cli", *ARGS]


def _lines(out: Path) -> list[bytes]:
    data = (out / RESULTS).read_bytes()
    assert data.endswith(b"\n"), "the results file ends in a half-written line"
    return data.splitlines()


@pytest.mark.slow
def test_kill_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = subprocess.Popen(
        [*STUDY, "--out", str(out), "--jobs", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Not a speed bound: only a guard against a hung child (a tiny run takes seconds alone,
        # minutes on a loaded 2-core machine).
        deadline = time.monotonic() + 900
        while not (out / RESULTS).exists() or not (out / RESULTS).read_bytes().count(b"\n"):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the study wrote no result in 15 min: hung?"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way through the next run
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    before = _lines(out)
    planned = [s.key for s in plan_runs(PRESETS["tiny"])]
    assert 1 <= len(before) < len(planned), "the kill must land between the first and last run"
    first = [json.loads(line)["key"] for line in before]

    # A torn record, as a crash during a write would leave: ignored on read, cut on resume.
    with open(out / RESULTS, "ab") as f:
        f.write(b'{"key": "bn-N2-s9", "test_err')
    assert [r["key"] for r in read_results(out)] == first

    # Resume in this process, with two worker processes (the pool path).
    assert main([*ARGS, "--out", str(out), "--jobs", "2"]) == 0
    after = _lines(out)
    keys = [json.loads(line)["key"] for line in after]
    assert after[: len(before)] == before, "finished runs were rewritten"
    assert sorted(keys) == sorted(planned), "a run was lost or repeated"
    assert len(set(keys)) == len(keys)
    assert (out / "report.md").exists() and (out / "batch_size.png").stat().st_size > 0

    # Everything done: a third call trains nothing and changes nothing.
    assert main([*ARGS, "--out", str(out)]) == 0
    assert _lines(out) == after


def test_resume_with_another_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(PRESETS["tiny"].to_json()))
    assert main([*ARGS, "--out", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err
    assert "train.epochs: 2 in config.json, 3 now" in err
    assert not (out / RESULTS).exists()


def test_torn_tail_is_repaired(tmp_path: Path) -> None:
    append_result(tmp_path, {"key": "a", "test_error": 1.0})
    append_result(tmp_path, {"key": "b", "test_error": 2.0})
    whole = (tmp_path / RESULTS).read_bytes()
    with open(tmp_path / RESULTS, "ab") as f:
        f.write(b'{"key": "c", "te')
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "b"]
    assert repair(tmp_path) == len(b'{"key": "c", "te')
    assert (tmp_path / RESULTS).read_bytes() == whole
    append_result(tmp_path, {"key": "c", "test_error": 3.0})
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "b", "c"]


def test_report_needs_results(tmp_path: Path) -> None:
    from groupnorm.study.report import render_report

    with pytest.raises(ValueError, match="holds no finished runs"):
        render_report(tmp_path)


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    append_result(tmp_path, {"key": "a", "test_error": 1.0})
    with open(tmp_path / RESULTS, "ab") as f:
        f.write(b"not json\n")
    append_result(tmp_path, {"key": "b", "test_error": 2.0})
    with pytest.raises(ValueError, match=r"line 2: not a run record"):
        read_results(tmp_path)
