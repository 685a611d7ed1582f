"""Group norm as torch's kernel on pivot-shifted input: exact, branch-free and scriptable.

With ``first[c]`` the first channel of channel c's group::

    xs = x - x[n, first[c], 0, ..., 0]      (accumulation dtype: float32, float64 for float64 x)
    y  = act((group_norm(xs) * weight + bias) * (1 + scale) + shift)   rounded once to x's dtype

the kernel running once per run of equal-size groups (once for an even plan). Each group's
pivot is its first element, so ``|mean(xs)| / std`` is that element's distance from the mean in
standard deviations, whatever the offset of x: torch's float32 mean of xs is then accurate
(docs/spec.md#numerics), and nothing depends on tensor values. That is what the paths that
cannot read values need: torch.compile, vmap, meta and fake tensors, make_fx, ONNX export,
TorchScript, and devices where reading a value would stall the host. The subtraction costs one
elementwise pass, which is why eager CPU calls check torch's own mean instead.

A graph holds three ops more than ``F.group_norm``'s: the pivot gather (``first`` is a
constant), its detach (only when x requires grad) and the subtraction; under torch.compile an
even plan's pivot is a strided slice and a repeat instead, four ops.

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


def _pivot(x: torch.Tensor, first: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, 1, ..., 1): the first element of each channel's group; ``size`` is the group size
    of an even plan, 0 for an uneven one. Detached: the result is mathematically independent of
    it, and its gradient would be rounding noise."""
    src = x.detach() if x.requires_grad else x
    if torch.jit.is_scripting():
        pivot = src.index_select(1, first)
        for d in range(2, x.dim()):
            pivot = pivot.narrow(d, 0, 1)
        return pivot
    spatial = (slice(0, 1),) * (x.dim() - 2)
    if size and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        # Every size-th channel, repeated: inductor then reads the pivot at an affine index. A
        # gather through `first` it inlines into each reduction as an indirect load per vector
        # iteration (a compiled ResNet-20 training step: 58 vs 84 ms, eager 53-63 ms). One
        # Dynamo op more; ATen graphs (make_fx, export, ONNX) keep the gather, 6 ATen ops and
        # 1 ONNX node fewer.
        every = src[(slice(None), slice(None, None, size)) + spatial]
        return every.repeat_interleave(size, dim=1)
    return src[(slice(None), first) + spatial]  # one op in a graph


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype; no op when it is already (a graph records every .to call)."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def shifted_group_norm(
    x: torch.Tensor,
    runs: list[tuple[int, int, int]],
    first: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """Group norm of x (N, C, *S) over the plan given as its runs of equal-size groups.

    first: (C,) int64, the first channel of each channel's group, on x's device; weight, bias:
    (C,) or None; scale, shift: (N, C) or None. Returns x's dtype and layout.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pivot = _pivot(x, first, runs[0][2] if len(runs) == 1 else 0)
    if pivot.dtype != acc:
        pivot = pivot.to(acc)
    w = _cast(weight, acc)
    b = _cast(bias, acc)
    # A half x minus a float32 pivot is promoted: xs is float32, formed in one op.
    if len(runs) == 1:
        y = torch.group_norm(x - pivot, x.shape[1] // runs[0][2], w, b, eps)
    else:
        parts: list[torch.Tensor] = []
        for start, end, size in runs:
            # Shifted per run: a slice of one shifted x is not dense, which vmap's kernel refuses.
            xs = x[:, start:end] - pivot[:, start:end]
            wr = None if w is None else w[start:end]
            br = None if b is None else b[start:end]
            parts.append(torch.group_norm(xs, (end - start) // size, wr, br, eps))
        y = torch.cat(parts, dim=1)
    if scale is not None:
        y = y * _per_channel(1 + scale.to(acc), x.dim())
    if shift is not None:
        y = y + _per_channel(shift.to(acc), x.dim())
    y = _activation(y, activation)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if y.stride() != x.stride():
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
    first: torch.Tensor

    def __init__(
        self,
        runs: list[tuple[int, int, int]],
        first: list[int],
        weight: torch.nn.Parameter | None,
        bias: torch.nn.Parameter | None,
        eps: float,
        activation: str | None,
    ) -> None:
        super().__init__()
        self.runs = runs
        # A plain attribute, not a buffer: a scripted state_dict would list even a
        # non-persistent buffer. So .to() leaves it where it is, and forward follows x.
        self.first = torch.tensor(first, dtype=torch.int64)
        self.weight = weight
        self.bias = bias
        self.eps = eps
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.first
        if first.device != x.device:
            first = first.to(x.device)
        return shifted_group_norm(
            x,
            self.runs,
            first,
            self.weight,
            self.bias,
            self.eps,
            self.activation,
            None,
            None,
        )
