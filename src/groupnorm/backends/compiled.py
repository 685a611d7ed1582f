"""The fused CPU kernel as torch.library ops: what a graph recorded by torch.compile calls.

Eager calls reach the kernel through a plain autograd Function (``torch_ops._Fused``), which
costs less per call than the custom-op machinery; a compiled graph needs ops. What other
recorded calls run, torch's kernel on pivot-shifted input (:mod:`.shifted`), is exact
forward, but torch's float32 backward sums dweight and dbias in float32 and misses the float32
bound (compiled, 26 of the 72 draws of the eager regression test, up to 2.3x). The ops:

- ``groupnorm::cpu_forward(x, weight, bias, scale, shift, sizes, eps, activation)
  -> (y, moments)``: ``y = act(u)``, ``u = (GN(x) * weight + bias) * (1 + scale) + shift``
  (SiLU or GELU, in float64 from u: the kernel's :func:`cpu_kernel.activation_forward` for
  float32) in x's dtype and memory format, and the float64 (3, N, G) mean, variance and the
  mean's low part (:func:`cpu_kernel.low_part`) used;
- ``groupnorm::cpu_backward(dy, x, weight, moments, sizes, eps, per_sample, activation,
  u_bias) -> (dx, dw, db)``: dy through the activation's derivative at u recomputed from x
  in float64, then :func:`cpu_kernel.backward`: dx and the float64 per-channel sums of
  dy * xhat and of dy.

Like the eager Function, a graph keeps x and the statistics for the backward, not u: an
x-sized tensor less per layer with an activation.

The forward's registered autograd calls the backward op and assembles the parameters'
gradients from its sums in float64, as the eager Function does (:func:`torch_ops.kernel_grads`).
Each op is one node of Dynamo's graph; AOTAutograd records the assembly's few (N, C) ops.

Whether the kernel is built cannot be asked while Dynamo traces (building it is file and
process I/O), so the ops ask when they run; where it is not built (no C compiler,
``GROUPNORM_CPU_KERNEL=0``) they compute the same results with float64 torch ops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from groupnorm.activations import apply_activation
from groupnorm.backends import cpu_kernel
from groupnorm.backends.torch_ops import (
    KernelSums,
    _backward64,
    _expand,
    _shifted,
    _spread_groups,
    _stats_of_shifted,
    _u_bias,
    activation_backward64,
    affine64,
    kernel_grads,
)
from groupnorm.groups import GroupPlan

__all__ = ["cpu_backward", "cpu_forward"]

# A plain dict rather than lru_cache: the ops run once per call, plans are few.
_PLANS: dict[tuple[int, ...], GroupPlan] = {}


def _plan(sizes: list[int]) -> GroupPlan:
    key = tuple(sizes)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = GroupPlan(key)
    return plan


def _moments64(x: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """float64 (3, N, G): each group's mean, biased variance and the mean's low part, from the
    composite path's pivot-shifted statistics formed in float64."""
    stats = _stats_of_shifted(*_shifted(x, plan, None, torch.float64), plan)
    mean, lo = cpu_kernel.low_part(stats.pivot, stats.shifted_mean)
    return torch.stack((mean, stats.m2 / stats.count, lo))


def _centered64(x64: torch.Tensor, moments: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """x - mean in float64, the mean's two parts subtracted in turn ((2, N, G) moments: no low
    part)."""
    nd = x64.dim()
    centered = x64 - _spread_groups(moments[0], plan, nd)
    return centered - _spread_groups(moments[2], plan, nd) if len(moments) > 2 else centered


def _xhat64(x64: torch.Tensor, moments: torch.Tensor, plan: GroupPlan, eps: float) -> torch.Tensor:
    rstd = (moments[1] + eps).rsqrt()
    return _centered64(x64, moments, plan) * _spread_groups(rstd, plan, x64.dim())


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's dtype and in the memory format the kernel writes (``empty_like(x)``'s)."""
    return torch.empty_like(x).copy_(y)


@torch.library.custom_op("groupnorm::cpu_forward", mutates_args=())
def cpu_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045  (torch's schema inference needs Optional)
    bias: Optional[torch.Tensor],  # noqa: UP045
    scale: Optional[torch.Tensor],  # noqa: UP045
    shift: Optional[torch.Tensor],  # noqa: UP045
    sizes: list[int],
    eps: float,
    activation: Optional[str],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, moments)`` of float32/float64 x (N, C, *S), NCHW- or channels-last-contiguous:
    weight and bias (C,), scale and shift (N, C), any float dtype or None; ``activation`` None,
    "silu" or "gelu", applied in float64 to u, the output before it."""
    plan = _plan(sizes)
    s64, h64 = (None if t is None else t.double().contiguous() for t in (scale, shift))
    if cpu_kernel.serves(x):
        w, b = (None if t is None else t.contiguous() for t in (weight, bias))
        u, moments = cpu_kernel.forward(x, plan, w, b, eps, want_moments=True, scale=s64, shift=h64)
        assert moments is not None
        if activation is None:
            return u, moments
        y = cpu_kernel.activation_forward(u, activation)  # float32 u
        if y is None:
            y = _like(apply_activation(u.double(), activation), x)
        return y, moments
    moments = _moments64(x, plan)
    y = affine64(_xhat64(x.double(), moments, plan, eps), weight, bias, s64, h64)
    return _like(y if activation is None else apply_activation(y, activation), x), moments


