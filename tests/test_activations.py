"""The activation table against the float64 reference's independent NumPy forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groupnorm import reference as R
from groupnorm.activations import ACTIVATIONS, apply_activation, check_activation, triton_code


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_torch_function_matches_the_reference(name: str | None) -> None:
    u = torch.linspace(-6, 6, 241, dtype=torch.float64)
    got = apply_activation(u, name).numpy()
    np.testing.assert_allclose(got, R.activation_forward(u.numpy(), name), rtol=1e-14, atol=1e-15)


def test_triton_codes_are_distinct_and_identity_is_zero() -> None:
    codes = [triton_code(name) for name in ACTIVATIONS]
    assert len(set(codes)) == len(codes) and triton_code(None) == 0


def test_unknown_activation_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"one of \[None, 'silu', 'gelu', 'relu'\], got 'tanh'"):
        check_activation("tanh")
