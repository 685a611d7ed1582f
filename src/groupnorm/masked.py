"""Masked group normalization: statistics over the valid positions only.

``mask`` broadcasts to ``x`` (N, C, *S): typically (N, 1, *S) (one validity map per sample:
padded audio, variable-size images in a batch) or (N, C, *S). Bool masks select positions;
floating masks are non-negative weights ``w``. Per sample n and group g, over the group's
channels c and positions l::

    count[n,g] = sum w[n,c,l]
    mean[n,g]  = sum w * x / count
    var[n,g]   = sum w * (x - mean)^2 / count         (biased, like the unmasked case)

Every position, masked or not, is then normalized with these statistics and gets the usual
epilogue, ``y = act(((x - mean) * rstd * gamma + beta) * (1 + scale) + shift)``; values at
masked positions never enter the statistics (NaN or Inf there stays at that position).
A group with ``count == 0`` (all of it masked) has no statistics: its ``x_hat`` is defined as 0,
so its output is the epilogue of ``beta`` alone and its input gradient is 0 (not NaN).

Numerics: a first pass takes a per-group pivot (the masked mean in the accumulation dtype), the
second accumulates the shifted values, the third their squared deviations, so a large common
offset costs no precision (the pivot is detached: the result does not depend on it). A float32
x whose call autograd records is computed in float64 (:func:`upcast`; statistics returned in
float32).

Only the torch backend computes masked statistics, with composite ops, or with its kernel on
the gathered valid positions of a bool mask of positions (:func:`_compacts`); a call that would
go to the Triton kernels (CUDA, ``backend="auto"`` or ``"triton"``) runs there too.
"""

from __future__ import annotations

import math

import torch

from groupnorm.backends import torch_ops
from groupnorm.dispatch import Request
from groupnorm.groups import GroupPlan
from groupnorm.stats import _FIELDS, GroupStats

__all__ = [
    "check_mask",
    "masked_stats",
    "narrowed",
    "normalize_with",
    "run_masked",
    "stats_of",
    "upcast",
]


def check_mask(mask: object, x: torch.Tensor) -> torch.Tensor:
    """Validate ``mask`` against ``x`` before any work; returns it unchanged.

    Type, shape and device need no values: they are checked under torch.compile too (with
    ``fullgraph=True`` dynamo reports the ValueError as its Unsupported error, message included).
    Floating masks are checked to be finite, non-negative and within the range their sums hold
    (one reduction over the mask) where their values can be read (:func:`_readable_weights`):
    eagerly and under torch.func transforms (vmap, grad, jvp), here, with a ValueError. Where a
    graph is recorded (torch.compile, torch.export, make_fx) the graph gets the check as an
    assertion (``torch._assert_async``), which raises a RuntimeError with the same advice when
    the graph runs on such weights (on CUDA a device-side assertion); an ONNX graph drops it,
    torch.jit.trace does not record it, and a vmapped call leaves it out (:func:`_batched`).
    Meta and fake tensors have no values to check.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(
            f"mask has dtype {mask.dtype}; use a bool mask (True = valid) or floating "
            "non-negative weights (e.g. mask.bool() or mask.float())"
        )
    if not _broadcasts_to(mask.shape, x.shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape "
            f"{tuple(x.shape)}; use (N, 1, *spatial) or (N, C, *spatial) (size-1 dims broadcast)"
        )
    if mask.device != x.device:
        raise ValueError(
            f"mask is on {mask.device} but x is on {x.device}; move it with .to({str(x.device)!r})"
        )
    if mask.dtype != torch.bool:
        weights = _readable_weights(mask)
        if weights is not None:
            _check_weights(weights, x)
        elif not _batched(mask, x):
            # No value may be read while a graph is recorded: the graph checks when it runs (a
            # negative weight was normalized without an error there).
            torch._assert_async(_weights_fine(mask, x), _RECORDED_CHECK)
    return mask


def _batched(mask: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a vmap batches this call, which has no batching rule for an assertion (it
    raised there, on good weights too). Dynamo traces the query of the outermost wrapper
    only; elsewhere any torch.func transform counts (the fast paths' query of one)."""
    if torch.compiler.is_compiling():
        return bool(
            torch._C._functorch.is_batchedtensor(mask) or torch._C._functorch.is_batchedtensor(x)
        )
    return torch_ops._transform_level() is not None