@cpu_forward.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    sizes: list[int],
    eps: float,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    moments = x.new_empty((3, x.shape[0], len(sizes)), dtype=torch.float64)
    return torch.empty_like(x), moments


def _through_activation(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    moments: torch.Tensor,
    plan: GroupPlan,
    eps: float,
    per_sample: bool,
    activation: str,
    u_bias: torch.Tensor | None,
) -> torch.Tensor:
    """dy act'(u), float64 (:func:`torch_ops.activation_backward64` of a float64 u), at
    u = xhat * weight + u_bias formed from x; weight and u_bias (C,), or (N, C) where
    ``per_sample``, or None."""
    u = _xhat64(x.double(), moments, plan, eps)
    nd = x.dim()
    if weight is not None:
        u = u * _expand(weight.double() if per_sample else weight.double()[None], nd)
    if u_bias is not None:
        u = u + _expand(u_bias if per_sample else u_bias[None], nd)
    return activation_backward64(dy, u, activation)


@torch.library.custom_op("groupnorm::cpu_backward", mutates_args=())
def cpu_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045
    moments: torch.Tensor,
    sizes: list[int],
    eps: float,
    per_sample: bool,
    activation: Optional[str],  # noqa: UP045
    u_bias: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cpu_kernel.backward` as an op: ``(dx, dw, db)``, the sums float64 (C,), or (N, C)
    where ``per_sample`` (weight then float64 (N, C)). With an activation, dy is first taken
    through its derivative in float64 (inductor's float32 SiLU backward carries enough
    rounding into dweight's sum to reach 1.03 of the float32 bound) at
    ``u = xhat * weight + u_bias`` recomputed from x (``u_bias`` from
    :func:`torch_ops._u_bias`): by the kernel's backward for float32, with torch's float64 ops
    otherwise."""
    plan = _plan(sizes)
    served = cpu_kernel.serves(x)
    inside = activation if served and cpu_kernel.fuses_activation(x, activation) else None
    if activation is not None and activation is not inside:
        dy = _through_activation(dy, x, weight, moments, plan, eps, per_sample, activation, u_bias)
    if served:
        w = None if weight is None else weight.contiguous()
        return cpu_kernel.backward(
            x, dy, plan, w, moments, eps, per_sample=per_sample, activation=inside,
            u_bias=u_bias,
        )  # fmt: skip
    xc = _centered64(x.double(), moments, plan)
    dx, B, A = _backward64(xc, dy, plan, weight, (moments[1] + eps).rsqrt(), per_sample)
    # A float64 (N, C) dy is its own per-sample sum, and an op's output may not alias its input
    return _like(dx, x), B, A.clone() if A is dy else A


@cpu_backward.register_fake
def _(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    moments: torch.Tensor,
    sizes: list[int],
    eps: float,
    per_sample: bool,
    activation: str | None,
    u_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = tuple(x.shape[:2]) if per_sample else (x.shape[1],)
    dw, db = (x.new_empty(shape, dtype=torch.float64) for _ in range(2))
    return torch.empty_like(x), dw, db


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, scale, shift, sizes, eps, activation = inputs
    _, moments = output
    ctx.save_for_backward(x, weight, bias, scale, shift, moments)
    ctx.sizes, ctx.eps, ctx.activation = sizes, eps, activation
    ctx.mark_non_differentiable(moments)


def _backward(ctx: Any, dy: torch.Tensor, *_: torch.Tensor) -> tuple[Any, ...]:
    x, weight, bias, scale, shift, moments = ctx.saved_tensors

    def backward(w: torch.Tensor | None, per_sample: bool) -> KernelSums:
        sizes, act = list(ctx.sizes), ctx.activation
        ub = None if act is None else _u_bias(x, bias, scale, shift, per_sample)
        return cpu_backward(dy, x, w, moments, sizes, ctx.eps, per_sample, act, ub)

    grads = kernel_grads(backward, x, weight, bias, scale, shift, tuple(ctx.needs_input_grad[:5]))
    return (*grads, None, None, None)


cpu_forward.register_autograd(_backward, setup_context=_setup_context)
