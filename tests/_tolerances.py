"""The one tolerance table: every numeric test compares against the float64 reference through it.

Per dtype, ``|actual - expected| <= atol + rtol * |expected|``, both scaled by
``sqrt(reduction / 256)`` (at least 1) for quantities that sum over ``reduction`` elements
(dgamma sums over N * L, dx over a whole group). For half precision there is a second allowance,
the DESIGN.md rule: our error may be up to twice the error of PyTorch's own same-dtype result
(``baseline``) plus atol. Where torch has no same-dtype equivalent, the baseline is the reference
rounded to the dtype (the error of a perfectly rounded result).
"""

from __future__ import annotations

import math

import numpy as np
import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def tolerance(dtype: torch.dtype, reduction: int = 1) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``, scaled for a quantity summed over ``reduction`` elements."""
    scale = max(1.0, math.sqrt(reduction / 256))
    return ATOL[dtype] * scale, RTOL[dtype] * scale


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def assert_matches(
    actual: torch.Tensor,
    expected: np.ndarray,
    dtype: torch.dtype,
    *,
    reduction: int = 1,
    baseline: torch.Tensor | None = None,
    what: str = "output",
) -> None:
    """Assert ``actual`` (any dtype or device) matches float64 ``expected`` for ``dtype`` inputs.

    NaN must match NaN and Inf must match Inf at the same positions.
    """
    got = to_numpy(actual)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    assert np.array_equal(np.isnan(got), np.isnan(expected)), f"{what}: NaN positions differ"
    assert np.array_equal(
        got[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)]
    ), f"{what}: Inf values differ"
    atol, rtol = tolerance(dtype, reduction)
    err = np.abs(got - expected)[finite]
    allowed = atol + rtol * np.abs(expected[finite])
    if dtype in (torch.float16, torch.bfloat16):
        if baseline is None:
            rounded = torch.from_numpy(expected).to(dtype).double().numpy()
        else:
            rounded = to_numpy(baseline)
        allowed = np.maximum(allowed, 2 * np.abs(rounded - expected)[finite] + atol)
    if err.size:
        worst = int(np.argmax(err - allowed))
        assert np.all(err <= allowed), (
            f"{what} ({dtype}): max error {err.max():.3e}; worst excess at flat index {worst}: "
            f"error {err[worst]:.3e} > allowed {allowed[worst]:.3e}"
        )
