"""Input factories shared by the numeric tests: fresh random data in a named memory layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from groupnorm import reference as R
from groupnorm.groups import GroupPlan

LAYOUTS = ("nchw", "channels_last", "strided")


def make_x(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str = "nchw",
    *,
    seed: int = 0,
    loc: float = 0.5,
    std: float = 2.0,
) -> torch.Tensor:
    """Random (N, C, *S) tensor with the requested layout.

    ``channels_last``: channels have stride 1 (NHWC / NDHWC / NLC); ``strided``: a view that is
    neither (every other element of a wider last dimension); ``nchw``: contiguous.
    """
    gen = torch.Generator().manual_seed(seed)

    def values(dims: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(dims, generator=gen, dtype=torch.float64) * std + loc).to(dtype)

    if layout == "nchw":
        out = values(shape)
    elif layout == "channels_last":
        out = values((shape[0],) + shape[2:] + (shape[1],)).movedim(-1, 1)
    elif layout == "strided":
        # Sliced last: arithmetic on a view with gaps returns a contiguous tensor.
        out = values(shape[:-1] + (2 * shape[-1],))[..., ::2]
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    assert out.shape == shape
    return out


PLAN_KINDS = ("num_groups", "uneven", "group_sizes")


def plan_kwargs(kind: str, C: int, data: st.DataObject) -> dict[str, Any]:
    """A drawn group plan for C channels as ``resolve_plan`` keywords: ``num_groups`` (a
    divisor of C), ``uneven`` (any G up to C) or explicit ``group_sizes``."""
    divisors = [d for d in range(1, C + 1) if C % d == 0]
    if kind == "num_groups":
        return {"num_groups": data.draw(st.sampled_from(divisors))}
    if kind == "uneven":
        return {"num_groups": data.draw(st.integers(1, C)), "uneven": True}
    cuts = sorted(data.draw(st.sets(st.integers(1, C - 1), max_size=C - 1))) if C > 1 else []
    bounds = [0, *cuts, C]
    return {"group_sizes": [b - a for a, b in zip(bounds, bounds[1:], strict=False)]}


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).to(dtype)


def affine_draw(
    shape: tuple[int, ...], layout: str, seed: int, loc: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One draw of the float32 gradient tests: x (unit spread at ``loc``), weight and bias
    requiring grad, and dy."""
    C = shape[1]
    x = make_x(shape, torch.float32, layout, seed=seed, loc=loc, std=1.0).requires_grad_()
    w = rand((C,), torch.float32, seed + 1).requires_grad_()
    b = rand((C,), torch.float32, seed + 2).requires_grad_()
    return x, w, b, rand(shape, torch.float32, seed + 3)


def reference(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    **epilogue: object,
) -> tuple[np.ndarray, R.Cache]:
    """The float64 reference on exactly the values the library saw (x rounded to its dtype)."""

    def np64(t: object) -> np.ndarray | None:
        if t is None:
            return None
        assert isinstance(t, torch.Tensor), type(t)
        return t.detach().double().numpy()

    return R.group_norm_forward(
        x.detach().double().numpy(),
        plan=plan,
        gamma=np64(weight),
        beta=np64(bias),
        eps=eps,
        activation=epilogue.get("activation"),  # type: ignore[arg-type]
        scale=np64(epilogue.get("scale")),
        shift=np64(epilogue.get("shift")),
    )


def textbook_group_norm(
    x: torch.Tensor,
    sizes: tuple[int, ...],
    w: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, var ((N, G) each) of ``(GN(x) w + b) (1 + scale) + shift`` for groups of
    ``sizes`` channels, eps 1e-5, in plain torch ops, one group at a time (independent of the
    code under test; differentiable, for gradients of any order)."""
    N = x.shape[0]
    parts, means, variances, c0 = [], [], [], 0
    for size in sizes:
        block = x[:, c0 : c0 + size]
        flat = block.reshape(N, -1)
        mean = flat.mean(-1, keepdim=True)
        var = ((flat - mean) ** 2).mean(-1, keepdim=True)
        parts.append(((flat - mean) / torch.sqrt(var + 1e-5)).reshape(block.shape))
        means.append(mean[:, 0])
        variances.append(var[:, 0])
        c0 += size
    y = torch.cat(parts, 1)
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    per_sample = x.shape[:2] + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.reshape(per_channel)
    if b is not None:
        y = y + b.reshape(per_channel)
    if scale is not None:
        y = y * (1 + scale.reshape(per_sample))
    if shift is not None:
        y = y + shift.reshape(per_sample)
    return y, torch.stack(means, 1), torch.stack(variances, 1)


def torch_grads(
    x: torch.Tensor, plan: GroupPlan, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor
) -> list[torch.Tensor]:
    """torch's own same-dtype (dx, dweight, dbias): ``F.group_norm`` and its autograd on each run
    of equal-size groups (one run for an even plan), the half-precision baseline of a backward
    that has no epilogue."""
    grads: list[list[torch.Tensor]] = [[], [], []]
    for start, end, size in plan.runs:
        parts = [t[cols].detach().requires_grad_() for t, cols in run_slices(x, w, b, start, end)]
        y = F.group_norm(parts[0], (end - start) // size, parts[1], parts[2])
        y.backward(dy[:, start:end])
        for acc, t in zip(grads, parts, strict=True):
            assert t.grad is not None
            acc.append(t.grad)
    return [torch.cat(grads[0], dim=1), torch.cat(grads[1]), torch.cat(grads[2])]


def run_slices(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, start: int, end: int
) -> list[tuple[torch.Tensor, tuple[slice, ...]]]:
    cols = slice(start, end)
    return [(x, (slice(None), cols)), (w, (cols,)), (b, (cols,))]