def _readable_weights(mask: torch.Tensor) -> torch.Tensor | None:
    """The tensor whose values are ``mask``'s, where this call may read them; None while a
    graph is recorded (torch.compile, export, make_fx, jit.trace) or on meta and fake tensors.

    Under torch.func transforms that is the plain tensor inside the mask's wrappers (under vmap,
    every sample's weights at once): the transforms refuse reading a wrapper's values, and a
    negative weight then normalized without an error (y 0.072 off its value with that weight
    at 0, vmap over samples)."""
    if torch_ops._tracing():  # first: dynamo cannot trace the queries below
        return None
    while torch._C._functorch.is_functorch_wrapped_tensor(mask):
        mask = torch._C._functorch.get_unwrapped(mask)
    return mask if torch_ops.plain_values(mask) else None


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (size-1 dimensions expand, leading ones may be
    missing). Compared size by size, not with torch.broadcast_shapes: torch.compile traces that
    into the graph, where a mismatch raised dynamo's internal error instead of ours."""
    trailing = target[len(target) - len(shape) :]
    return len(shape) <= len(target) and all(
        m == 1 or m == t for m, t in zip(shape, trailing, strict=True)
    )


_RECORDED_CHECK = (
    "mask holds negative, non-finite or out-of-range weights; floating masks are weights >= 0 "
    "(0 = masked), nonzero ones within what the statistics' sums hold (rescale them, e.g. "
    "mask / mask.max()); called eagerly, group_norm says which"
)


def _weight_bounds(x: torch.Tensor) -> tuple[torch.finfo, int, float]:
    """The dtype x's statistics are summed in, the most elements a group of x holds, and the
    largest weight whose sum over such a group that dtype holds."""
    info = torch.finfo(torch_ops.accumulation_dtype(x.dtype))
    group_most = max(1, math.prod(x.shape[1:]))  # math.prod: sizes stay symbolic, not numel()
    return info, group_most, info.max / group_most


