"""A study killed mid-run resumes without repeating or losing a finished run, and its results
file never holds a half-written record."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from groupnorm.cli import main
from groupnorm.study.config import PRESETS
from groupnorm.study.results import RESULTS, append_result, read_results, repair
from groupnorm.study.runner import RUNNING, only_writer, plan_runs

ARGS = ["study", "--preset", "tiny", "--no-progress"]
STUDY = [sys.executable, "-m", "groupnorm.cli", *ARGS]


def _record(key: str, error: float = 1.0, seed: int | None = None) -> dict[str, Any]:
    """A run record with the fields read_results needs; its seed from the key's order."""
    seed = "abcdefgh".index(key) if seed is None else seed
    spec = {"norm": "bn", "batch": 2, "seed": seed, "groups": None, "group_size": None}
    return {"key": key, "spec": spec, "test_error": error, "train_error": error}


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
    append_result(tmp_path, _record("a", 1.0))
    append_result(tmp_path, _record("b", 2.0))
    whole = (tmp_path / RESULTS).read_bytes()
    with open(tmp_path / RESULTS, "ab") as f:
        f.write(b'{"key": "c", "te')
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "b"]
    assert repair(tmp_path) == len(b'{"key": "c", "te')
    assert (tmp_path / RESULTS).read_bytes() == whole
    append_result(tmp_path, _record("c", 3.0))
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "b", "c"]


def test_report_needs_results(tmp_path: Path) -> None:
    from groupnorm.study.report import render_report

    with pytest.raises(ValueError, match="holds no finished runs"):
        render_report(tmp_path)


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    append_result(tmp_path, _record("a", 1.0))
    with open(tmp_path / RESULTS, "ab") as f:
        f.write(b"not json\n")
    append_result(tmp_path, _record("b", 2.0))
    with pytest.raises(ValueError, match=r"line 2: not a run record"):
        read_results(tmp_path)


def test_regression_a_run_recorded_twice_is_an_error(tmp_path: Path) -> None:
    """Two studies on one folder recorded every run twice, and the report counted the copies
    as seeds (BN at N=2: 90.6 +- 3.9 over "6 seeds" where 3 gave +- 10.3)."""
    for key in ("a", "b", "a"):
        append_result(tmp_path, _record(key))
    with pytest.raises(ValueError, match=r"records a more than once"):
        read_results(tmp_path)


def test_regression_a_second_study_on_one_folder_is_refused(tmp_path: Path) -> None:
    with only_writer(tmp_path):
        assert (tmp_path / RUNNING).read_text() == str(os.getpid())
        with pytest.raises(FileExistsError, match=f"process {os.getpid()}"), only_writer(tmp_path):
            pass
    assert not (tmp_path / RUNNING).exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / RUNNING).write_text(str(gone.pid))  # left by a process that has ended
    with only_writer(tmp_path):
        assert (tmp_path / RUNNING).read_text() == str(os.getpid())


def test_regression_a_diverged_run_leaves_the_others_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose loss diverged raised out of the study: in the pool every other run still
    trained and was thrown away, and the resume diverged again."""
    from groupnorm.study import runner

    real = runner.train_run

    def one_diverges(spec: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if spec.key == "bn-N2-s1":
            raise FloatingPointError(f"{spec.key}: loss is nan at step 3")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "train_run", one_diverges)
    out = tmp_path / "one"
    assert main([*ARGS, "--out", str(out), "--jobs", "1"]) == 2
    assert "1 run(s) failed and were not recorded (bn-N2-s1: loss is nan" in capsys.readouterr().err
    planned = {s.key for s in plan_runs(PRESETS["tiny"])}
    assert {r["key"] for r in read_results(out)} == planned - {"bn-N2-s1"}
    assert not (out / RUNNING).exists()
    # In worker processes: every run diverges at this learning rate, each is reported.
    out = tmp_path / "pool"
    assert main([*ARGS, "--out", str(out), "--jobs", "2", "--lr", "1e6"]) == 2
    assert f"{len(planned)} run(s) failed" in capsys.readouterr().err
    assert read_results(out) == []


def test_regression_a_whole_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    """A last line that was a whole record but lacked its newline (a hand edit) was taken for a
    torn write: left out of the report and cut off on resume, without a word."""
    append_result(tmp_path, _record("a"))
    with open(tmp_path / RESULTS, "ab") as f:
        f.write(json.dumps(_record("b")).encode())
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "b"]
    assert repair(tmp_path) == 0
    assert (tmp_path / RESULTS).read_bytes().endswith(b"}\n")
    append_result(tmp_path, _record("c"))
    assert [r["key"] for r in read_results(tmp_path)] == ["a", "b", "c"]


def test_regression_one_run_under_two_keys_is_an_error(tmp_path: Path) -> None:
    """Duplicates were found by key alone: a run copied under another key counted as a second
    seed and narrowed its cell's interval."""
    append_result(tmp_path, _record("a", seed=0))
    append_result(tmp_path, _record("b", seed=0))
    with pytest.raises(ValueError, match=r"records one run .* as both a and b"):
        read_results(tmp_path)


