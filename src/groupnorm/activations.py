"""The fused activations: one table of names, torch functions and Triton kernel codes.

Every backend and argument check reads this table; the float64 reference implements each
activation independently in NumPy (it is the test oracle, not a consumer of this table).

| name   | act(u)                       | Triton ``ACT`` code |
|--------|------------------------------|---------------------|
| None   | u                            | 0                   |
| "silu" | u * sigmoid(u)               | 1                   |
| "gelu" | u * Phi(u) (exact erf form)  | 2                   |
| "relu" | max(u, 0), NaN propagates    | 3                   |

:class:`SiLUGrad` is SiLU's derivative for backwards that are themselves recorded: its own
derivative takes ``1 - sigmoid(u)`` as ``sigmoid(-u)`` (torch's SiLU double backward forms the
difference, 6.6e-13 off relatively at u = 9, 3.6e-8 at u = 20).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "SiLUGrad",
    "apply_activation",
    "check_activation",
    "triton_code",
]


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


def _silu_derivatives(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU's first and second derivatives at u, with ``1 - sigmoid(u)`` as ``sigmoid(-u)``:
    the difference loses ``exp(u)`` ulps relatively where u is large, the second derivative
    (about ``(2 - u) exp(-u)`` there) all of them."""
    s, c = torch.sigmoid(u), torch.sigmoid(-u)
    return s * (1 + u * c), s * c * (2 + u * (c - s))


class SiLUGrad(torch.autograd.Function):
    """``dy silu'(u)`` (aten's silu_backward), differentiable with :func:`_silu_derivatives`:
    a recorded SiLU backward (``create_graph=True``) whose derivative in u is accurate."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.ops.aten.silu_backward(dy, u)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        dy, u = ctx.saved_tensors
        d1, d2 = _silu_derivatives(u)
        return g * d1, g * dy * d2

    @staticmethod
    def jvp(ctx: Any, ddy: torch.Tensor | None, du: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        dy, u = ctx.saved_tensors
        d1, d2 = _silu_derivatives(u)
        out = torch.zeros_like(u) if ddy is None else ddy * d1
        return out if du is None else out + dy * d2 * du


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """act(y) elementwise, in y's dtype; identity for None."""
    fn = ACTIVATIONS[activation].torch_fn
    return y if fn is None else fn(y)


def triton_code(activation: str | None) -> int:
    """The ``ACT`` constexpr of the Triton kernels for this activation."""
    return ACTIVATIONS[activation].triton_code
