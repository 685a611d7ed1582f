"""The composite PyTorch backend: any device, any layout, every feature, differentiable by autograd.

Statistics (two levels, both exact in the sense of docs/spec.md#numerics):

1. shift: ``xs = x - pivot[n, g]`` in the accumulation dtype, ``pivot`` an element of the group,
   so a large common offset costs no precision;
2. per channel: ``var_c, mean_c = var_mean(xs)`` over the positions (a reduction that reads the
   input in its own layout, channels-last included, without a copy);
3. per group, Chan's merge of equal-count channels:
   ``mean_g = avg_c mean_c``, ``m2_g = L * sum_c (var_c + (mean_c - mean_g)^2)``.

Normalization folds everything per (n, c) into one multiply-add on ``xs``:
``a = rstd * gamma * (1 + scale)``, ``b = (beta - mean_g * rstd * gamma) * (1 + scale) + shift``,
``y = act(xs * a + b)``.

Plans without statistics in or out call torch's native kernel, which is faster on CPU (an
uneven plan once per run of equal-size groups, concatenated), and apply any epilogue (affine in
another dtype, scale/shift, activation) as elementwise ops after it; its float32 mean is trusted
only while ``|mean| * rstd <= NATIVE_TRUST`` (the mean's rounding error, ~ulp(|mean|), stays far
below the spread), else the call is redone shifted.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from groupnorm.activations import apply_activation
from groupnorm.dispatch import Backend, Request, register_backend
from groupnorm.groups import GroupPlan
from groupnorm.stats import GroupStats

__all__ = ["NATIVE_TRUST", "accumulation_dtype", "compute_stats", "run"]

# |mean| * rstd above which the native float32 mean is not trusted. Its error is a few
# ulp(|mean|) = |mean| * 6e-8 * k, i.e. r * 6e-8 * k relative to the spread: 1e-6 * k at r = 16.
NATIVE_TRUST = 16.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (half precision included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tracing() -> bool:
    """True while torch.export / torch.onnx.export (dynamo), torch.compile or torch.jit.trace
    records the graph: tensors made then are fake or graph constants, and Python branches on
    tensor values cannot be recorded."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _plan_indices(
    plan: GroupPlan, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per plan and device: channel -> group (C,), first channel of each group (G,), and a
    (G, max size) gather index into C + 1 columns whose last column is a zero pad.

    Cached in eager mode only: a tensor built while tracing is a fake tensor that would poison
    the cache for later eager calls (and the exporter refuses a fake constant)."""
    if _tracing():
        return _build_plan_indices(plan, device)
    return _cached_plan_indices(plan, device)


def _build_plan_indices(
    plan: GroupPlan, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    channel_group = torch.as_tensor(plan.channel_group, device=device)
    first = torch.as_tensor(plan.offsets[:-1], device=device)
    width = max(plan.sizes)
    pad = torch.full((plan.num_groups, width), plan.num_channels, dtype=torch.int64)
    for g, (start, size) in enumerate(zip(plan.offsets, plan.sizes, strict=False)):
        pad[g, :size] = torch.arange(start, start + size)
    return channel_group, first, pad.to(device)


_cached_plan_indices = lru_cache(maxsize=256)(_build_plan_indices)


def _group_sum(v: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """(N, C) -> (N, G): sum over each group's channels, in a fixed order (deterministic)."""
    N = v.shape[0]
    if plan.is_even:
        return v.reshape(N, plan.num_groups, plan.sizes[0]).sum(-1)
    _, _, pad = _plan_indices(plan, v.device)
    padded = torch.cat([v, v.new_zeros(N, 1)], dim=1)
    return padded[:, pad].sum(-1)


def _per_channel(v: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """(N, G) -> (N, C)."""
    if plan.is_even:
        return v.repeat_interleave(plan.sizes[0], dim=1)
    channel_group, _, _ = _plan_indices(plan, v.device)
    return v[:, channel_group]


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1) to broadcast against an (N, C, *S) tensor."""
    return v.reshape(v.shape + (1,) * (ndim - 2))


def _shifted(
    x: torch.Tensor, plan: GroupPlan, pivot: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - pivot, pivot)`` in the accumulation dtype; the pivot is each group's first element
    unless given. It is detached: the result is mathematically independent of it."""
    acc = accumulation_dtype(x.dtype)
    if pivot is None:
        _, first, _ = _plan_indices(plan, x.device)
        pivot = x.detach()[(slice(None), first) + (0,) * (x.dim() - 2)].to(acc)
    xs = x.to(acc) - _expand(_per_channel(pivot, plan), x.dim())
    return xs, pivot


