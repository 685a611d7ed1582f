"""Session hooks: the tolerance report (``GROUPNORM_TOLERANCE_LOG``, see tests/_tolerances.py);
the ``without_fused_kernel`` and ``register`` fixtures."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from groupnorm import dispatch
from groupnorm.backends import cpu_kernel


@pytest.fixture
def without_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend's own CPU paths (torch's kernel checked, sums, shifted), as on a
    machine where the fused CPU kernel is not built: tests of those paths use this."""
    monkeypatch.setattr(cpu_kernel, "library", lambda: None)


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch) -> Callable[[dispatch.Backend], None]:
    """``dispatch.register_backend`` for one test: the registry (its priority order and the
    backends auto asks first) as it was is restored afterwards."""
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    monkeypatch.setattr(dispatch, "_BY_PRIORITY", list(dispatch._BY_PRIORITY))
    monkeypatch.setattr(dispatch, "_FIRST", dict(dispatch._FIRST))
    return dispatch.register_backend


def pytest_sessionstart(session: pytest.Session) -> None:
    path = os.environ.get("GROUPNORM_TOLERANCE_LOG")
    if path:
        Path(path).write_text("")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Per dtype: how many checks ran and the largest fraction of its allowance one used."""
    path = os.environ.get("GROUPNORM_TOLERANCE_LOG")
    if not path or not Path(path).exists():
        return
    worst: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        counts[rec["dtype"]] = counts.get(rec["dtype"], 0) + 1
        if rec["fraction"] > worst.get(rec["dtype"], {"fraction": -1.0})["fraction"]:
            worst[rec["dtype"]] = rec
    terminalreporter.section("worst fraction of the tolerance allowance, per dtype")
    for dtype, rec in sorted(worst.items()):
        terminalreporter.write_line(
            f"{dtype:16s} {rec['fraction']:8.3f}  over {counts[dtype]:5d} checks; "
            f"worst: {rec['test']} ({rec['what']})"
        )
