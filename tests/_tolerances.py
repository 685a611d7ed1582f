"""The one tolerance table: every numeric test compares against float64 through it.

Two rules, by dtype (docs/numerics.md gives the reasoning and the measured margins):

- float64 and float32: a static bound, ``|actual - expected| <= (atol + rtol * |expected|) * s``
  elementwise, with ``s = max(1, sqrt(reduction / 256))`` for quantities that sum over
  ``reduction`` elements (dgamma sums over N * L, dx over a whole group).
- float16 and bfloat16: relative to what the dtype can do,
  ``|actual - expected| <= 2 * |baseline - expected| + atol * s`` elementwise, where ``baseline``
  is PyTorch's own same-dtype result (``F.group_norm`` and its autograd) or, where torch has
  none, ``expected`` rounded to the dtype (the error of an exactly rounded result).
- float32 whole models, where our op is one of many torch ops (convolutions, attention) and the
  static bound would measure torch's float32 error rather than ours: pass ``baseline``, the same
  model in float32 with torch's own ops, and the rule is its worst element's:
  ``max |actual - expected| <= 2 * max |baseline - expected| + atol * s``.

A baseline is never one of this library's backends.

With ``GROUPNORM_TOLERANCE_LOG=<file>`` every check appends one JSON line (test, dtype, what,
and ``fraction``: the largest ``error / allowed`` over the elements), and the test session
prints the worst fraction per dtype (tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6}
HALF = (torch.float16, torch.bfloat16)


def scale(reduction: int) -> float:
    """How much a tolerance grows for a quantity summed over ``reduction`` elements."""
    return max(1.0, math.sqrt(reduction / 256))


def tolerance(dtype: torch.dtype, reduction: int = 1) -> tuple[float, float]:
    """(atol, rtol) of the static bound for float32/float64, scaled for ``reduction``."""
    if dtype in HALF:
        raise ValueError(f"{dtype} has no static bound: it is judged against a baseline")
    s = scale(reduction)
    return ATOL[dtype] * s, RTOL[dtype] * s


def to_numpy(t: torch.Tensor | None) -> np.ndarray:
    """float64 NumPy copy; None (a gradient that was never computed) is an error."""
    assert t is not None, "expected a tensor (a gradient?), got None"
    return t.detach().cpu().double().numpy()


def _log(dtype: torch.dtype, what: str, fraction: float) -> None:
    path = os.environ.get("GROUPNORM_TOLERANCE_LOG")
    if not path or not math.isfinite(fraction):
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, "dtype": str(dtype), "what": what, "fraction": fraction}))
        f.write("\n")


def assert_matches(
    actual: torch.Tensor | None,
    expected: np.ndarray | None,
    dtype: torch.dtype,
    *,
    reduction: int = 1,
    baseline: torch.Tensor | None = None,
    what: str = "output",
) -> None:
    """Assert ``actual`` (any dtype or device) matches float64 ``expected`` for ``dtype`` inputs.

    ``baseline``: torch's own same-dtype result for the same inputs (see the module's rules).
    NaN must match NaN and Inf must match Inf at the same positions. ``actual`` or ``expected``
    None (a gradient that was not computed) fails.
    """
    assert actual is not None, f"{what}: got None"
    assert expected is not None, f"{what}: expected None"
    got = to_numpy(actual)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    assert np.array_equal(np.isnan(got), np.isnan(expected)), f"{what}: NaN positions differ"
    assert np.array_equal(
        got[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)]
    ), f"{what}: Inf values differ"
    err = np.abs(got - expected)[finite]
    if dtype in HALF:
        if baseline is None:
            rounded = torch.from_numpy(expected).to(dtype).double().numpy()
        else:
            rounded = to_numpy(baseline)
        allowed = 2 * np.abs(rounded - expected)[finite] + ATOL[dtype] * scale(reduction)
    elif baseline is not None:
        assert dtype == torch.float32, "a baseline applies to float32 models and half precision"
        base_err = np.abs(to_numpy(baseline) - expected)[finite]
        worst_base = float(base_err.max()) if base_err.size else 0.0
        allowed = np.full_like(err, 2 * worst_base + ATOL[dtype] * scale(reduction))
        err = np.full_like(err, err.max() if err.size else 0.0)
    else:
        atol, rtol = tolerance(dtype, reduction)
        allowed = atol + rtol * np.abs(expected[finite])
    if err.size:
        _log(dtype, what, float(np.max(err / allowed)))
        worst = int(np.argmax(err - allowed))
        assert np.all(err <= allowed), (
            f"{what} ({dtype}): max error {err.max():.3e}; worst excess at flat index {worst}: "
            f"error {err[worst]:.3e} > allowed {allowed[worst]:.3e}"
        )