def _stats_of_shifted(xs: torch.Tensor, pivot: torch.Tensor, plan: GroupPlan) -> GroupStats:
    N, C = xs.shape[:2]
    L = math.prod(xs.shape[2:])
    if xs.dim() == 2:
        var_c, mean_c = torch.zeros_like(xs), xs
    elif xs.numel() == 0:  # N = 0: var_mean would warn about an empty reduction
        var_c = mean_c = xs.new_zeros(N, C)
    else:
        var_c, mean_c = torch.var_mean(xs, dim=tuple(range(2, xs.dim())), correction=0)
    sizes = torch.tensor(plan.sizes, dtype=xs.dtype, device=xs.device)  # (G,)
    mean_g = _group_sum(mean_c, plan) / sizes  # (N, G)
    dev = mean_c - _per_channel(mean_g, plan)  # (N, C)
    m2 = _group_sum(var_c + dev * dev, plan) * L  # (N, G)
    count = (sizes * L).expand(N, -1)
    return GroupStats(pivot, mean_g, m2, count)


def compute_stats(x: torch.Tensor, plan: GroupPlan) -> GroupStats:
    """Statistics of ``x`` (N, C, *S) for ``plan``, as :class:`GroupStats`."""
    xs, pivot = _shifted(x, plan, None)
    return _stats_of_shifted(xs, pivot, plan)


def _native_layout(x: torch.Tensor) -> bool:
    """Layouts torch's kernel reads in place: NCHW-contiguous; on CPU also channels-last 2-D
    and 3-D with exactly the canonical strides.

    The kernel insists on ``x.is_contiguous(memory_format=x.suggest_memory_format())`` on CPU
    (plain contiguity elsewhere). ``is_contiguous(channels_last)`` alone is not enough: it ignores
    the stride of a size-1 dimension, which the suggestion does not. Seen in diffusers' VAE at
    batch 1: (1, 128, 64, 64) with strides (128, 1, 8192, 128) is channels-last-contiguous but
    suggests NCHW, and the kernel raised. Canonical strides satisfy both.
    """
    if x.is_contiguous():
        return True
    if x.device.type != "cpu" or x.dim() not in (4, 5):
        return False
    C, spatial = x.shape[1], x.shape[2:]
    inner = [C * math.prod(spatial[i + 1 :]) for i in range(len(spatial))]
    return x.stride() == (C * math.prod(spatial), 1, *inner)


# Uneven plans come in runs of equal-size groups (uneven=True makes two: the larger groups
# first). Torch's kernel takes each run's channels as an even plan, and the outputs are
# concatenated: one copy of x and one of y, yet 6.7-13x faster on CPU than the composite path
# (benchmarks/cpu_uneven.py; (2, 48, 64, 64) float32, 16 groups of 2 and 16 of 1: 0.29-0.53
# vs 2.8-3.9 ms). Past a few runs the calls and copies add up, and explicit group_sizes go
# composite.
MAX_NATIVE_RUNS = 4


def _native_ok(r: Request) -> bool:
    if r.stats is not None or r.return_stats:
        return False
    if r.x.dtype in (torch.float16, torch.bfloat16) and _epilogue_after_kernel(r):
        # The kernel returns y rounded to x's dtype; an epilogue on that would round twice
        # (seen: bf16 + SiLU 2x the error of the exactly rounded result, 10x at one element).
        return False
    if r.plan.is_even:
        return _native_layout(r.x)
    # Each run is copied in x's memory format; off the CPU the kernel reads only contiguous
    # input, so a channels-last x there would be copied for nothing.
    return len(r.plan.runs) <= MAX_NATIVE_RUNS and (r.x.device.type == "cpu" or r.x.is_contiguous())


def _epilogue_after_kernel(r: Request) -> bool:
    """Whether :func:`_native` has work left after torch's kernel (see its docstring)."""
    x = r.x
    affine_inside = (r.weight is None or r.weight.dtype == x.dtype) and (
        r.bias is None or r.bias.dtype == x.dtype
    )
    return (
        not affine_inside or r.activation is not None or r.scale is not None or r.shift is not None
    )


@lru_cache(maxsize=256)
def _even_plan(size: int, groups: int) -> GroupPlan:
    return GroupPlan((size,) * groups)


