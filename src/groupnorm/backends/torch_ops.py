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

On an eager CPU call that autograd does not record, the fused CPU kernel (:mod:`.cpu_kernel`)
serves y and statistics in and out, exact with no check, wherever it is built, half precision
included. Under autograd it serves float32/float64 uneven plans and
channels-last inputs torch's kernel is not trusted with, backward included (:class:`_Fused`).
The rest of this docstring is what serves the calls it does not.

On an eager CPU call that autograd does not record, statistics out come from torch's kernel
wherever its mean is trusted (below): the variance as ``rstd^-2 - eps`` from the call that
makes y while it is at least eps, else from a call at eps = 0. y from given statistics is one
multiply-add on x itself while ``|mean| * rstd`` is within the NCHW kernel's limit, the form and
error of torch's own kernel. Otherwise both take the shifted path above.

Uneven plans on such a call, and layouts torch's kernel is not trusted with (float32
channels-last past 8^2 positions or 4096-element groups, other channels-last past 64^2
positions, strided views), take their statistics from each channel's sums of x and x^2,
merged per group in float64, while ``|mean| * rstd <= SUMS_TRUST``; y is then one
multiply-add on x: no per-run kernel calls or copies of channel slices.

Plans without statistics in or out call torch's native kernel, which is faster on CPU (an
uneven plan, where the sums decline, once per run of equal-size groups, concatenated). On an
eager CPU call its float32 mean is trusted per (sample, group) only while ``|mean| * rstd``
stays under the layout's measured limit (``NATIVE_TRUST*``); samples past it are redone from
sums where the limit is below theirs, else on the composite path. Any epilogue the kernel
cannot apply itself (affine in another dtype, scale/shift, activation on a half-precision x)
is computed from x and the kernel's float32 mean and rstd, and rounded once. Calls that
cannot read tensor values (tracing, transforms, other devices) run the kernel on
pivot-shifted input instead (:mod:`groupnorm.backends.shifted`), except float32/float64 CPU
calls torch.compile records, which run the fused CPU kernel's ops
(:mod:`groupnorm.backends.compiled`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch.autograd import forward_ad

from groupnorm.activations import ACTIVATIONS, SiLUGrad, apply_activation
from groupnorm.backends import cpu_kernel
from groupnorm.backends._kept import plain_tensors
from groupnorm.backends.shifted import _means, shifted_group_norm
from groupnorm.dispatch import FLOAT_DTYPES, Backend, Request, register_backend
from groupnorm.groups import GroupPlan
from groupnorm.stats import GroupStats, widened

__all__ = [
    "NATIVE_TRUST",
    "PlanIndex",
    "accumulation_dtype",
    "can_read_values",
    "compute_stats",
    "native_fast",
    "params_wrapped",
    "plan_index",
    "run",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (half precision included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tracing() -> bool:
    """True while torch.export / torch.onnx.export (dynamo), torch.compile or torch.jit.trace
    records the graph: tensors made then are fake or graph constants, and Python branches on
    tensor values cannot be recorded."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class PlanIndex(NamedTuple):
    """A plan's index tensors on one device."""

    channel_group: torch.Tensor  # (C,): group of each channel
    first: torch.Tensor  # (G,): first channel of each group
    pad: torch.Tensor  # (G, max size): gather index into C + 1 columns, the last a zero pad
    channel_first: torch.Tensor  # (C,): first channel of each channel's group
    sizes: torch.Tensor  # (G,): channels of each group


def plan_index(plan: GroupPlan, device: torch.device) -> PlanIndex:
    """The plan's index tensors on ``device``, kept in ``plan.index_cache`` by eager calls.

    A graph being recorded (torch.compile, make_fx) reads a kept entry as a constant, a fake
    tensor mode cannot (it refuses real tensors). What is built while recording is not kept: it
    is fake or a graph constant, which would poison later eager calls (and the exporter refuses a
    fake constant)."""
    tracing = _tracing()  # first: dynamo cannot trace the queries below
    if tracing or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
        kept = plan.index_cache.get(device)
        if kept is not None:
            return cast(PlanIndex, kept)
    keep = not tracing and not torch._C._len_torch_dispatch_stack()
    with plain_tensors() if keep else contextlib.nullcontext():
        width = max(plan.sizes)
        cpu = torch.device("cpu")  # not the default device, which may be another (or meta)
        pad = torch.full((plan.num_groups, width), plan.num_channels, dtype=torch.int64, device=cpu)
        for g, (start, size) in enumerate(zip(plan.offsets, plan.sizes, strict=False)):
            pad[g, :size] = torch.arange(start, start + size, device=cpu)
        built = PlanIndex(
            torch.as_tensor(plan.channel_group, device=device),
            torch.as_tensor(plan.offsets[:-1], device=device),
            pad.to(device),
            torch.as_tensor(plan.channel_first, device=device),
            torch.as_tensor(plan.sizes, device=device),
        )
    if keep:
        plan.index_cache[device] = built
    return built


def _group_sum(v: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """(N, C) -> (N, G): sum over each group's channels, in a fixed order (deterministic)."""
    N = v.shape[0]
    if plan.is_even:
        return v.reshape(N, plan.num_groups, plan.sizes[0]).sum(-1)
    pad = plan_index(plan, v.device).pad
    padded = torch.cat([v, v.new_zeros(N, 1)], dim=1)
    return padded[:, pad].sum(-1)


def _spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N, C); an (N, C) tensor as it is (``sum(())`` would sum everything)."""
    return t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t


def _per_channel(v: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """(N, G) -> (N, C)."""
    if plan.is_even:
        return v.repeat_interleave(plan.sizes[0], dim=1)
    return v[:, plan_index(plan, v.device).channel_group]


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1) to broadcast against an (N, C, *S) tensor."""
    return v.reshape(v.shape + (1,) * (ndim - 2))


def _spread_groups(v: torch.Tensor, plan: GroupPlan, ndim: int) -> torch.Tensor:
    """(N, G) -> (N, C, 1, ..., 1): each group's value on its channels, to broadcast against an
    (N, C, *S) tensor."""
    return _expand(_per_channel(v, plan), ndim)


def _shifted(
    x: torch.Tensor, plan: GroupPlan, pivot: torch.Tensor | None, acc: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - pivot, pivot)`` in ``acc`` (default: the accumulation dtype); the pivot is
    :func:`_pivot` unless given. It is detached: the result is mathematically independent of
    it."""
    acc = accumulation_dtype(x.dtype) if acc is None else acc
    if pivot is None:
        pivot = _pivot(x.detach(), plan, acc)
    xs = x.to(acc) - _spread_groups(pivot, plan, x.dim())
    return xs, pivot


def _pivot(x: torch.Tensor, plan: GroupPlan, acc: torch.dtype) -> torch.Tensor:
    """Each group's pivot, (N, G) in ``acc``: for half precision and float64 the group's mean
    (sums in ``acc``), for float32 its first element (float32 x is shifted in float64 where it
    matters, :func:`_widens`, and its statistics out re-pivoted, :func:`_narrowed`). One more
    read of x, in its own dtype.

    Half precision's statistics and gradients are formed in float32: from a first element far
    out in its group (a zero of padding before data at -500 +- 10 or 30 +- 0.001) the terms of
    dweight's sum(dy (x - pivot)) rstd - sum(dy) mean rstd cancel, which put a float32
    weight's gradient at 1.1-1.6x what torch's own kernel misses by. float64: such a first
    element (a zero before data at 1e4 +- 0.01, 512^2 elements a group) stayed the pivot of
    the statistics (``group_stats`` of an x that autograd records, the composite path's), and
    y, formed from x - pivot at 1e6 deviations, reached 9.1x the float64 bound."""
    if x.dtype in (torch.float16, torch.bfloat16, torch.float64) and x.numel():
        spatial = tuple(range(2, x.dim()))
        mean_c = x.mean(dim=spatial, dtype=acc) if spatial else x.to(acc)  # (N, C)
        return _group_sum(mean_c, plan) / plan_index(plan, x.device).sizes.to(acc)
    first = plan_index(plan, x.device).first
    return x[(slice(None), first) + (0,) * (x.dim() - 2)].to(acc)


def _stats_of_shifted(xs: torch.Tensor, pivot: torch.Tensor, plan: GroupPlan) -> GroupStats:
    N, C = xs.shape[:2]
    L = math.prod(xs.shape[2:])
    if xs.dim() == 2:
        var_c, mean_c = torch.zeros_like(xs), xs
    elif xs.numel() == 0:  # N = 0: var_mean would warn about an empty reduction
        var_c = mean_c = xs.new_zeros(N, C)
    else:
        var_c, mean_c = torch.var_mean(xs, dim=tuple(range(2, xs.dim())), correction=0)
    sizes = plan_index(plan, xs.device).sizes.to(xs.dtype)  # (G,)
    mean_g = _group_sum(mean_c, plan) / sizes  # (N, G)
    dev = mean_c - _per_channel(mean_g, plan)  # (N, C)
    m2 = _group_sum(var_c + dev * dev, plan) * L  # (N, G)
    count = (sizes * L).expand(N, -1)
    return GroupStats(pivot, mean_g, m2, count, plan=plan)


def _widens(x: torch.Tensor) -> bool:
    """Whether x, on the composite path and in :func:`compute_stats`, is shifted and its
    statistics (and output) formed in float64: float32 x (not on MPS, which has no float64). In
    float32 the shifted mean is rounded relative to the pivot's distance from the group's mean:
    a pivot far out in its group (a zero of padding before data at 1000 with a spread of 0.01,
    1e5 deviations) put y at up to 8.4x the float32 bound. Where autograd records the call,
    autograd's float32 sums of dy and dy * (x - pivot) over N * L put dweight at 1.75x and dbias
    at 1.32x the bound, and the rounding of x - pivot, of a shifted mean several deviations from
    0 or of rstd dweight at 0.8-0.9x."""
    return x.dtype == torch.float32 and x.device.type != "mps"


def _narrowed(stats: GroupStats) -> GroupStats:
    """float64 statistics of a float32 x as float32 ones, the mean as two float32 numbers: the
    pivot the mean rounded (detached), the shifted mean the rest, which carries the gradient."""
    mean = stats.pivot + stats.shifted_mean
    pivot = mean.detach().float()
    return GroupStats(
        pivot, (mean - pivot).float(), stats.m2.float(), stats.count.float(), plan=stats.plan
    )


def compute_stats(x: torch.Tensor, plan: GroupPlan) -> GroupStats:
    """Statistics of ``x`` (N, C, *S) for ``plan``, as :class:`GroupStats`; float32 x that
    autograd records, in reverse or forward mode, keeps its float64 copy and statistics behind
    the fields (:class:`Widened`)."""
    if _widens(x):
        wide_x = x.to(torch.float64)
        # float32's pivot (its first element), not the copy's (a float64 mean, one more read)
        pivot = _pivot(x.detach(), plan, torch.float64)
        wide = _stats_of_shifted(*_shifted(wide_x, plan, pivot), plan)
        fields = _narrowed(wide)
        # Forward AD too (its dual tensors do not require grad, whatever the grad mode): the
        # fields' tangents, rounded to float32, put a later stats= call's tangent at up to
        # 4.55x the float32 bound where they cancel against x's own.
        records = (x.requires_grad and torch.is_grad_enabled()) or (
            forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent is not None
        )
        if records and _reads_values(x):
            return widened(fields, wide, ((x, wide_x, x._version, x.data_ptr()),))
        return fields
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
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is None or not x.is_cpu or not x.is_contiguous(memory_format=fmt):
        return False
    if 1 not in x.shape[1:]:  # only a batch of 1 may have a stride other than canonical
        return x.shape[0] != 1 or x.stride(0) == x.numel()
    C, spatial = x.shape[1], x.shape[2:]
    inner = [C * math.prod(spatial[i + 1 :]) for i in range(len(spatial))]
    return x.stride() == (C * math.prod(spatial), 1, *inner)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


# |mean| * rstd up to which torch's CPU kernel is trusted, by dtype and layout, measured
# against the tolerance table (float32: 2e-6 + 2e-6 |y|) with weight and bias ~ N(0, 1), as the
# tests draw them. The NCHW kernel's mean is off by a few ulp(|mean|), ratio * 6e-8 * k of the
# spread, and its multiply-add rounds b = beta - mean * rstd * gamma alike: groups standardized
# to an exact ratio, 4 to 1024 elements, 512 samples x 10 draws, worst fraction of the float32
# bound at ratio 1 / 2 / 3 / 4 / 8: 0.32 / 0.51 / 0.77 / 1.03 / 1.91 (without affine 0.72 at 8,
# 1.85 at 16). float64 and half precision keep 16 (float64's error is 1e-4 of its bound there;
# half is judged against torch's own kernel). The channels-last kernel forms the variance from
# float32 sums over each channel's positions: with affine, (2, C, H, H), G = C/4, it reaches
# 1.13x the float32 bound at 64^2 and ratio 0.5, 1.16x at 32^2 and ratio 1; its error grows
# with the group's element count (one group of 4096 channels at 8^2: 2.8x at ratio 0). Float32
# channels-last inputs take it only on small groups: at most 8^2 positions and 4096 elements a
# group, ratio 0.5 (4 samples x 16 groups x 20 draws for each of 2^2..8^2 positions and 1 to
# 4096 / positions channels a group: worst 0.50 of the bound; at ratio 1 it reached 1.02x);
# elsewhere the sums path or the composite path. Other dtypes take it up to 64^2 positions and
# ratio 1.
NATIVE_TRUST = 16.0
NATIVE_TRUST_FLOAT32 = 2.0
NATIVE_TRUST_CHANNELS_LAST = 1.0
CHANNELS_LAST_MAX_POSITIONS = 1 << 12
NATIVE_TRUST_CHANNELS_LAST_FLOAT32 = 0.5
CHANNELS_LAST_FLOAT32_MAX_POSITIONS = 64
CHANNELS_LAST_FLOAT32_MAX_GROUP = 1 << 12

# Uneven plans come in runs of equal-size groups (uneven=True makes two: the larger groups
# first). Torch's kernel takes each run's channels as an even plan, and the outputs are
# concatenated: one copy of x and one of y, yet 6.7-13x faster on CPU than the composite path
# (benchmarks/cpu_uneven.py; (2, 48, 64, 64) float32, 16 groups of 2 and 16 of 1: 0.29-0.53
# vs 2.8-3.9 ms). Past a few runs the calls and copies add up, and explicit group_sizes go
# composite.
MAX_NATIVE_RUNS = 4


def _trust_limit(x: torch.Tensor, plan: GroupPlan) -> float | None:
    """The largest |mean| * rstd at which torch's CPU kernel is trusted on x with ``plan``'s
    groups (an uneven plan's largest), None when it does not read x in place or cannot be
    trusted at any ratio."""
    if x.is_contiguous():
        return _nchw_trust(x.dtype)
    if not _native_layout(x):
        return None
    positions = math.prod(x.shape[2:])
    if x.dtype == torch.float32:
        if (
            positions > CHANNELS_LAST_FLOAT32_MAX_POSITIONS
            or max(plan.sizes) * positions > CHANNELS_LAST_FLOAT32_MAX_GROUP
        ):
            return None
        return NATIVE_TRUST_CHANNELS_LAST_FLOAT32
    if positions > CHANNELS_LAST_MAX_POSITIONS:
        return None
    return NATIVE_TRUST_CHANNELS_LAST


def _backward_crashes(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> bool:
    """Whether autograd would record torch's channels-last CPU kernel for the gradient of weight
    or bias but not of x: that backward crashes the process (a segmentation fault, torch 2.13's
    own F.group_norm alike; the first layer of a float64 or half-precision channels-last
    model), so such calls take the other paths. (Where x needs a gradient too, a backward may
    still ask for the parameters' alone: :func:`native_group_norm` records those calls.)"""
    return (
        not x.requires_grad
        and torch.is_grad_enabled()
        and (
            (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
        and not x.is_contiguous()
    )


def native_group_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    C: int,
    L: int,
    G: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.native_group_norm``, whose channels-last CPU backward crashes the process when
    autograd asks it for the weight's or bias's gradient and not x's (``torch.autograd.grad(
    loss, norm.weight)`` with x a leaf that requires grad; which gradients a backward will ask
    for is unknown here): such a call is recorded as :class:`_ChannelsLastGN`, which always
    asks for x's too. mean and rstd are then not differentiable (callers use them detached)."""
    if (
        x.requires_grad
        and _differentiated(weight, bias)
        and x.device.type == "cpu"
        and x.dim() in _CHANNELS_LAST
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()])
    ):
        return _ChannelsLastGN.apply(x, weight, bias, (N, C, L, G, eps))
    return torch.native_group_norm(x, weight, bias, N, C, L, G, eps)


class _ChannelsLastGN(torch.autograd.Function):
    """:func:`native_group_norm` where torch's backward could crash: first derivatives from
    torch's backward asked for x's gradient too (x requires grad wherever this node records,
    so its gradient is always one autograd wants); a backward that
    is itself recorded (``create_graph=True``) takes autograd's of ``F.group_norm`` on the same
    inputs, torch's own second derivatives."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        call: tuple[int, int, int, int, float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, C, L, G, eps = call
        y, mean, rstd = torch.native_group_norm(x, weight, bias, N, C, L, G, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)  # bias: for create_graph's branch
        ctx.call = call
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        N, C, L, G, eps = ctx.call
        wanted = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            y = torch.group_norm(x, G, weight, bias, eps)
            params = [t for t, w in zip((weight, bias), wanted[1:], strict=True) if w]
            dx, *got = torch.autograd.grad(y, [x, *params], dy, create_graph=True)
            dw = got.pop(0) if wanted[1] else None
            db = got.pop(0) if wanted[2] else None
            return dx, dw, db, None
        # The kernel reads dy in x's layout, unchecked.
        dy = dy.contiguous(memory_format=_CHANNELS_LAST[x.dim()])
        mask = [True, wanted[1], wanted[2]]
        dx, dw, db = _GROUP_NORM_BACKWARD(dy, x, mean, rstd, weight, N, C, L, G, mask)
        return dx, dw, db, None


def _nchw_trust(dtype: torch.dtype) -> float:
    """The largest |mean| * rstd at which torch's NCHW kernel, or a multiply-add of its form
    (``x * a + b``, b = beta - mean * a), holds the tolerance table for ``dtype``."""
    return NATIVE_TRUST_FLOAT32 if dtype == torch.float32 else NATIVE_TRUST


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transform_level = torch._C._functorch.maybe_current_level


def _transformed(x: torch.Tensor) -> bool:
    """Whether a torch.func transform runs, or x is a wrapper left over from one: the fast
    paths then decline (:func:`can_read_values` says why)."""
    return _transform_level() is not None or _wrapped(x)


# Plain tensors and parameters (masks and statistics held as nn.Parameter); not subclasses such
# as fake or functional tensors, whose values cannot be read.
_VALUE_TYPES = (torch.Tensor, torch.nn.Parameter)


def can_read_values(x: torch.Tensor) -> bool:
    """Whether this call may read tensor values (``.item()``, ``bool(t)``).

    Not while torch.compile, jit.trace, make_fx or a fake mode records (no values), not on meta
    tensors, and not inside vmap or other torch.func transforms (``.item()`` is refused on
    their tensors; and a plain x captured from outside is no different to the kernels, whose
    outputs, allocated at a ``grad`` transform's level, come back wrapped, without storage),
    nor on a wrapper left over from one.
    """
    return plain_values(x) and not _transformed(x)


def plain_values(x: torch.Tensor) -> bool:
    """Whether x holds values this call could read, torch.func transforms aside (a caller
    unwraps their tensors first): not while a graph is recorded, not on meta, fake or other
    subclass tensors."""
    return (
        not _tracing()  # first: dynamo cannot trace the queries below
        and type(x) in _VALUE_TYPES
        and x.device.type != "meta"
        and not torch._C._len_torch_dispatch_stack()
    )


def _reads_values(x: torch.Tensor) -> bool:
    """Whether the hot path may branch on tensor values: :func:`can_read_values` on the CPU
    (elsewhere reading a value stalls the host until the device catches up)."""
    return x.device.type == "cpu" and can_read_values(x)


def params_wrapped(*tensors: torch.Tensor | None) -> bool:
    """Whether one of ``tensors`` (a call's parameters) is a torch.func wrapper: the parameters
    transformed (grad, vmap, jvp of weight, scale, ...) while x is captured as a plain tensor.
    Then no kernel may take their data pointers, and no value may be read."""
    return any(t is not None and _wrapped(t) for t in tensors)


def _reads_request(r: Request) -> bool:
    """:func:`_reads_values` of x, with none of the call's other tensors a torch.func wrapper
    (:func:`params_wrapped`)."""
    stats = () if r.stats is None else (r.stats.pivot, r.stats.shifted_mean, r.stats.m2)
    return _reads_values(r.x) and not params_wrapped(r.weight, r.bias, r.scale, r.shift, *stats)


def _fold(
    mean: torch.Tensor, rstd: torch.Tensor, plan: GroupPlan, r: Request
) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything per (n, c) as one multiply-add on (x - 0): ``y = act(x * a + b)``, with
    ``a = rstd * gamma * (1 + scale)`` and ``b = beta * (1 + scale) + shift - mean * a``; mean,
    rstd (N, G) in the accumulation dtype, a and b (N, C).

    b takes the mean times a itself, not times ``rstd * gamma`` scaled after: the gradient of x
    through the mean is then the direct one's exact negative where they cancel (a group of one
    element: formed with the factors in another order, float16 dx was 1.5e-5 to 2e-3 where it
    is 0)."""
    a = _per_channel(rstd, plan)
    if r.weight is not None:
        a = a * r.weight.to(a.dtype)
    s1 = None
    if r.scale is not None:
        # One cast, used twice: two casts would round each half of scale's gradient to a half
        # dtype separately and add them there (seen: 0.31 for 0.26 in bf16).
        s1 = 1 + r.scale.to(a.dtype)
        a = a * s1
    b = -_per_channel(mean, plan) * a
    if r.bias is not None:
        beta = r.bias.to(a.dtype)
        b = b + (beta if s1 is None else beta * s1)
    if r.shift is not None:
        b = b + r.shift.to(a.dtype)
    return a, b


def _detached(mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's kernel's mean and rstd without their autograd history, for the checks."""
    if mean.requires_grad:  # detach() is a dispatch of its own: this check runs on every call
        return mean.detach(), rstd.detach()
    return mean, rstd


def _all_trusted(mean: torch.Tensor, rstd: torch.Tensor, limit: float) -> bool:
    """Whether every (sample, group) has ``|mean| * rstd <= limit``; a NaN anywhere makes the
    maximum NaN, which compares False (the caller then checks elementwise or declines).

    CPU tensors, with autograd history or without. The fused CPU kernel's loop where it is
    built (well under a microsecond; it reads the data, so nothing is detached: two dispatched
    ops on every training step's forward); else float32/float64 go through NumPy: on these
    (N, G) arrays its three operations cost less than torch's dispatch of two (7 vs 11 us per
    call on this project's CPU machine), which every eager CPU call pays."""
    checked = cpu_kernel.trusted(mean, rstd, limit)
    if checked is not None:
        return checked
    mean, rstd = _detached(mean, rstd)
    if mean.dtype in _NUMPY_FLOATS and rstd.dtype == mean.dtype:
        return bool(np.abs(mean.numpy() * rstd.numpy()).max(initial=0.0) <= limit)
    ratio = mean * rstd
    return not ratio.numel() or float(torch.linalg.vector_norm(ratio, math.inf)) <= limit


_NUMPY_FLOATS = (torch.float32, torch.float64)


def _native(r: Request) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's kernel on an even plan, then any epilogue: ``(y, mean, rstd)``, mean and rstd
    (N, G) detached, in the accumulation dtype except for a half x whose weight and bias are
    applied inside (then in x's dtype).

    Rounded once: the kernel applies weight and bias itself only when they are in x's dtype and
    its output is final (or only an activation follows in x's dtype, float32 or float64). Any
    other epilogue, and every epilogue of a half-precision x, is computed from x and the
    kernel's float32 mean and rstd in the accumulation dtype, then rounded.
    """
    x = r.x
    N, C = x.shape[:2]
    acc = accumulation_dtype(x.dtype)
    inside = _kernel_output_is_final(r)
    if inside:
        w, b = r.weight, r.bias
    elif x.dtype != acc:
        # A float32 weight makes the CPU kernel return float32 mean and rstd (else x's dtype).
        w, b = _float32_ones(C, x.device) if r.weight is None else r.weight.float(), None
    else:
        w, b = None, None
    # Outside, the epilogue differentiates mean and rstd, which native_group_norm's recorded
    # form does not (y is unused then, and torch's backward of mean and rstd alone is safe).
    native = native_group_norm if inside else torch.native_group_norm
    y, mean, rstd = native(x, w, b, N, C, math.prod(x.shape[2:]), r.plan.num_groups, r.eps)
    mean_d, rstd_d = _detached(mean, rstd)
    if inside:
        return apply_activation(y, r.activation), mean_d, rstd_d
    return _multiply_add(r, mean, rstd), mean_d, rstd_d


def _native_with_stats(r: Request) -> tuple[torch.Tensor, GroupStats] | None:
    """y and its statistics from torch's kernel on an even plan (from sums of x and x^2 on an
    uneven one, :func:`_from_sums`), or None for the shifted path.

    One call gives both while every group's ``var >= eps``: ``var = rstd^-2 - eps`` then loses
    at most a factor 2 of its relative accuracy to the subtraction. A group below eps takes the
    variance from a call at eps = 0 (:func:`_stats_native`), as does a half x whose weight and
    bias the kernel applies (its mean and rstd would be in x's dtype), whose y is then the
    multiply-add (within NATIVE_TRUST: at eps = 0 ``|mean| * rstd`` is only larger). A call
    whose mean is not trusted goes shifted without asking again: at eps = 0 it would not be."""
    if _torch_kernel_declines(r.x, r.plan):
        stats = _from_sums(r.x, r.plan, 0.0)
        if stats is None:
            return None
        return _multiply_add(r, stats.mean, torch.rsqrt(stats.var + r.eps)), stats
    limit = _trust_limit(r.x, r.plan)
    if limit is None:
        return None
    if r.x.dtype != accumulation_dtype(r.x.dtype) and _kernel_output_is_final(r):
        stats = _stats_native(r.x, r.plan)
        if stats is None:
            return None
        return _multiply_add(r, stats.mean, torch.rsqrt(stats.var + r.eps)), stats
    y, mean, rstd = _native(r)
    if not _all_trusted(mean, rstd, limit):
        return None
    var = rstd.pow(-2) - r.eps
    if bool((var >= r.eps).all()):
        return y, _kernel_stats(mean, var, r.plan, r.x)
    stats = _stats_native(r.x, r.plan)
    return None if stats is None else (y, stats)


def _kernel_stats(
    mean: torch.Tensor, var: torch.Tensor, plan: GroupPlan, x: torch.Tensor
) -> GroupStats:
    """torch's kernel's mean and variance (N, G) of an even plan on x as ``pivot = mean``,
    ``shifted_mean = 0``."""
    count = torch.full_like(mean, plan.sizes[0] * math.prod(x.shape[2:]))
    return GroupStats(mean, torch.zeros_like(mean), var * count, count, plan=plan)


def _multiply_add(r: Request, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``act(x * a + b)`` (:func:`_fold`) on x itself, in the accumulation dtype (a half x is
    promoted by the multiply), rounded once to x's dtype and layout.

    No shift: rounding ``x * a`` and ``b`` costs ~ulp(|mean| * rstd) of the output's scale, the
    error torch's own kernel makes (its y has this form), so callers bound ``|mean| * rstd``.
    On NCHW x a multiply then an in-place add: addcmul's broadcast loop took up to twice as long
    on CPU ((8, 64, 32, 32) float32: 0.36 vs 0.19 ms); on channels-last x addcmul, 1.6-2.7x
    faster than the pair ((2, 320, 64, 64): 1.4 vs 2.6 ms; (8, 64, 32, 32): 0.11 vs 0.19)."""
    x = r.x
    a, b = _fold(mean, rstd, r.plan, r)
    a, b = _expand(a, x.dim()), _expand(b, x.dim())
    u = (x * a).add_(b) if x.is_contiguous() else torch.addcmul(b, x, a)
    return apply_activation(u, r.activation).to(x.dtype)


@lru_cache(maxsize=64)
def _float32_ones(C: int, device: torch.device) -> torch.Tensor:
    with plain_tensors():  # kept for every later call
        return torch.ones(C, dtype=torch.float32, device=device)


@lru_cache(maxsize=256)
def _even_plan(size: int, groups: int) -> GroupPlan:
    return GroupPlan((size,) * groups)


def _run_request(r: Request, start: int, end: int, size: int, x: torch.Tensor) -> Request:
    """The part of ``r`` for channels start:end (an even plan of ``size``), on ``x``."""
    cols = slice(start, end)
    return Request(
        x,
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


def _sample_request(r: Request, rows: torch.Tensor) -> Request:
    """The part of ``r`` for the samples ``rows``."""
    return r._replace(
        x=r.x[rows],
        scale=None if r.scale is None else r.scale[rows],
        shift=None if r.shift is None else r.shift[rows],
    )


# |mean| * rstd up to which statistics from float sums of x and x^2 are trusted (the uneven
# plans' path below). ``var = E[x^2] - mean^2`` loses (1 + ratio^2) times the sums' relative
# error (a few ulp: torch's CPU sum is a cascade); measured against float64 on groups of one
# or two channels (the worst: no averaging over channels), 4096 to 1M positions, both layouts:
# 0.24 of the float32 tolerance at ratio 2, 0.45 at 3, 1.05 at 4 (with weight, bias and silu,
# 0.13 at ratio 0 and 0.48 at 1.8: the test at the limit). The check reads the ratio from the
# same sums, yet cannot pass by accident: their variance is within ~1e-6 mean^2 of the true
# one, so a true ratio above 2.0001 reads above 2 (docs/spec.md#numerics).
SUMS_TRUST = 2.0


def _sums_stats(x: torch.Tensor, plan: GroupPlan) -> tuple[np.ndarray, np.ndarray]:
    """float64 (N, G) mean and variance of x (N, C, *S) from each channel's sums of x and x^2
    (one pass each, in x's own layout; a half-precision x is summed as a float32 copy, so x^2
    cannot overflow), merged per group:
    ``mean = sum(x) / n``, ``var = max(sum(x^2) / n - mean^2, 0)``, n = group size * L.
    Exact only while ``|mean| * rstd <= SUMS_TRUST``: the callers check."""
    if x.dtype not in _NUMPY_FLOATS:
        x = x.float()
    if x.dim() == 2:
        s1, s2 = x, x * x
    else:
        dims = tuple(range(2, x.dim()))
        s1, s2 = x.sum(dims), (x * x).sum(dims)
    count = np.asarray(plan.sizes) * math.prod(x.shape[2:])
    firsts = np.asarray(plan.offsets[:-1])
    with np.errstate(invalid="ignore", over="ignore"):  # Inf and NaN fail the callers' check
        mean = np.add.reduceat(s1.numpy().astype(np.float64), firsts, axis=1) / count
        mean_sq = np.add.reduceat(s2.numpy().astype(np.float64), firsts, axis=1) / count
        return mean, np.maximum(mean_sq - mean * mean, 0.0)


def _sums_trusted(mean: np.ndarray, var: np.ndarray, eps: float) -> bool:
    """Whether every (sample, group) has ``|mean| <= SUMS_TRUST * sqrt(var + eps)``; NaN and
    Inf compare False, and at eps = 0 so does a constant group with a nonzero mean."""
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(mean) <= SUMS_TRUST * np.sqrt(var + eps)))


def _from_sums(x: torch.Tensor, plan: GroupPlan, eps: float) -> GroupStats | None:
    """Statistics of x from :func:`_sums_stats` where they are trusted at ``eps``, else None
    (:func:`_stats_of_moments`).

    Callers make sure autograd records nothing: the sums leave torch for NumPy."""
    if not x.numel():
        return None
    mean, var = _sums_stats(x, plan)
    if not _sums_trusted(mean, var, eps):
        return None
    return _stats_of_moments(mean, var, plan, x)


def _stats_of_moments(
    mean: np.ndarray,
    var: np.ndarray,
    plan: GroupPlan,
    x: torch.Tensor,
    lo: np.ndarray | float = 0.0,
) -> GroupStats:
    """float64 (N, G) mean and variance of x as :class:`GroupStats` in the accumulation dtype:
    ``pivot`` = the mean rounded, ``shifted_mean`` = the rest with ``lo``, what the float64
    mean leaves (:func:`cpu_kernel.low_part`), so the mean keeps at least float64's precision."""
    dtype = np.float64 if x.dtype == torch.float64 else np.float32
    pivot = mean.astype(dtype)
    count = np.asarray(plan.sizes, dtype=np.float64) * math.prod(x.shape[2:])  # (G,)
    pivot_t, shifted, m2, count_t = (
        torch.from_numpy(np.array(v, dtype=dtype))
        for v in (pivot, (mean - pivot) + lo, var * count, np.broadcast_to(count, mean.shape))
    )
    return GroupStats(pivot_t, shifted, m2, count_t, plan=plan)


def _torch_kernel_declines(x: torch.Tensor, plan: GroupPlan) -> bool:
    """Whether torch's kernel is not asked at all: an uneven plan (no per-run kernel calls, no
    copies of channel slices), or a layout it is not trusted with at any ratio (channels-last
    inputs past :func:`_trust_limit`'s sizes, strided views). Statistics of x then come from
    sums (:func:`_forward_from_sums`), and under autograd the fused kernel's forward and
    backward serve (:class:`_Fused`; channels-last float32 past 8^2 positions went to the
    composite path, 3-7x nn.GroupNorm's fwd + bwd), as they do for float32 everywhere
    (:func:`_fused_backward`). Torch's kernel, checked, keeps the rest."""
    return not plan.is_even or _trust_limit(x, plan) is None


def _fused_backward(x: torch.Tensor, plan: GroupPlan) -> bool:
    """Whether under autograd the fused kernel records the call (:class:`_Fused`, its backward
    summing in float64) rather than torch's kernel: where torch's kernel declines x, and for
    every float32 x. torch's float32 backward sums dweight and dbias over N * L in float32
    (dweight as rstd (sum dy x - mean sum dy)): at |mean| * rstd within the forward's trust
    limits it missed the float32 bound in 1.2 % of random draws at ratio 0.25 and by up to 1.8x
    at 0.5 and 3.1x at 2 NCHW (channels-last 2.1x at 0.5); its dx held. float64 held at 16."""
    return x.dtype is torch.float32 or _torch_kernel_declines(x, plan)


def _forward_from_sums(r: Request) -> torch.Tensor | None:
    """y from statistics of :func:`_sums_stats`, then one multiply-add on x
    (:func:`_multiply_add`); None where that is not exact or not served.

    Serves x of any layout and float dtype on a call autograd does not record, when every
    (sample, group) has ``|mean| * rstd <= SUMS_TRUST`` (NaN fails): two reductions and one
    multiply-add, faster than an uneven plan's per-run path (benchmarks/cpu_uneven.py)."""
    x = r.x
    if not x.numel() or _records_grad(r):
        return None
    mean, var = _sums_stats(x, r.plan)
    if not _sums_trusted(mean, var, r.eps):
        return None
    with np.errstate(divide="ignore"):  # eps = 0 on a constant group: inf, as torch's kernel
        rstd = 1.0 / np.sqrt(var + r.eps)
    acc = accumulation_dtype(x.dtype)
    return _multiply_add(r, torch.from_numpy(mean).to(acc), torch.from_numpy(rstd).to(acc))


def _native_checked(r: Request) -> torch.Tensor | None:
    """torch's kernel on the CPU, with samples whose statistics it cannot be trusted with redone
    (from sums where the layout's limit is below theirs, else on the composite path); None
    when the kernel cannot serve x at all. Uneven plans and layouts the kernel is not trusted
    with try :func:`_forward_from_sums` first.

    The check is per (sample, group), elementwise: a NaN or Inf group compares False (it is
    NaN either way) and cannot switch the check off for the other groups.
    """
    if _torch_kernel_declines(r.x, r.plan):
        y = _forward_from_sums(r)
        if y is not None:
            return y
    limit = _trust_limit(r.x, r.plan)
    if limit is None or _half_epilogue_with_grad(r) or _backward_crashes(r.x, r.weight, r.bias):
        return None
    if r.plan.is_even:
        y, mean, rstd = _native(r)
    else:
        if len(r.plan.runs) > MAX_NATIVE_RUNS:
            return None
        parts, means, rstds = [], [], []
        for start, end, size in r.plan.runs:
            # The slice skips the other runs' channels; a dense copy in x's memory format.
            xs = r.x[:, start:end].clone(memory_format=torch.preserve_format)
            if not _native_layout(xs):
                return None
            part, mean, rstd = _native(_run_request(r, start, end, size, xs))
            parts.append(part)
            means.append(mean)
            rstds.append(rstd)
        y = _like(torch.cat(parts, dim=1), r.x)
        mean, rstd = torch.cat(means, dim=1), torch.cat(rstds, dim=1)
    if _all_trusted(mean, rstd, limit):
        return y
    # Elementwise: a NaN group compares False here, the others as they are.
    bad = (mean * rstd).abs_().gt_(limit).any(dim=1)  # (N,)
    if not bad.any():
        return y
    # Under autograd the composite path's float32 weight gradient misses the bound at an
    # offset (sums of dy * xhat in float32); the kernel's sums go to float64.
    if _fused_can_record(r):
        return _record_fused(r)
    # Samples past a limit below the sums path's (float32 channels-last) try that path first.
    retry = _forward_from_sums if limit < SUMS_TRUST else None
    if bad.all() or _parameters_differentiated(r):
        # Every sample on one path: the kernel's weight and bias gradients and the redone
        # samples' would be added in the parameters' dtype, a half-precision one rounded twice
        # (bfloat16 dbias 0.17 off where rounding once is 0.08).
        return None if retry is None else retry(r)
    rows = bad.nonzero().squeeze(1)
    samples = _sample_request(r, rows)
    redone = None if retry is None else retry(samples)
    if redone is None:
        redone, _ = _composite(samples)
    return _like(y.index_copy(0, rows, redone), r.x)


def _fast_param(t: object, C: int) -> bool:
    return t is None or (
        isinstance(t, torch.Tensor) and t.is_cpu and t.shape == (C,) and t.is_contiguous()
    )


def native_fast(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> torch.Tensor | None:
    """The common eager CPU call in one step, or None to take the validated path.

    Serves what needs no checks beyond those below: an even plan, a float x on the CPU in a
    layout torch's kernel is trusted with (NCHW-contiguous; channels-last within
    :func:`_trust_limit`'s sizes), weight and bias of x's dtype (or None), a plain eps and at
    most an activation on a float32/float64 x. Runs torch's kernel once and returns its output
    when its float32 mean is trusted for every (sample, group); None for anything else,
    untrusted statistics and NaN included (the validated path then raises, or redoes the
    samples that need it). The arguments are as the user gave them: nothing is assumed of their
    types but what :func:`groupnorm.dispatch.run_plain` has checked.

    What the validated path gives the fused CPU kernel, it gets here too (:func:`_fused_fast`):
    x of any float dtype in either layout and any plan."""
    fused = _fused_fast(x, plan, weight, bias, eps, activation)
    if fused is not None:
        return fused
    if (
        torch._C._is_tracing()  # torch.jit.trace; run_plain has ruled out Dynamo
        or not x.is_cpu
        or not plan.is_even
        or x.dim() < 2
        or x.shape[1] != plan.num_channels
        or type(eps) is not float
        or not (eps >= 0 and eps < math.inf)
    ):
        return None
    if _transformed(x):
        return None  # before the layout queries below, which vmap's tensors do not answer
    # Channels-last: torch's kernel where the validated path asks it (_trust_limit), checked
    # against that layout's limit.
    limit = _nchw_trust(x.dtype) if x.is_contiguous() else _trust_limit(x, plan)
    if limit is None or _backward_crashes(x, weight, bias):
        return None
    if activation is not None and activation not in _FAST_ACTIVATIONS:
        return None
    N, C = x.shape[:2]
    L = x.numel() // (N * C) if N else 0
    if (
        x.dtype not in FLOAT_DTYPES
        or not L
        or (L == 1 and plan.min_size == 1)  # the validated path warns
        or not (_fast_param(weight, C) and _fast_param(bias, C))
        or not _final_in_kernel(x.dtype, weight, bias, activation)
        or torch._C._len_torch_dispatch_stack()
        or (forward_ad._current_level >= 0)
    ):
        return None
    if activation in _RECORDED_64 and x.dtype is torch.float32 and _differentiated(x, weight, bias):
        fmt = torch.contiguous_format if x.is_contiguous() else _CHANNELS_LAST[x.dim()]
        y, mean, rstd = _NativeAct.apply(x, weight, bias, (plan, activation, eps, fmt, N, C, L))
        return y if _all_trusted(mean, rstd, limit) else None
    y, mean, rstd = native_group_norm(x, weight, bias, N, C, L, plan.num_groups, eps)
    if not _all_trusted(mean, rstd, limit):
        return None
    return y if activation is None else apply_activation(y, activation)


def _differentiated(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` (reverse mode)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_FAST_ACTIVATIONS = ("silu", "gelu", "relu")
# The activations after which float32 second derivatives take float64 torch ops, rounded once
# (:class:`_NativeAct`, :class:`_SecondOrder64`), as :class:`_Fused`'s do.
_RECORDED_64 = ("silu", "gelu")


def _fused_fast(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> torch.Tensor | None:
    """:func:`native_fast`'s call on the fused CPU kernel, or None: float32/float64 x, also
    under autograd (:class:`_Fused`, where torch's kernel is not asked); half-precision x with
    at most relu (applied in the kernel, rounding once). Every
    check here runs on every such call: the cheapest and most selective first (run_plain has
    ruled out Dynamo, which would record some of them as graph ops, and tensor subclasses).
    torch.jit.trace first: it records x's sizes as tensors, so comparing them would warn."""
    if type(eps) is not float or torch._C._is_tracing():
        return None
    dtype = x.dtype
    half = dtype is torch.bfloat16 or dtype is torch.float16
    if not (half or dtype is torch.float32 or dtype is torch.float64) or not x.is_cpu:
        return None
    shape = x.shape
    if (
        len(shape) < 2
        or shape[1] != plan.num_channels
        or not (eps >= 0 and eps < math.inf)
        or (activation is not None and activation not in _FAST_ACTIVATIONS)
        or not (_fast_float_param(weight, shape[1]) and _fast_float_param(bias, shape[1]))
    ):
        return None
    grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    # Declined before the checks below, which native_fast makes again: under autograd torch's
    # kernel records float64 where it is trusted (_fused_backward).
    if grad and (half or not _fused_backward(x, plan)):
        return None
    if half and activation not in (None, "relu"):
        return None
    if (
        forward_ad._current_level >= 0
        or torch._C._len_torch_dispatch_stack()
        or _transformed(x)
        or (plan.min_size == 1 and math.prod(shape[2:]) == 1)  # the validated path warns
    ):
        return None
    if grad:
        if not cpu_kernel.serves(x):
            return None
        inside = _folded(activation)
        y = _Fused.apply(x, weight, bias, None, None, plan, eps, False, inside)
        return y if activation is inside else apply_activation(y, activation)
    y = cpu_kernel.forward_plain(x, shape, plan, weight, bias, eps, activation == "relu")
    if y is None or activation in (None, "relu"):
        return y
    return apply_activation(y, activation)


def activation_backward64(dy: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """dy act'(u) for SiLU or GELU in float64, rounded once to u's dtype: the kernel's
    (:func:`cpu_kernel.activation_backward`, float32) where it serves, torch's float64 ops
    otherwise. Not differentiable (a recorded backward takes :func:`_activation_grad64`)."""
    du = cpu_kernel.activation_backward(dy, u, activation)
    if du is not None:
        return du
    derivative = ACTIVATIONS[activation].backward
    assert derivative is not None  # the callers send SiLU and GELU only
    return derivative(dy.double(), u.double()).to(u.dtype)


def _activation_grad64(dy: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """dy act'(u) for SiLU or GELU as torch ops that autograd can differentiate again: a
    backward recorded for a gradient penalty. SiLU's is :class:`SiLUGrad`, whose derivative
    takes ``1 - sigmoid(u)`` as ``sigmoid(-u)``: autograd of ``s (1 + u (1 - s))`` forms the
    difference, 6.6e-13 off relatively at u = 9."""
    if activation == "silu":
        return SiLUGrad.apply(dy, u)
    cdf = 0.5 * torch.special.erfc(u * -0.7071067811865476)
    return dy * (cdf + u * torch.exp(-0.5 * u * u) * 0.3989422804014327)


def _folded(activation: str | None) -> str | None:
    """The activation :class:`_Fused` applies and differentiates itself (SiLU and GELU, whose
    derivative it takes in float64), or None: ReLU's derivative is a mask, exact as torch
    records it after."""
    return activation if activation is not None and ACTIVATIONS[activation].backward else None


KernelSums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dx, sum dy xhat, sum dy
KernelBackward = Callable[[torch.Tensor | None, bool], KernelSums]


class _Fused(torch.autograd.Function):
    """``y = (GN(x) * weight + bias) * (1 + scale) + shift`` on the fused CPU kernel under
    autograd, float32/float64 (scale and shift (N, C), either or both may be None): the forward
    keeps the float64 moments, the backward is the kernel's (dx and the per-channel sums in one
    call). Without scale and shift the sums are dweight and dbias; with them the kernel takes
    the per-sample weight ``w[c] (1 + scale[n, c])`` and returns the (N, C) sums
    B = sum dy * xhat and A = sum dy, from which dweight = sum_n (1 + scale) B,
    dbias = sum_n (1 + scale) A, dscale = w B + b A and dshift = A, in float64.

    ``activation`` (SiLU, GELU or None): y is act(u) of that u, applied by torch's op, and the
    backward takes dy through act'(u) in float64, rounded once (torch's float32 SiLU backward
    rounds several times, which the float64 sums carried into dweight at 1.006x the float32
    bound): for float32 x the kernel's backward does, at u recomputed from x in float64
    (:func:`cpu_kernel.fuses_activation`: the forward's float32 u, off by up to 1200 ulp where
    it is small with scale and shift, put dweight past the bound through act''), so u is
    not kept; otherwise torch's float64 ops at the kept u. One autograd node for both (a
    separate Function cost a (2, 64, 2, 2) SiLU training step 10 of its 104 µs).

    ``stats_out``: the outputs are ``(y, pivot, shifted_mean, m2)``, the (N, G) statistics from
    the float64 moments, pivot the mean rounded to x's dtype (not differentiable), shifted_mean
    and m2 differentiable in x: what reaches x through them, ``d shifted_mean / count +
    2 d m2 (x - mean)`` on each element of a group, the kernel's backward folds into its
    per-channel coefficients (``stats_grads``), so dx takes no extra pass.

    A backward that is itself recorded (``create_graph=True``: gradient penalties) forms the
    same quantities from float64 torch ops instead, u recomputed from the inputs
    (:func:`_recorded_grads`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        scale: torch.Tensor | None,
        shift: torch.Tensor | None,
        plan: GroupPlan,
        eps: float,
        stats_out: bool,
        activation: str | None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if scale is None and shift is None:
            u, moments = cpu_kernel.forward(x, plan, weight, bias, eps, want_moments=True)
            saved: tuple[torch.Tensor | None, ...] = (x, weight, bias, moments)
        else:
            s64 = None if scale is None else scale.double().contiguous()
            h64 = None if shift is None else shift.double().contiguous()
            u, moments = cpu_kernel.forward(
                x, plan, weight, bias, eps, want_moments=True, scale=s64, shift=h64
            )
            saved = (x, weight, bias, moments, scale, shift)
        # u only for an activation the kernel's backward does not take (each saved tensor
        # costs the backward an unpack, and memory until then)
        ctx.keeps_u = activation is not None and not cpu_kernel.fuses_activation(x, activation)
        ctx.save_for_backward(*saved, u) if ctx.keeps_u else ctx.save_for_backward(*saved)
        ctx.plan, ctx.eps, ctx.stats_out, ctx.activation = plan, eps, stats_out, activation
        y = u if activation is None else apply_activation(u, activation)
        if not stats_out:
            return y
        assert moments is not None  # want_moments
        mean, var, lo = moments
        pivot = mean.to(x.dtype)
        ctx.mark_non_differentiable(pivot)
        m2 = var * _group_counts(x, plan)
        return y, pivot, ((mean - pivot) + lo).to(x.dtype), m2.to(x.dtype)

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor, *stats: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        activation = ctx.activation
        if ctx.keeps_u:
            u, saved = saved[-1], saved[:-1]
        x, weight, bias, moments = saved[:4]
        scale, shift = saved[4:] if len(saved) > 4 else (None, None)
        plan, wanted = ctx.plan, ctx.needs_input_grad[:5]
        d_smean, d_m2 = stats[1:] if ctx.stats_out else (None, None)
        through = None
        if d_smean is not None and d_m2 is not None:
            # d shifted_mean / dx = 1 / count and d m2 / dx = 2 (x - mean), per group
            through = torch.stack((2 * d_m2.double(), d_smean.double() / _group_counts(x, plan)))
        if _backward_in_torch_ops(dy, *stats):
            params = (weight, bias, scale, shift)
            grads = _recorded_grads(dy, x, params, plan, ctx.eps, activation, wanted, through)
            return (*grads, None, None, None, None)
        in_kernel = None  # the activation the kernel's backward takes
        if ctx.keeps_u:
            dy = activation_backward64(dy, u, activation)
        else:
            in_kernel = activation
        # The kernel stores the float64 sums as a float32 weight's gradient (no conversion
        # after) where the bias, if any, is of the weight's dtype too; it stores no half
        # precision (a bfloat16 weight on float32 x), which takes float64 sums, rounded once.
        sums = (
            weight.dtype
            if weight is not None
            and weight.dtype in _NUMPY_FLOATS
            and (bias is None or bias.dtype is weight.dtype)
            else torch.float64
        )

        def backward(w: torch.Tensor | None, per_sample: bool) -> KernelSums:
            return cpu_kernel.backward(
                x, dy, plan, w, moments, ctx.eps, per_sample=per_sample, stats_grads=through,
                sums_dtype=torch.float64 if per_sample else sums, activation=in_kernel,
                u_bias=None if in_kernel is None else _u_bias(x, bias, scale, shift, per_sample),
            )  # fmt: skip

        grads = kernel_grads(backward, x, weight, bias, scale, shift, wanted)
        return (*grads, None, None, None, None)


def _backward_in_torch_ops(*grads: torch.Tensor | None) -> bool:
    """Whether a fused Function's backward runs in float64 torch ops instead of the kernel:
    where it is itself recorded (second derivatives), and where an incoming gradient is batched
    by vmap over the backward (``autograd.grad(is_grads_batched=True)``,
    ``jacobian(vectorize=True)``), whose values the kernel cannot read."""
    return torch.is_grad_enabled() or any(
        g is not None and (torch._C._functorch.is_functorch_wrapped_tensor(g) or _vmapped(g))
        for g in grads
    )


def _u_bias(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    per_sample: bool,
) -> torch.Tensor | None:
    """u's offset for :func:`cpu_kernel.backward`'s activation, float64 contiguous:
    ``bias * (1 + scale) + shift`` (N, C) where ``per_sample``, else bias (C,); None for 0."""
    b = None if bias is None else bias.double()
    if not per_sample:
        return None if b is None else b.contiguous()
    ub = torch.zeros(x.shape[:2], dtype=torch.float64, device=x.device)
    if b is not None:
        ub = ub + (b if scale is None else b * (1 + scale.double()))
    return ub if shift is None else ub + shift.double()


def _u64(
    centered: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    plan: GroupPlan,
) -> torch.Tensor:
    """:class:`_Fused`'s u = (GN(x) * weight + bias) * (1 + scale) + shift, the output before
    the activation, in float64 torch ops that autograd records (for a recorded backward), from
    :func:`_centered64`'s ``(x - mean, rstd)``."""
    xc, rstd = centered
    return affine64(xc * _spread_groups(rstd, plan, xc.dim()), weight, bias, scale, shift)


def affine64(
    xhat: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """``(xhat * weight + bias) * (1 + scale) + shift`` in float64 for float64 xhat (N, C, *S):
    weight and bias (C,), scale and shift (N, C), each optional."""
    nd = xhat.dim()
    if weight is not None:
        xhat = xhat * _expand(weight.double()[None], nd)
    if bias is not None:
        xhat = xhat + _expand(bias.double()[None], nd)
    if scale is not None:
        xhat = xhat * _expand(1 + scale.double(), nd)
    if shift is not None:
        xhat = xhat + _expand(shift.double(), nd)
    return xhat


def _centered64(x: torch.Tensor, plan: GroupPlan, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x - mean (float64, x's shape) and rstd (N, G), the statistics recomputed from x in float64
    torch ops that autograd records. x is first shifted by each group's pivot, the mean of its
    first channel (detached): unshifted, the float64 mean of a group at 1000 +- 0.003 was off by
    its rounding relative to 1000, which put dx with create_graph=True at 117x the float64
    bound (its second derivative 1,360x)."""
    counts = _group_counts(x, plan)
    x64 = x.double()
    pivot = _means(x64.detach()[:, plan_index(plan, x.device).first]).flatten(1)  # (N, G)
    shifted = x64 - _spread_groups(pivot, plan, x.dim())
    xc = shifted - _spread_groups(_group_sum(_spatial_sum(shifted), plan) / counts, plan, x.dim())
    rstd = torch.rsqrt(_group_sum(_spatial_sum(xc * xc), plan) / counts + eps)
    return xc, rstd


def _recorded_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    params: tuple[
        torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None
    ],
    plan: GroupPlan,
    eps: float,
    activation: str | None,
    wanted: tuple[bool, ...],
    stats_grads: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """:class:`_Fused`'s gradients (dx, dweight, dbias, dscale, dshift) as float64 torch ops
    that autograd records (:func:`_backward64`), for a backward that is itself differentiated;
    ``params`` are weight, bias, scale and shift, ``wanted`` which gradients to form. The
    statistics and u (before SiLU or GELU) are recomputed from x, so that second derivatives
    see them depend on it. These are partial derivatives in each input: where one input of
    :class:`_Fused` is computed from another (scale from x), autograd adds each path once
    (differentiating the composite forward would count the path through scale twice).

    Each input is converted to float64 once, each gradient rounded to its input's dtype once:
    converted for u and for the backward separately, a second derivative took two float64
    terms for one float32 input, each rounded, and added them in float32, where they cancel
    (SiLU at std 3e-3: 11.7x the float32 bound in x, 22x in weight with scale)."""
    x64 = x.double()
    w64, b64, s64, h64 = (None if t is None else t.double() for t in params)
    centered = _centered64(x64, plan, eps)
    if activation is not None:
        u64 = _u64(centered, w64, b64, s64, h64, plan)
        dy = _activation_grad64(dy.double(), u64, activation)
    xc, rstd = centered

    def backward(w: torch.Tensor | None, per_sample: bool) -> KernelSums:
        return _backward64(xc, dy, plan, w, rstd, per_sample, stats_grads)

    grads = kernel_grads(backward, x64, w64, b64, s64, h64, wanted)
    inputs = (x, *params)
    return tuple(
        None if g is None or t is None else g.to(t.dtype)
        for g, t in zip(grads, inputs, strict=True)
    )


def _backward64(
    xc: torch.Tensor,
    dy: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    per_sample: bool,
    stats_grads: torch.Tensor | None = None,
) -> KernelSums:
    """:func:`cpu_kernel.backward`'s ``(dx, dw, db)`` in float64 torch ops, from xc = x - mean
    (float64, (N, C, *S)) and rstd (N, G): with xhat = xc rstd, A = sum dy and B = sum dy xhat
    per (n, c), k1 = sum_c w A / count and k2 = sum_c w B / count per group,
    dx = rstd (dy w - k1 - xhat k2) (+ a xc + b from ``stats_grads`` (a, b)), float64; weight
    (C,), or (N, C) where ``per_sample``, or None."""
    N, C = xc.shape[:2]
    nd = xc.dim()
    counts = _group_counts(xc, plan)
    dy64 = dy.double()
    r = _spread_groups(rstd, plan, nd)
    xhat = xc * r
    B, A = _spatial_sum(dy64 * xhat), _spatial_sum(dy64)
    w = torch.ones(C, dtype=torch.float64, device=xc.device) if weight is None else weight.double()
    k1, k2 = (_spread_groups(_group_sum(w * s, plan) / counts, plan, nd) for s in (A, B))
    dx = r * (dy64 * _expand(w.expand(N, C), nd) - k1 - xhat * k2)
    if stats_grads is not None:
        a, b = (_spread_groups(t, plan, nd) for t in stats_grads)
        dx = dx + a * xc + b
    return (dx, B, A) if per_sample else (dx, B.sum(0), A.sum(0))


class _SecondOrder64(torch.autograd.Function):
    """Passes y of a call with SiLU or GELU that torch's ops record where the fused kernel would
    have recorded it (:func:`_second_order64`; the kernel not built, switched off or not reading
    x) through, so its first derivatives stay those ops'
    (ordinary training pays one Python node), while a backward that is itself recorded
    (``create_graph=True``: gradient penalties, Hessian-vector products) takes
    :class:`_Fused`'s float64 one instead (:func:`_recorded_grads`), rounded once: autograd of
    torch's float32 ops put such second derivatives at 2.3-53x the float32 bound at std 3e-3.

    The inputs are y, then x, weight, bias, scale, shift as the call gave them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        scale: torch.Tensor | None,
        shift: torch.Tensor | None,
        plan: GroupPlan,
        eps: float,
        activation: str,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias, scale, shift)
        ctx.plan, ctx.eps, ctx.activation = plan, eps, activation
        # detached, not y itself: an input handed back is a view to autograd, which then
        # refuses in-place changes of the output (h = gn(x); h += residual)
        return y.detach()

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if not torch.is_grad_enabled():
            return (dy, *(None,) * 8)  # to torch's recorded ops
        x, *params = ctx.saved_tensors
        grads = _recorded_grads(
            dy, x, tuple(params), ctx.plan, ctx.eps, ctx.activation, ctx.needs_input_grad[1:6], None
        )
        return (None, *grads, None, None, None)


class _NativeAct(torch.autograd.Function):
    """:func:`native_fast`'s float32 call with SiLU or GELU under autograd: ``(act(u), mean,
    rstd)`` of torch's kernel (u its output; mean and rstd not differentiable) as one node,
    whose first derivatives are those of the aten ops autograd would record for the same call
    (silu_backward or gelu_backward, then native_group_norm_backward: a training step of
    (2, 64, 8, 8) through group_norm takes 9 us more than with their two nodes, 47 us, where a
    pass-through node after them, :class:`_SecondOrder64`, cost 13), and whose backward, where
    it is itself recorded, is :class:`_Fused`'s float64 one (:func:`_recorded_grads`). ``call`` is
    ``(plan, activation, eps, x's memory format, N, C, L)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        call: tuple[GroupPlan, str, float, torch.memory_format, int, int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        plan, activation, eps, _, N, C, L = call
        u, mean, rstd = torch.native_group_norm(x, weight, bias, N, C, L, plan.num_groups, eps)
        ctx.save_for_backward(x, weight, bias, u, mean, rstd)
        ctx.call = call
        ctx.mark_non_differentiable(mean, rstd)
        return apply_activation(u, activation), mean, rstd

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, u, mean, rstd = ctx.saved_tensors
        plan, activation, eps, fmt, N, C, L = ctx.call
        wanted = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            params = (weight, bias, None, None)
            grads = _recorded_grads(
                dy, x, params, plan, eps, activation, (*wanted, False, False), None
            )
            return (*grads[:3], None)
        # The resolved overloads: each op packet's lookup cost a microsecond per call.
        # The kernel reads dy in x's layout, unchecked, as autograd hands it over (a dy of
        # another layout gave dx off by 4.3 on channels-last x)
        du = _ACTIVATION_BACKWARD[activation](dy, u).contiguous(memory_format=fmt)
        dx, dw, db = _GROUP_NORM_BACKWARD(
            du, x, mean, rstd, weight, N, C, L, plan.num_groups, wanted
        )
        return dx, dw, db, None


_ACTIVATION_BACKWARD = {
    "silu": torch.ops.aten.silu_backward.default,
    "gelu": torch.ops.aten.gelu_backward.default,
}
_GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default


def _second_order64(
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    plan: GroupPlan,
    eps: float,
    activation: str | None,
) -> torch.Tensor:
    """y of a call on torch's ops, through :class:`_SecondOrder64` where that call has SiLU or
    GELU, autograd records it, and the fused kernel would have recorded it where it serves
    (:func:`_fused_backward`: float32, and float64 on an uneven plan or a layout torch's kernel
    declines, whose SiLU double backward in torch's ops put a Hessian-vector product at up to
    1.9x the float64 bound); else y as it is."""
    if (
        y.requires_grad
        # the node has no jvp: under any open dual level, not only for a dual x (a dual weight,
        # scale or shift would reach it too), forward AD keeps torch's ops
        and forward_ad._current_level < 0
        and activation in _RECORDED_64
        and x.dtype in _NUMPY_FLOATS
        and _fused_backward(x, plan)
    ):
        return _SecondOrder64.apply(y, x, weight, bias, scale, shift, plan, eps, activation)
    return y


class _FusedGiven(torch.autograd.Function):
    """``y = act(GN(x; given statistics) * weight + bias)`` on the fused CPU kernel under
    autograd, float32/float64 x, the statistics as their four (N, G) fields (pivot,
    shifted_mean, m2, count), each differentiable. The backward takes dx = rstd dy w and the
    (N, C) sums A = sum dy and B = sum dy x_hat from the kernel (told the statistics are
    constants), or, where the backward is itself recorded, from float64 torch ops on the saved
    tensors (partial derivatives, so that nothing reaching x also through the statistics is
    counted twice); the rest from them in float64 (:func:`_given_grads`). ``activation`` (SiLU,
    GELU or None) as in :class:`_Fused`: its derivative in float64 at u recomputed from x, by
    the kernel's backward where it takes it (u then not kept)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        pivot: torch.Tensor,
        smean: torch.Tensor,
        m2: torch.Tensor,
        count: torch.Tensor,
        plan: GroupPlan,
        eps: float,
        activation: str | None,
    ) -> torch.Tensor:
        moments = _given_moments(pivot, smean, m2, count)
        u, _ = cpu_kernel.forward(x, plan, weight, bias, eps, moments=moments)
        saved = (x, weight, bias, pivot, smean, m2, count, moments)
        ctx.keeps_u = activation is not None and not cpu_kernel.fuses_activation(x, activation)
        ctx.save_for_backward(*saved, u) if ctx.keeps_u else ctx.save_for_backward(*saved)
        ctx.plan, ctx.eps, ctx.activation = plan, eps, activation
        return u if activation is None else apply_activation(u, activation)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors  # each access unpacks them all
        x, weight, bias, pivot, smean, m2, count, moments = saved[:8]
        plan, eps, activation = ctx.plan, ctx.eps, ctx.activation
        N, C = x.shape[:2]
        w = (
            torch.ones(C, dtype=torch.float64, device=x.device)
            if weight is None
            else weight.double()
        )
        # 1 / sqrt, not rsqrt (1 % of values differ by an ulp): the kernel's rstd bit for bit,
        # which _given_grads needs (differentiable when recorded)
        rstd = torch.sqrt(m2.double() / count.double() + eps).reciprocal()
        if _backward_in_torch_ops(dy):
            p, m, r = (_per_channel(v, plan) for v in (pivot.double(), smean.double(), rstd))
            # x - pivot, then the rest: pivot + smean as one float64 number would be off by
            # up to half an ulp of the pivot
            xhat = ((x.double() - _expand(p, x.dim())) - _expand(m, x.dim())) * _expand(r, x.dim())
            dy64 = dy.double()
            if activation is not None:
                u64 = affine64(xhat, weight, bias, None, None)
                dy64 = _activation_grad64(dy64, u64, activation)
            dx = (dy64 * _expand(w * r, x.dim())).to(x.dtype)
            B, A = _spatial_sum(dy64 * xhat), _spatial_sum(dy64)
        else:
            in_kernel = None
            if ctx.keeps_u:
                dy = activation_backward64(dy, saved[8], activation)
            else:
                in_kernel = activation
            dx, B, A = cpu_kernel.backward(
                x, dy, plan, w.expand(N, C).contiguous(), moments, eps, per_sample=True,
                stats_given=True, activation=in_kernel,
                u_bias=None if in_kernel is None else _u_bias(x, bias, None, None, True),
            )  # fmt: skip
        grads = _given_grads(A, B, w, rstd, (weight, bias, pivot, smean, m2, count), plan)
        wanted = ctx.needs_input_grad
        return (
            dx if wanted[0] else None,
            *(g if want else None for g, want in zip(grads, wanted[1:7], strict=True)),
            None,
            None,
            None,
        )


def _given_grads(
    A: torch.Tensor,
    B: torch.Tensor,
    w: torch.Tensor,
    rstd: torch.Tensor,
    inputs: tuple[torch.Tensor | None, ...],
    plan: GroupPlan,
) -> list[torch.Tensor | None]:
    """Gradients of (weight, bias, pivot, shifted_mean, m2, count) of a call with statistics
    given, from the (N, C) sums A = sum dy and B = sum dy x_hat, weight w (C,) and rstd (N, G),
    float64: dweight = sum_n B, dbias = sum_n A; with S1 = sum_c (w rstd) A, S2 = sum_c w B
    per group, dmean = -S1 (pivot and shifted_mean alike), dvar = -rstd^2 S2 / 2,
    dm2 = dvar / count, dcount = -dvar m2 / count^2. Each in its input's dtype, None where the
    input is.

    dmean takes rstd w per channel first, the factor of the direct dx = dy (w rstd), so that
    in a group of one element (S1 = w rstd dy) the two reach x as exact negatives: taken as
    rstd (w A) they differed by a rounding of rstd |w dy|, and float64 dx was up to 58x the
    float64 bound where it is 0."""
    weight, bias, pivot, smean, m2, count = inputs
    d_mean = -_group_sum(w * _per_channel(rstd, plan) * A, plan)
    d_var = -0.5 * rstd * rstd * _group_sum(w * B, plan)
    m2d, countd = m2.double(), count.double()  # type: ignore[union-attr]
    grads = (
        B.sum(0),
        A.sum(0),
        d_mean,
        d_mean,
        d_var / countd,
        -d_var * m2d / (countd * countd),
    )
    return [None if t is None else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True)]


def _given_moments(
    pivot: torch.Tensor, smean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """float64 (3, N, G) moments of given statistics as the fused kernel reads them: the mean
    pivot + smean as a float64 number and its low part, and the variance."""
    mean, lo = cpu_kernel.low_part(pivot, smean)
    return torch.stack((mean, m2.double() / count.double(), lo))


def _group_counts(x: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """(G,) float64: the elements of each group of one sample of x."""
    return plan_index(plan, x.device).sizes.double() * math.prod(x.shape[2:])


def kernel_grads(
    backward: KernelBackward,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    wanted: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients (dx, dweight, dbias, dscale, dshift) of :class:`_Fused`'s y, None where
    ``wanted`` says no, from ``backward(weight, per_sample)``: the kernel's backward for one dy
    (:func:`cpu_kernel.backward`, or its op under torch.compile), dx and the per-channel
    sums of dy * xhat and of dy (summed in float64), from which the parameters' gradients are
    assembled in float64."""
    dw = db = ds = dh = None
    if scale is None and shift is None:
        dx, B, A = backward(weight, False)
        # The kernel stores them in weight's dtype where it can (a no-op .to costs a call)
        if wanted[1] and weight is not None:
            dw = B if B.dtype is weight.dtype else B.to(weight.dtype)
        if wanted[2] and bias is not None:
            db = A if A.dtype is bias.dtype else A.to(bias.dtype)
        return dx if wanted[0] else None, dw, db, None, None
    N, C = x.shape[:2]
    s1 = (
        torch.ones((N, C), dtype=torch.float64, device=x.device)
        if scale is None
        else 1 + scale.double()
    )
    w = torch.ones(C, dtype=torch.float64, device=x.device) if weight is None else weight.double()
    dx, B, A = backward((w * s1).contiguous(), True)
    if wanted[1] and weight is not None:
        dw = (s1 * B).sum(0).to(weight.dtype)
    if wanted[2] and bias is not None:
        db = (s1 * A).sum(0).to(bias.dtype)
    if wanted[3] and scale is not None:
        ds = (w * B if bias is None else w * B + bias.double() * A).to(scale.dtype)
    if wanted[4] and shift is not None:
        dh = A.to(shift.dtype)
    return dx if wanted[0] else None, dw, db, ds, dh


def _fast_float_param(t: object, C: int) -> bool:
    """None, or a contiguous floating (C,) CPU tensor or Parameter (what the kernel reads as it
    is; ``type() in`` because isinstance on a Parameter costs more than the rest together)."""
    if t is None:
        return True
    if type(t) not in _PLAIN_TENSORS:
        return False
    p = cast(torch.Tensor, t)
    return p.is_cpu and p.dtype in _FLOAT_SET and p.shape == (C,) and p.is_contiguous()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_FLOAT_SET = frozenset(FLOAT_DTYPES)


def _final_in_kernel(
    dtype: torch.dtype,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
) -> bool:
    """Whether torch's kernel applies weight and bias itself, rounding once: both in x's
    ``dtype`` (or None), and an activation only after a float32 or float64 output (after a
    half-precision one it would round a second time)."""
    return (
        (weight is None or weight.dtype == dtype)
        and (bias is None or bias.dtype == dtype)
        and (activation is None or dtype == accumulation_dtype(dtype))
    )


def _kernel_output_is_final(r: Request) -> bool:
    """Whether torch's kernel output, at most followed by an activation, is y: no scale or
    shift, and :func:`_final_in_kernel`."""
    return (
        r.scale is None
        and r.shift is None
        and _final_in_kernel(r.x.dtype, r.weight, r.bias, r.activation)
    )


def _half_epilogue_with_grad(r: Request) -> bool:
    """A half-precision x with an epilogue, under autograd: the forward below is rounded once,
    but its gradient would run through torch's half-precision kernel backward (seen: bf16 dx at
    1.7x the tolerance table's allowance); the composite path's gradient is float32 throughout."""
    if r.x.dtype not in (torch.float16, torch.bfloat16) or not torch.is_grad_enabled():
        return False
    tensors = (r.x, r.weight, r.bias, r.scale, r.shift)
    if not any(t is not None and t.requires_grad for t in tensors):
        return False
    return not _kernel_output_is_final(r)


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's memory format (cat picks NCHW when a one-channel part is both layouts at once)."""
    if x.is_contiguous():
        return y
    like = torch.empty_like(x, dtype=y.dtype)
    return y if like.stride() == y.stride() else like.copy_(y)


def _stats_as_values(x: torch.Tensor) -> bool:
    """Whether statistics of x may be computed as values, outside autograd: an eager CPU call
    that records no gradient of x, in reverse or forward mode."""
    return (
        not (x.requires_grad and torch.is_grad_enabled())
        and forward_ad._current_level < 0
        and _reads_values(x)
    )


def _stats_native(x: torch.Tensor, plan: GroupPlan) -> GroupStats | None:
    """Statistics from torch's kernel, or None: on an eager CPU call without autograd (the
    kernel's mean and rstd have no gradient), an even plan and a layout whose statistics the
    kernel is trusted with, when every (sample, group) is trusted. Uneven plans take them from
    sums of x and x^2 under the same conditions (:func:`_from_sums`).

    eps = 0 makes rstd = 1 / std, so ``var = rstd^-2`` has no cancellation against eps, and
    ``|mean| * rstd`` within the layout's limit puts the mean within ~1e-6 of the spread of
    the exact one (see NATIVE_TRUST): kept as ``pivot = mean``, ``shifted_mean = 0``. A
    constant group (rstd = inf) or NaN fails the check. The kernel's y is discarded."""
    if not _stats_as_values(x):
        return None
    if _torch_kernel_declines(x, plan):
        return _from_sums(x, plan, 0.0)
    limit = _trust_limit(x, plan)
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    if limit is None or not N * L:
        return None
    acc = accumulation_dtype(x.dtype)
    # A float32 weight makes the kernel return float32 mean and rstd for a half x.
    w = None if x.dtype == acc else _float32_ones(C, x.device)
    _, mean, rstd = torch.native_group_norm(x, w, None, N, C, L, plan.num_groups, 0.0)
    if not _all_trusted(mean, rstd, limit):
        return None
    return _kernel_stats(mean, rstd.pow(-2), plan, x)


def _parameters_differentiated(r: Request) -> bool:
    """Whether autograd will differentiate ``r``'s weight or bias (reverse mode)."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (r.weight, r.bias)
    )


def _records_grad(r: Request) -> bool:
    """Whether autograd records this call. The unshifted multiply-add's gradients for weight and
    the statistics would cancel terms ~|mean| * rstd times larger than themselves; the shifted
    path's do not. Forward mode counts too: its tangents would cancel alike."""
    if forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    tensors = [r.x, r.weight, r.bias, r.scale, r.shift]
    if r.stats is not None:
        tensors += [r.stats.pivot, r.stats.shifted_mean, r.stats.m2]
    return any(t is not None and t.requires_grad for t in tensors)


def _stats(r: Request) -> GroupStats:
    """The statistics of ``r.x``: from the fused CPU kernel, else from torch's kernel where it
    is trusted, else exact."""
    x = r.x
    if _stats_as_values(x) and cpu_kernel.serves(x):
        mean, var, lo = cpu_kernel.stats(x, r.plan).numpy()
        return _stats_of_moments(mean, var, r.plan, x, lo)
    return _stats_native(x, r.plan) or compute_stats(x, r.plan)


def _composite(r: Request) -> tuple[torch.Tensor, GroupStats | None]:
    """Statistics of the pivot-shifted input (or the given ones), then one multiply-add.

    Given statistics, on an eager CPU call that autograd does not record, y is one multiply-add
    on x itself while every ``|mean| * rstd`` is within :func:`_nchw_trust`, without forming
    ``x - pivot`` (:func:`_multiply_add`). Float32 x is shifted and normalized in float64
    (:func:`_widens`), statistics out rounded back to float32 (:func:`_narrowed`)."""
    given = r.stats
    if given is not None and _reads_request(r) and not _records_grad(r):
        mean, rstd = given.mean, torch.rsqrt(given.var + r.eps)
        if _all_trusted(mean, rstd, _nchw_trust(r.x.dtype)):
            return _multiply_add(r, mean, rstd), (given if r.return_stats else None)
    wide = _widens(r.x)
    pivot = None if given is None else given.pivot
    xs, pivot = _shifted(r.x, r.plan, pivot, torch.float64 if wide else None)
    stats = _stats_of_shifted(xs, pivot, r.plan) if given is None else given
    acc = xs.dtype
    var = stats.m2.to(acc) / stats.count.to(acc)
    a, b = _fold(stats.shifted_mean.to(acc), torch.rsqrt(var + r.eps), r.plan, r)
    y = apply_activation(xs * _expand(a, xs.dim()) + _expand(b, xs.dim()), r.activation)
    if not r.return_stats:
        return y.to(r.x.dtype), None
    return y.to(r.x.dtype), (_narrowed(stats) if wide and given is None else stats)


def _fused_serves(r: Request) -> bool:
    """Whether the fused CPU kernel (:mod:`.cpu_kernel`) serves ``r``: an eager CPU call that
    autograd does not record, on x of a layout and dtype it reads.

    Half precision included, where torch's kernel would be trusted too: in NCHW torch's float16
    CPU kernel takes 3-5x the fused kernel's time ((2, 320, 64, 64): 2.2 against 0.71 ms), its
    bfloat16 kernel 1.42-1.51x (one thread, AMD EPYC, 2026-12-04). Channels-last, over
    F.group_norm on the spec's shapes of 1 MB and more (Intel Xeon, 2026-12-05, two runs at one
    and two threads), the fused kernel took 0.46-1.05x at one thread and 0.46-1.09x at two
    where torch's checked kernel took 1.01-1.09x and 1.02-1.13x (bfloat16, the day before:
    0.80-1.07x against 1.02-1.08x), R50-GN's C5 (2048 channels) 0.46x against 1.01x; at SD
    8^2's 64 positions float16 took 0.42-0.44x F.group_norm's time. Half precision is judged
    against torch's own kernel; the fused kernel rounds once from float32 either way."""
    x = r.x
    return _reads_request(r) and cpu_kernel.serves(x) and not _records_grad(r)


def _fused_records(r: Request) -> bool:
    """Whether the fused CPU kernel serves ``r`` under autograd (:class:`_Fused`): an eager
    float32/float64 CPU call in a layout it reads, with weight, bias, scale, shift and an
    activation at most (SiLU and GELU inside the Function, ReLU recorded after it), no
    statistics in or out, reverse mode only, for float32 and where torch's kernel does not serve it
    (:func:`_fused_backward`). Where torch's kernel does, but its statistics fail the check,
    :func:`_native_checked` redoes the call here too (:func:`_fused_can_record`). That check
    first: it declines graph captures before :func:`_fused_backward` compares x's sizes, which
    torch.export with dynamic shapes would record as guards it then cannot solve."""
    return _fused_can_record(r) and _fused_backward(r.x, r.plan)


def _fused_records_given(r: Request) -> bool:
    """Whether :class:`_FusedGiven` records ``r``: statistics given, none returned, no scale or
    shift (:func:`_kernel_records`)."""
    return (
        r.stats is not None
        and not r.return_stats
        and r.scale is None
        and r.shift is None
        and _kernel_records(r)
    )


def _record_fused_given(r: Request) -> torch.Tensor:
    """y of ``r`` from :class:`_FusedGiven`, SiLU or GELU inside it (:func:`_folded`), ReLU
    after."""
    assert r.stats is not None
    s = r.stats
    w, b = (None if t is None else t.contiguous() for t in (r.weight, r.bias))
    inside = _folded(r.activation)
    y = _FusedGiven.apply(r.x, w, b, s.pivot, s.shifted_mean, s.m2, s.count, r.plan, r.eps, inside)
    return y if r.activation is inside else apply_activation(y, r.activation)


def _fused_can_record(r: Request, stats_out: bool = False) -> bool:
    return r.stats is None and r.return_stats is stats_out and _kernel_records(r)


def _kernel_records(r: Request) -> bool:
    """What every autograd Function on the fused CPU kernel needs: float32/float64 x in a
    layout the kernel reads, autograd recording the call, reverse mode only."""
    x = r.x
    return (
        x.dtype in _NUMPY_FLOATS
        and forward_ad._current_level < 0
        and _reads_request(r)
        and cpu_kernel.serves(x)
        and _records_grad(r)
    )


def _record_fused(r: Request) -> torch.Tensor:
    """y of ``r`` from :class:`_Fused`, SiLU or GELU inside it (:func:`_folded`), ReLU after."""
    w, b = (None if t is None else t.contiguous() for t in (r.weight, r.bias))
    inside = _folded(r.activation)
    y = _Fused.apply(r.x, w, b, r.scale, r.shift, r.plan, r.eps, False, inside)
    return y if r.activation is inside else apply_activation(y, r.activation)


def _record_fused_stats(r: Request) -> tuple[torch.Tensor, GroupStats]:
    """y and the statistics of ``r`` from :class:`_Fused` (float32 and float64 x with
    statistics out under autograd, where the composite path took 8-13x the plain call's
    forward and backward), SiLU or GELU inside it, ReLU after."""
    w, b = (None if t is None else t.contiguous() for t in (r.weight, r.bias))
    inside = _folded(r.activation)
    y, pivot, smean, m2 = _Fused.apply(r.x, w, b, r.scale, r.shift, r.plan, r.eps, True, inside)
    count = _group_counts(r.x, r.plan).to(smean.dtype).expand_as(smean).contiguous()
    y = y if r.activation is inside else apply_activation(y, r.activation)
    return y, GroupStats(pivot, smean, m2, count, plan=r.plan)


def _fused(r: Request) -> tuple[torch.Tensor, GroupStats | None]:
    """y, and the statistics when asked for, from the fused CPU kernel (:func:`_fused_serves`).

    relu is applied in the kernel; silu and gelu after it, on a float32 output for a half x,
    which is then rounded once."""
    x, plan, given = r.x, r.plan, r.stats
    moments = None
    if given is not None:
        moments = _given_moments(given.pivot, given.shifted_mean, given.m2, given.count)
    after = r.activation if r.activation in ("silu", "gelu") else None
    half = x.dtype in (torch.float16, torch.bfloat16)
    y, moments = cpu_kernel.forward(
        x,
        plan,
        None if r.weight is None else r.weight.contiguous(),
        None if r.bias is None else r.bias.contiguous(),
        r.eps,
        relu=r.activation == "relu",
        out_dtype=torch.float32 if after is not None and half else x.dtype,
        moments=moments,
        want_moments=r.return_stats,
        scale=None if r.scale is None else r.scale.double().contiguous(),
        shift=None if r.shift is None else r.shift.double().contiguous(),
    )
    if after is not None:
        y = apply_activation(y, after).to(x.dtype)
    if not r.return_stats:
        return y, None
    if given is not None:
        return y, given
    assert moments is not None
    mean, var, lo = moments.numpy()
    return y, _stats_of_moments(mean, var, plan, x, lo)


def _forward_ad_on_channels_last(x: torch.Tensor) -> bool:
    """torch's kernel has no forward-mode derivative for a non-contiguous input."""
    return forward_ad._current_level >= 0 and not x.is_contiguous()


def _compiles_fused(r: Request) -> bool:
    """Whether a call that torch.compile records (not an export: ONNX has no such op) runs the
    fused CPU kernel's ops (:mod:`.compiled`): float32/float64 CPU x, no statistics in or out,
    reverse mode only. Strided views too, which the ops take through float64 torch ops: on
    pivot-shifted input inductor's float32 mean put y at 23x and dweight at 20x the float32
    bound for a first element 21 deviations from its group's mean (a zero of padding before
    data at -500 +- 10)."""
    x = r.x
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and x.device.type == "cpu"
        and x.dtype in _NUMPY_FLOATS
        and r.stats is None
        and not r.return_stats
        and forward_ad._current_level < 0
        and x.numel() > 0
    )


def _compiled_fused(r: Request) -> torch.Tensor:
    """y of ``r`` from ``groupnorm::cpu_forward``; relu, which rounds nothing, recorded after
    it, SiLU and GELU inside it."""
    inside = r.activation if r.activation in ("silu", "gelu") else None
    y, _ = torch.ops.groupnorm.cpu_forward(
        r.x, r.weight, r.bias, r.scale, r.shift, list(r.plan.sizes), r.eps, inside
    )
    return y if inside is not None or r.activation is None else apply_activation(y, r.activation)


def _functorch_differentiates(r: Request) -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, jacrev, jacfwd) differentiates this
    call: one of its tensors is one of their wrappers (never while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    wrapped = torch._C._functorch.is_gradtrackingtensor
    return any(t is not None and wrapped(t) for t in (r.x, r.weight, r.bias, r.scale, r.shift))


def _vmapped(x: torch.Tensor) -> bool:
    """Whether x is batched by torch.func.vmap or by the legacy vmap of batched gradients (never
    while torch.compile traces, which cannot call these queries)."""
    functorch = torch._C._functorch
    return not torch.compiler.is_compiling() and (
        functorch.is_batchedtensor(x) or functorch.is_legacy_batchedtensor(x)
    )


def _widened_request(r: Request) -> Request | None:
    """``r`` in float64 where its statistics keep a float64 copy of this very x (float32,
    under autograd, reverse or forward mode: :class:`groupnorm.stats.Widened`): that copy, the
    float64 statistics and the parameters in float64, so that x's gradients (or tangents)
    through the statistics and directly add in float64 before the one rounding to float32.
    Else None."""
    s = r.stats
    if s is None or s._widened is None or _tracing():
        return None
    if not torch.is_grad_enabled() and forward_ad._current_level < 0:
        return None  # nothing differentiates the call (forward AD ignores the grad mode)
    wide_x = s._widened.source(s, r.x)
    if wide_x is None:
        return None
    f64 = torch.float64
    w, b, sc, sh = (None if t is None else t.to(f64) for t in (r.weight, r.bias, r.scale, r.shift))
    return r._replace(x=wide_x, stats=s._widened.stats, weight=w, bias=b, scale=sc, shift=sh)


def run(r: Request) -> tuple[torch.Tensor, GroupStats | None]:
    """Run a validated request: ``(y, stats or None)``.

    Without statistics in or out: on an eager CPU call, torch's kernel with its mean checked
    (:func:`_native_checked`); under torch.compile, float32/float64 CPU input in a layout the
    fused kernel reads, its ops (:mod:`.compiled`); everywhere else (tracing, transforms, other
    devices), torch's kernel on pivot-shifted input, which needs no check (:mod:`.shifted`),
    in float64 for float32 x that torch.func or forward AD differentiates.
    Statistics out, where
    autograd does not record, from the same checked kernel call (:func:`_native_with_stats`).
    Statistics in or out, and what none of these serves, take the composite path. The fused
    CPU kernel, where it is built, serves eager CPU calls that autograd does not record before
    all of these (:func:`_fused_serves`).
    """
    wide = _widened_request(r)
    if wide is not None:
        y_wide, _ = run(wide)
        return y_wide.to(r.x.dtype), (r.stats if r.return_stats else None)
    if _vmapped(r.x) and not r.x.is_contiguous():
        # torch's group_norm asks its input whether it is channels-last-contiguous, which a
        # tensor batched by vmap does not answer ("NYI: querying is_contiguous inside of vmap")
        r = r._replace(x=r.x.contiguous())
    if _fused_serves(r):
        return _fused(r)
    if _fused_records(r):
        return _record_fused(r), None
    if _fused_can_record(r, stats_out=True):
        return _record_fused_stats(r)
    if _fused_records_given(r):
        return _record_fused_given(r), None
    if r.stats is None and not r.return_stats and not _forward_ad_on_channels_last(r.x):
        # forward AD's dual tensors are plain ones, which the first branch would give torch's
        # float32 kernel and its float32 tangent
        forward64 = forward_ad._current_level >= 0 and _widens(r.x)
        if _reads_request(r) and not forward64:
            y = _native_checked(r)
            if y is None:
                y, _ = _composite(r)
            w, b, sc, sh = r.weight, r.bias, r.scale, r.shift
            return _second_order64(y, r.x, w, b, sc, sh, r.plan, r.eps, r.activation), None
        elif _compiles_fused(r):
            return _compiled_fused(r), None
        else:
            first = plan_index(r.plan, r.x.device).channel_first
            runs = list(r.plan.runs)
            if forward64 or (_widens(r.x) and _functorch_differentiates(r)):
                # torch.func.grad / jvp and forward AD differentiate torch's float32 kernel,
                # whose dx and tangent cancel in small groups at small spread (6.2x and 7.9x
                # the float32 bound at std 3e-3, |w| ~ 2; forward AD's tangent 12-55x, a
                # forward-over-reverse Hessian-vector product 109-286x): in float64, rounded
                # once.
                w, b, sc, sh = (
                    None if t is None else t.double() for t in (r.weight, r.bias, r.scale, r.shift)
                )
                y = shifted_group_norm(r.x.double(), runs, first, w, b, r.eps, r.activation, sc, sh)
                return y.float(), None
            return shifted_group_norm(
                r.x, runs, first, r.weight, r.bias, r.eps, r.activation, r.scale, r.shift
            ), None
    if r.stats is None and r.return_stats and _reads_request(r) and not _records_grad(r):
        both = _native_with_stats(r)
        if both is not None:
            return both
    return _composite(r)


register_backend(
    Backend(
        name="torch",
        priority=0,
        why_not=lambda r: None,
        run=run,
        stats=_stats,
        fast=native_fast,
    )
)