def _weights_fine(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """0-d bool: every weight is 0 or finite within [smallest normal, largest per group]."""
    info, _, top = _weight_bounds(x)
    # isfinite: in a narrower mask dtype the bounds round (top to inf, where inf <= top)
    return ((mask == 0) | ((mask >= info.tiny) & (mask <= top) & mask.isfinite())).all()


def _check_weights(mask: torch.Tensor, x: torch.Tensor) -> None:
    """Floating weights must be finite, >= 0 and usable in the dtype x's statistics are summed
    in (float32 for float32 and half precision x, float64 for float64): a positive weight below
    its smallest normal number would count as 0 (masked), and weights whose sum over a group
    (at most C * L elements) passes its largest one give infinite counts and NaN. One pass over
    the mask; what was wrong is worked out only on the error's way."""
    if bool(_weights_fine(mask, x)):
        return
    info, group_most, top = _weight_bounds(x)
    if not bool(((mask >= 0) & mask.isfinite()).all()):
        raise ValueError(
            "mask holds negative or non-finite weights; floating masks are weights >= 0 "
            "(0 = masked)"
        )
    positive = mask[mask > 0]
    raise ValueError(
        f"mask weights range over [{positive.min().item():g}, {positive.max().item():g}], "
        f"outside what {info.dtype} sums of groups of up to {group_most} elements hold: nonzero "
        f"weights must lie in [{info.tiny:g}, {top:g}] (smaller ones would count as 0, larger "
        "ones overflow); weights are relative, so rescale them (e.g. mask / mask.max())"
    )


def _full_rank(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` with the leading size-1 dimensions that broadcasting against x adds."""
    return mask.reshape((1,) * (x.dim() - mask.dim()) + tuple(mask.shape))


def _of_positions(mask: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``mask`` is one of positions, the same for every channel of an x with spatial
    dimensions: (N or 1, 1, *S) after :func:`_full_rank`."""
    return x.dim() > 2 and _full_rank(mask, x).shape[1] == 1


def _position_rows(mask: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
    """A mask of positions as (rows, L): one row of x's L positions per sample."""
    L = math.prod(x.shape[2:])  # symbolic sizes stay symbolic (numel() specializes)
    return _full_rank(mask, x).expand(rows, 1, *x.shape[2:]).reshape(rows, L)


def _channel_sum(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast ``t`` to ``shape`` (N, C, *S) and sum over the positions: (N, C)."""
    t = t.expand(shape)
    return t if t.dim() == 2 else t.sum(dim=tuple(range(2, t.dim())))


def masked_stats(x: torch.Tensor, plan: GroupPlan, mask: torch.Tensor) -> GroupStats:
    """Statistics of the valid positions of ``x`` (N, C, *S) as :class:`GroupStats`, (N, G)
    each; ``count`` is the sum of the weights (0 for an all-masked group, whose pivot,
    shifted_mean and m2 are then 0). Differentiable in ``x``; ``mask`` is validated already."""
    acc = torch_ops.accumulation_dtype(x.dtype)
    w = mask.to(acc)
    # torch.where, not a product: a NaN at a masked position must not reach the sums. Weights
    # that are differentiated keep x's finite values there (their products with weight 0 are 0):
    # a statistic's derivative in a weight is a function of x at its position, and with x taken
    # as 0 a weight at 0 got a wrong gradient, one that moved with an offset of x.
    valid = mask > 0
    if mask.requires_grad:
        valid = valid | x.isfinite()
    xv = torch.where(valid, x, 0).to(acc)
    count = torch_ops._group_sum(_channel_sum(w, x.shape), plan)  # (N, G)
    empty = count == 0
    safe = torch.where(empty, 1, count)

    # A mask of positions (the same for every channel) in float64: the weighted sums over the
    # positions as one matrix product, (N, C, L) @ (N, L, 1), with no (N, C, L) product formed.
    # (float32 keeps torch's summation: a matrix product accumulates in long float32 chains.)
    L = math.prod(x.shape[2:])
    rows = _full_rank(w, x).shape[0]
    column = (
        _position_rows(w, x, rows)[..., None]
        if acc == torch.float64 and _of_positions(w, x)
        else None
    )

    def weighted(t: torch.Tensor) -> torch.Tensor:  # (N, C, *S) -> (N, C): sums of w * t
        if column is not None:
            # contiguous() first: a copy reshape makes anyway for channels-last t, but without it
            # inductor (torch 2.13, CPU) fused the product into a kernel that read channels-last
            # t as NCHW (m2 of a (2, 2, 3, 4) x off by 5.2).
            rows = t.contiguous().reshape(t.shape[0], t.shape[1], L)
            return torch.matmul(rows, column)[..., 0]
        return _channel_sum(w * t, x.shape)

    def group_mean(t: torch.Tensor) -> torch.Tensor:  # (N, C, *S) -> weighted (N, G) mean
        return torch.where(empty, 0, torch_ops._group_sum(weighted(t), plan) / safe)

    def per_channel(v: torch.Tensor) -> torch.Tensor:  # (N, G) -> broadcastable to x
        return torch_ops._expand(torch_ops._per_channel(v, plan), x.dim())

    pivot = group_mean(xv.detach())
    d = xv - per_channel(pivot)
    shifted_mean = group_mean(d)
    e = d - per_channel(shifted_mean)
    m2 = torch_ops._group_sum(weighted(e * e), plan)
    return GroupStats(pivot, shifted_mean, m2, count, plan=plan)


def normalize_with(r: Request, stats: GroupStats) -> torch.Tensor:
    """``r`` normalized with ``stats`` by the torch backend's composite ops; a group with
    ``count == 0`` is handed an infinite variance so that its ``rstd``, hence ``x_hat``, is 0."""
    empty = stats.count == 0
    normalizing = GroupStats(
        stats.pivot,
        stats.shifted_mean,
        torch.where(empty, torch.inf, stats.m2),
        torch.where(empty, 1, stats.count),
        plan=stats.plan,
    )
    return torch_ops.run(r._replace(stats=normalizing, return_stats=False))[0]


def run_masked(r: Request, mask: torch.Tensor) -> tuple[torch.Tensor, GroupStats | None]:
    """A validated request (no ``stats``) with a validated mask: ``(y, stats or None)``."""
    if _compacts(r, mask):
        stats = _compacted_stats(r, mask)
        return normalize_with(r, stats), (stats if r.return_stats else None)
    wide = upcast(r, mask)
    stats = masked_stats(wide.x, r.plan, mask)
    return normalize_with(wide, stats).to(r.x.dtype), (
        narrowed(stats, r.x.dtype) if r.return_stats else None
    )


def stats_of(r: Request, mask: torch.Tensor) -> GroupStats:
    """``group_stats(x, ..., mask=)`` of a validated request and mask: gathered where
    :func:`_compacts`, else :func:`masked_stats` of :func:`upcast`'s x, returned in the
    accumulation dtype of x."""
    if _compacts(r, mask):
        return _compacted_stats(r, mask)
    return narrowed(masked_stats(upcast(r, mask).x, r.plan, mask), r.x.dtype)


def _compacts(r: Request, mask: torch.Tensor) -> bool:
    """Whether :func:`_compacted_stats` serves ``r``: a bool mask of positions (the same for
    every channel), an eager CPU call that autograd does not record (it reads the mask's values
    to gather), x NCHW- or channels-last-contiguous."""
    x = r.x
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return (
        mask.dtype == torch.bool
        and x.numel() > 0
        and _of_positions(mask, x)
        and torch_ops._reads_values(x)
        and torch_ops._reads_values(mask)
        and not torch_ops._records_grad(r)
        and (x.is_contiguous() or (x.dim() in (4, 5) and x.is_contiguous(memory_format=fmt)))
    )


def _compacted_stats(r: Request, mask: torch.Tensor) -> GroupStats:
    """The statistics of each sample's valid positions, gathered (``index_select``) into a
    dense (1, C, k) tensor whose unmasked statistics the backend's kernel takes: a read of x
    and of the k valid positions, where :func:`masked_stats` makes about ten passes over x
    (with them the whole call took 2.6-3.4x longer on the benchmark shapes). A sample with no
    valid position gets count 0 (pivot, shifted mean and m2 0)."""
    x, plan = r.x, r.plan
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    valid = _position_rows(mask, x, N)
    channels_last = not x.is_contiguous()
    # (N, L, C) for channels-last x, (N, C, L) for NCHW: views, positions gathered in place.
    flat = x.movedim(1, -1).reshape(N, L, C) if channels_last else x.reshape(N, C, L)
    acc = torch_ops.accumulation_dtype(x.dtype)
    parts = []
    for n in range(N):
        where = valid[n].nonzero()[:, 0]
        if not len(where):
            empty = torch.zeros(1, plan.num_groups, dtype=acc, device=x.device)
            parts.append(GroupStats(empty, empty, empty, empty, plan=plan))
            continue
        dense = (
            flat[n].index_select(0, where).T[None]
            if channels_last
            else flat[n].index_select(1, where)[None]
        )
        parts.append(
            torch_ops._stats(r._replace(x=dense, weight=None, bias=None, scale=None, shift=None))
        )
    pivot, shifted_mean, m2, count = (torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS)
    return GroupStats(pivot, shifted_mean, m2, count, plan=plan)


def upcast(r: Request, mask: torch.Tensor | None = None) -> Request:
    """``r`` with x in the dtype its statistics and output are computed in, converted once:
    x feeds both the statistics and the normalization, and autograd would round each branch's
    gradient to a half-precision x's dtype before adding them (seen: bf16 dx up to 4.8x the
    tolerance table's allowance). A float32 x whose call autograd records computes in float64:
    in float32, dx of groups of 4 to 270 elements, where its terms cancel, reached up to 6.1x
    the float32 bound. Weights that require grad count as recorded too (their gradient in
    float32 reached 10x the float32 bound)."""
    weights_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()
    wide = torch_ops._widens(r.x) and (weights_grad or torch_ops._records_grad(r))
    return r._replace(x=r.x.to(torch.float64 if wide else torch_ops.accumulation_dtype(r.x.dtype)))


def narrowed(stats: GroupStats, dtype: torch.dtype) -> GroupStats:
    """``stats`` computed from :func:`upcast`'s x, in the accumulation dtype of an x of ``dtype``
    (the dtype statistics are returned in)."""
    if stats.dtype == torch_ops.accumulation_dtype(dtype):
        return stats
    return torch_ops._narrowed(stats)
