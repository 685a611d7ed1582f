"""Group norm as torch's kernel on pivot-shifted input: exact, branch-free and scriptable.

For each run of equal-size groups (first channel, end channel, group size)::

    xs = x[:, run] - pivot[n, g]          (accumulation dtype: float32, float64 for float64 x)
    y  = act((group_norm(xs) * weight + bias) * (1 + scale) + shift)   rounded once to x's dtype

``pivot`` is the first element of each group, so ``|mean(xs)| / std`` is that element's distance
from the mean in standard deviations, whatever the offset of x: torch's float32 mean of xs is then
accurate (SPEC numerics policy), and nothing depends on tensor values. That is what the paths
that cannot read values need: torch.compile, vmap, meta and fake tensors, make_fx, ONNX export,
TorchScript, and devices where reading a value would stall the host. The subtraction costs one
elementwise pass, which is why eager CPU calls check torch's own mean instead.

Written in the TorchScript subset (no ``from __future__ import annotations``: TorchScript reads
the annotations at runtime), so ``torch.jit.script`` compiles it from a module's forward.
"""

import torch
import torch.nn.functional as F

__all__ = ["ScriptableGroupNorm", "shifted_group_norm"]


def _activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu":
        return F.relu(y)
    return y


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1)."""
    shape = list(v.shape)
    for _ in range(ndim - 2):
        shape.append(1)
    return v.reshape(shape)


def shifted_group_norm(
    x: torch.Tensor,
    runs: list[tuple[int, int, int]],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """Group norm of x (N, C, *S) over the plan given as its runs of equal-size groups.

    weight, bias: (C,) or None; scale, shift: (N, C) or None. Returns x's dtype and layout.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts: list[torch.Tensor] = []
    for start, end, size in runs:
        xr = x[:, start:end]
        pivot = xr.detach()[:, ::size]  # (N, G_run, *S): the first channel of each group
        for _ in range(x.dim() - 2):
            pivot = pivot.select(2, 0)
        pivot = _per_channel(pivot.to(acc).repeat_interleave(size, dim=1), x.dim())
        w = None if weight is None else weight[start:end].to(acc)
        b = None if bias is None else bias[start:end].to(acc)
        # A half x minus a float32 pivot is promoted: xs is formed in float32 in one op.
        parts.append(torch.group_norm(xr - pivot, (end - start) // size, w, b, eps))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if scale is not None:
        y = y * _per_channel(1 + scale.to(acc), x.dim())
    if shift is not None:
        y = y + _per_channel(shift.to(acc), x.dim())
    y = _activation(y, activation).to(x.dtype)
    if not x.is_contiguous():
        # The kernel returns contiguous output off the CPU and for layouts without a memory
        # format (NLC), and cat may pick NCHW for one-channel runs: hand back x's layout.
        like = torch.empty_like(x)
        if like.stride() != y.stride():
            y = like.copy_(y)
    return y


class ScriptableGroupNorm(torch.nn.Module):
    """What ``torch.jit.script`` compiles in place of a :class:`groupnorm.GroupNorm`: the same
    parameters (shared, same ``state_dict`` keys), plan, eps and activation, through
    :func:`shifted_group_norm`."""

    activation: str | None

    def __init__(
        self,
        runs: list[tuple[int, int, int]],
        weight: torch.nn.Parameter | None,
        bias: torch.nn.Parameter | None,
        eps: float,
        activation: str | None,
    ) -> None:
        super().__init__()
        self.runs = runs
        self.weight = weight
        self.bias = bias
        self.eps = eps
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_group_norm(
            x, self.runs, self.weight, self.bias, self.eps, self.activation, None, None
        )
