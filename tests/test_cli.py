"""The CLI as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

import groupnorm
from groupnorm import cli
from groupnorm.cli import SIGPIPE_STATUS, main
from tests import _tolerances


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


def test_check_uses_the_tolerance_table() -> None:
    """The self-test's copy of the table (src cannot import tests) is the tests' table."""
    assert (cli.ATOL, cli.RTOL) == (_tolerances.ATOL, _tolerances.RTOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_check_allows_what_the_tolerance_rule_allows(dtype: torch.dtype) -> None:
    """`groupnorm check`'s per-element allowance is the tests' rule (reduction 1): atol + rtol |y|
    for float32 and float64; for half precision twice the distance of y rounded to the dtype
    (the interpreter's truncated bfloat16 where it truncates) plus atol. Only the table was
    compared before, not the formula built on it."""
    rng = np.random.default_rng(3)
    expected = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-3, 4, 200), [0.0]])
    got = cli._allowed(expected, dtype, truncates_bf16=False)
    if dtype in _tolerances.RTOL:
        atol, rtol = _tolerances.tolerance(dtype)
        want = atol + rtol * np.abs(expected)
    else:
        rounded = torch.tensor(expected, dtype=torch.float64).to(dtype).double().numpy()
        want = 2 * np.abs(rounded - expected) + _tolerances.ATOL[dtype]
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    if dtype == torch.bfloat16:
        bits = expected.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
        truncated = bits.view(np.float32).astype(np.float64)
        want = 2 * np.abs(truncated - expected) + _tolerances.ATOL[dtype]
        got = cli._allowed(expected, dtype, truncates_bf16=True)
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


def test_regression_check_judged_float32_by_a_loose_absolute_tolerance(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`groupnorm check` passed float32 outputs within 1e-5 of float64: a backend off by 5e-6
    everywhere (max abs err up to 5.3e-06) printed "ok", where the tolerance table allows
    2e-6 + 2e-6 |y| (2.0e-6 at y = 0)."""
    real = groupnorm.group_norm

    def off(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = real(x, *args, **kwargs)
        return y + 5e-6 if y.dtype == torch.float32 else y

    monkeypatch.setattr(groupnorm, "group_norm", off)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    fp32 = [line for line in out.splitlines() if "fp32" in line]
    assert fp32 and all(line.lstrip().startswith("FAIL") for line in fp32)


def test_check_fails_a_nan_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN in a backend's output fails the self-test: it cannot switch the comparison off."""
    real = groupnorm.group_norm

    def nan(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = real(x, *args, **kwargs).clone()
        y[(0,) * y.dim()] = float("nan")
        return y

    monkeypatch.setattr(groupnorm, "group_norm", nan)
    assert main(["check"]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if "max abs err" in line]
    assert rows and all(line.lstrip().startswith("FAIL") for line in rows)


def test_regression_check_listed_triton_but_ran_only_torch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`groupnorm check` listed every backend available but ran its self-test only through
    backend="auto" on CPU tensors (the torch backend): the Triton kernels went unchecked even
    where they were listed as available. Each available backend now runs every case, and an
    unavailable one is said to be unchecked."""
    real = groupnorm.group_norm
    ran: set[str] = set()

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = real(x, *args, **kwargs)
        ran.add(kwargs.get("backend", "auto"))
        return y

    monkeypatch.setattr(groupnorm, "group_norm", spy)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    available = {name for name, why in groupnorm.available_backends().items() if why is None}
    assert ran == available
    for name, why in groupnorm.available_backends().items():
        if why is None:
            assert f"{name}/cpu" in out or f"{name}/cuda" in out
        else:
            assert f"{name}: not checked, unavailable here: {why}" in out
            assert f"{name}/" not in out


@pytest.mark.parametrize("error", [ValueError("wrong plan"), RuntimeError("kernel crashed")])
def test_regression_check_took_a_failing_first_case_for_an_unserved_device(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`groupnorm check` read any ValueError of a backend's first case as "this backend does
    not serve this device" and printed a note, not FAIL (the run passed where another device
    served the backend), and any other exception ended the check in a traceback. Only the
    dispatcher's refusal of the named backend is "not checked" now; every other error fails."""
    real = groupnorm.group_norm

    def failing(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("backend") == "torch" and "num_groups" in kwargs:
            raise error
        return real(x, *args, **kwargs)

    monkeypatch.setattr(groupnorm, "group_norm", failing)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL torch/cpu fp32 NCHW G=4: {type(error).__name__}: {error}" in out
    assert "torch/cpu: not checked" not in out
