"""The fused activations: one table of names, torch functions and Triton kernel codes.

Every backend and argument check reads this table; the float64 reference implements each
activation independently in NumPy (it is the test oracle, not a consumer of this table).

| name   | act(u)                       | Triton ``ACT`` code |
|--------|------------------------------|---------------------|
| None   | u                            | 0                   |
| "silu" | u * sigmoid(u)               | 1                   |
| "gelu" | u * Phi(u) (exact erf form)  | 2                   |
| "relu" | max(u, 0), NaN propagates    | 3                   |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "Activation", "apply_activation", "check_activation", "triton_code"]


class Activation(NamedTuple):
    """One fused activation: its torch function, the code the Triton kernels branch on, and
    its backward ``(dy, u) -> dy act'(u)`` where that is not exact in any dtype (relu's is a
    mask)."""

    torch_fn: Callable[[torch.Tensor], torch.Tensor] | None
    triton_code: int
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


ACTIVATIONS: dict[str | None, Activation] = {
    None: Activation(None, 0, None),
    "silu": Activation(F.silu, 1, torch.ops.aten.silu_backward),
    "gelu": Activation(F.gelu, 2, torch.ops.aten.gelu_backward),
    "relu": Activation(F.relu, 3, None),
}


def check_activation(activation: object) -> None:
    """Raise ValueError naming the accepted activations unless ``activation`` is one of them."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(
            f"activation must be one of {list(ACTIVATIONS)}, got {type(activation).__name__} "
            f"{activation!r}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """act(y) elementwise, in y's dtype; identity for None."""
    fn = ACTIVATIONS[activation].torch_fn
    return y if fn is None else fn(y)


def triton_code(activation: str | None) -> int:
    """The ``ACT`` constexpr of the Triton kernels for this activation."""
    return ACTIVATIONS[activation].triton_code