def test_regression_a_record_without_its_spec_is_refused_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record without ``spec`` crashed ``--report`` with a KeyError traceback."""
    append_result(tmp_path, {"key": "a", "test_error": 1.0, "train_error": 1.0})
    assert main(["study", "--report", str(tmp_path)]) == 2
    assert "line 1: not a run record" in capsys.readouterr().err


def test_regression_results_without_their_config_are_refused(tmp_path: Path) -> None:
    """With config.json gone, a study with other options reused the old results as its own."""
    from groupnorm.study.runner import prepare

    append_result(tmp_path, _record("a"))
    with pytest.raises(ValueError, match="holds finished runs but .*config.json is missing"):
        prepare(PRESETS["tiny"], tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--train-size", "3"], "at least"),
        (["--workers", "1000"], r"needs 4000 training images, and each run has 256"),
    ],
)
def test_regression_a_refused_study_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], match: str
) -> None:
    """config.json was written before the data and the step size were checked, so the
    corrected command was refused as "a different configuration"; a step larger than a run's
    images failed only inside each run, after the others had trained."""
    out = tmp_path / "study"
    assert main([*ARGS, "--out", str(out), *options]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


def _fails_first_at_n4(spec: Any) -> dict[str, Any]:
    """A worker's run that leaves a mark when it starts; bn-N4-s0 fails."""
    from groupnorm.study import runner

    (Path(os.environ["GROUPNORM_TEST_MARKS"]) / spec.key).touch()
    if spec.key == "bn-N4-s0" and os.environ.get("GROUPNORM_TEST_FAIL") == "1":
        raise RuntimeError(f"{spec.key}: broken")
    return runner._worker_run(spec)