def _native_runs(r: Request) -> torch.Tensor | None:
    """An uneven request as one native call per run of equal-size groups (see MAX_NATIVE_RUNS);
    None when a run's channels cannot be read in place after the copy, or its mean is not
    trusted."""
    parts = []
    for start, end, size in r.plan.runs:
        cols = slice(start, end)
        # The slice skips the other runs' channels; a dense copy in x's memory format.
        xs = r.x[:, cols].clone(memory_format=torch.preserve_format)
        if not _native_layout(xs):
            return None
        y = _native(
            Request(
                xs,
                _even_plan(size, (end - start) // size),
                None if r.weight is None else r.weight[cols],
                None if r.bias is None else r.bias[cols],
                r.eps,
                r.activation,
                None if r.scale is None else r.scale[:, cols],
                None if r.shift is None else r.shift[:, cols],
                None,
                False,
            )
        )
        if y is None:
            return None
        parts.append(y)
    return torch.cat(parts, dim=1)


def _native(r: Request) -> torch.Tensor | None:
    """torch's own kernel, then any epilogue as elementwise ops; None when the kernel's float32
    mean cannot be trusted for this input.

    The kernel applies weight and bias itself when they are in x's dtype (it requires that);
    otherwise it returns x_hat and the affine joins the epilogue, in the accumulation dtype.
    """
    x = r.x
    N, C = x.shape[:2]
    affine_inside = (r.weight is None or r.weight.dtype == x.dtype) and (
        r.bias is None or r.bias.dtype == x.dtype
    )
    w, b = (r.weight, r.bias) if affine_inside else (None, None)
    y, mean, rstd = torch.native_group_norm(
        x, w, b, N, C, math.prod(x.shape[2:]), r.plan.num_groups, r.eps
    )
    # NaN (a NaN group) compares False: such a group is NaN either way, and others unaffected.
    if mean.numel() and mean.detach().mul(rstd.detach()).abs_().max().item() > NATIVE_TRUST:
        return None
    if affine_inside and r.activation is None and r.scale is None and r.shift is None:
        return y
    acc = accumulation_dtype(x.dtype)
    u = y.to(acc)
    per_channel = (C,) + (1,) * (x.dim() - 2)
    if not affine_inside:
        if r.weight is not None:
            u = u * r.weight.to(acc).reshape(per_channel)
        if r.bias is not None:
            u = u + r.bias.to(acc).reshape(per_channel)
    if r.scale is not None:
        u = u * _expand(1 + r.scale.to(acc), x.dim())
    if r.shift is not None:
        u = u + _expand(r.shift.to(acc), x.dim())
    return apply_activation(u, r.activation).to(x.dtype)


def run(r: Request) -> tuple[torch.Tensor, GroupStats | None]:
    """Run a validated request: ``(y, stats or None)``."""
    # The native path checks its mean with a Python branch on tensor values; a traced graph
    # (ONNX export, torch.export, torch.compile, jit.trace) cannot record that branch, so tracing
    # takes the composite path, which is exact for every input and has no such branch.
    if not _tracing() and _native_ok(r):
        y = _native(r) if r.plan.is_even else _native_runs(r)
        if y is not None:
            return y, None
    x, plan = r.x, r.plan
    given = r.stats
    xs, pivot = _shifted(x, plan, None if given is None else given.pivot)
    stats = _stats_of_shifted(xs, pivot, plan) if given is None else given
    rstd = torch.rsqrt(stats.var + r.eps)  # (N, G)
    a = _per_channel(rstd, plan)  # (N, C)
    if r.weight is not None:
        a = a * r.weight.to(a.dtype)
    b = -_per_channel(stats.shifted_mean, plan) * a  # (N, C)
    if r.bias is not None:
        b = b + r.bias.to(a.dtype)
    if r.scale is not None:
        # One cast, used twice: two casts would round each half of scale's gradient to a half
        # dtype separately and add them there (seen: 0.31 for 0.26 in bf16).
        s1 = 1 + r.scale.to(a.dtype)
        a, b = a * s1, b * s1
    if r.shift is not None:
        b = b + r.shift.to(a.dtype)
    y = apply_activation(xs * _expand(a, x.dim()) + _expand(b, x.dim()), r.activation)
    return y.to(x.dtype), (stats if r.return_stats else None)


register_backend(
    Backend(
        name="torch",
        priority=0,
        why_not=lambda r: None,
        run=run,
        stats=lambda r: compute_stats(r.x, r.plan),
    )
)