def test_regression_a_failed_run_in_the_pool_cancels_the_rest_and_keeps_the_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that failed with any error but divergence let every queued run train, then threw
    away all of them: the study stopped with only the runs recorded before the failure."""
    from groupnorm.study import runner

    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("GROUPNORM_TEST_MARKS", str(marks))
    monkeypatch.setenv("GROUPNORM_TEST_FAIL", "1")
    monkeypatch.setattr(runner, "_worker_run", _fails_first_at_n4)
    out = tmp_path / "study"
    with pytest.raises(RuntimeError, match="bn-N4-s0: broken"):
        main([*ARGS, "--out", str(out), "--jobs", "2"])
    started = {p.name for p in marks.iterdir()} - {"bn-N4-s0"}
    assert {r["key"] for r in read_results(out)} == started
    assert len(started) + 1 < len(plan_runs(PRESETS["tiny"])), "queued runs were not cancelled"
    assert not (out / RUNNING).exists()

    # Recording a run fails (a full disk, say): the same, the error raised once all stopped.
    monkeypatch.setenv("GROUPNORM_TEST_FAIL", "0")
    for p in marks.iterdir():
        p.unlink()
    real = runner.append_result

    def disk_full(out: Path, record: dict[str, Any]) -> None:
        if record["key"] == "bn-N2-s0":
            raise OSError("no space left on device")
        real(out, record)

    monkeypatch.setattr(runner, "append_result", disk_full)
    out = tmp_path / "full"
    assert main([*ARGS, "--out", str(out), "--jobs", "2"]) == 2
    assert len({p.name for p in marks.iterdir()}) < len(plan_runs(PRESETS["tiny"]))


@pytest.mark.slow
def test_regression_a_tuned_run_prints_its_validation_error_as_val(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under --tune each finished run's progress line read "gn-G16-N4-s100: test 84.4 %" for
    the error on the validation split (its record says "evaluated_on": "val")."""
    out = tmp_path / "tune"
    tune = ["--tune", "--val-size", "64", "--seeds", "1", "--epochs", "1", "--jobs", "1"]
    assert main([*ARGS, *tune, "--norms", "gn", "--batches", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (record,) = read_results(out)
    assert record["evaluated_on"] == "val"
    assert re.search(rf"gn-G16-N4-s100: val +{record['test_error']:.1f} %", printed), printed
    assert "s100: test" not in printed


def test_regression_ctrl_c_prints_one_line_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C, the documented way to pause a study, ended in a 25-line KeyboardInterrupt
    traceback (through concurrent.futures.wait, or the matplotlib import of the report)
    that did not say the finished runs were kept."""
    from groupnorm.study import cli

    out = tmp_path / "study"

    def one_run_then_ctrl_c(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        out.mkdir()
        append_result(out, _record("a"))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_study", one_run_then_ctrl_c)
    assert main([*ARGS, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err == (
        f"groupnorm study: interrupted: 1 run saved in {out}; rerun the same command to resume\n"
    )


@pytest.mark.slow
def test_regression_ctrl_c_stops_the_pool_without_training_the_queued_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C with --jobs 2 left the process pool's ``with`` block, which waits for the pool's
    work: every queued run still trained (16 of 16 started, in the tiny preset at 4 seeds),
    none of them recorded, before the study exited; a full study would have run on for hours
    after the Ctrl-C."""
    from groupnorm.study import runner

    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("GROUPNORM_TEST_MARKS", str(marks))
    monkeypatch.setenv("GROUPNORM_TEST_FAIL", "0")
    monkeypatch.setattr(runner, "_worker_run", _fails_first_at_n4)
    real = runner._as_finished

    def interrupted_after_the_first(pending: Any) -> Any:
        finished = real(pending)
        yield next(finished)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_as_finished", interrupted_after_the_first)
    out = tmp_path / "study"
    options = ["--out", str(out), "--jobs", "2", "--seeds", "4", "--epochs", "1"]
    assert main([*ARGS, *options]) == 130
    saved = len(read_results(out))
    assert f"interrupted: {saved} run" in capsys.readouterr().err
    planned = len(plan_runs(PRESETS["tiny"])) * 2
    started = len(list(marks.iterdir()))
    # The finished ones, the two running and those already handed to a worker, no more.
    assert saved >= 1 and started <= saved + 5 < planned, (saved, started, planned)
    assert not (out / RUNNING).exists()


def test_regression_a_finished_study_loaded_its_data_to_run_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-running a study whose every run was recorded fetched and loaded the data set (and
    checked every run's step against it) before finding nothing left to run: on Fashion-MNIST
    or CIFAR a load that trains nothing, and a refusal where the data is gone."""
    from groupnorm.study import runner

    cfg = PRESETS["tiny"]
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_json()))
    for spec in plan_runs(cfg):
        append_result(
            out, {"key": spec.key, "spec": asdict(spec), "test_error": 1.0, "train_error": 1.0}
        )
    before = (out / RESULTS).read_bytes()

    def no_data(*args: Any) -> None:
        raise AssertionError("the data was loaded for a study with nothing left to run")

    monkeypatch.setattr(runner, "load_dataset", no_data)
    monkeypatch.setattr(runner, "fetch", no_data)
    records = runner.run_study(cfg, out, progress=False)
    assert [r["key"] for r in records] == [s.key for s in plan_runs(cfg)]
    assert (out / RESULTS).read_bytes() == before
    # One run missing: the data is needed again.
    (out / RESULTS).write_bytes(b"".join(before.splitlines(keepends=True)[:-1]))
    with pytest.raises(AssertionError, match="the data was loaded"):
        runner.run_study(cfg, out, progress=False)
