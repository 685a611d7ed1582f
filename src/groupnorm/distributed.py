"""Group normalization of a tensor sharded across processes (patch parallelism).

Each rank of a ``torch.distributed`` process group holds a disjoint part of the same (N, C, *S)
tensor, split along any spatial axis (or any disjoint split of the positions). Every rank calls
``group_norm(x_shard, ..., process_group=pg)`` with the same N, C, number of dimensions, group
plan and dtype (the spatial sizes may differ: a 2-D grid of tiles splits H and W); the output is
the shard of what the whole tensor would give.

How (every rank, identically):

1. local pivot-shifted statistics of the shard (:class:`GroupStats`, (N, G) each);
2. one ``all_gather`` of the four (N, G) fields of every rank;
3. a W-way merge in float64, in rank order (deterministic, the same on every rank)::

       P  = sum_r n_r p_r / n, in the statistics' dtype (a common pivot, near the data)
       m_r = (p_r - P) + shifted_mean_r             (rank r's mean relative to P, exact in f64)
       n  = sum_r n_r;   M = sum_r n_r m_r / n
       m2 = sum_r m2_r + sum_r n_r (m_r - M)^2

4. normalize the shard with the merged statistics.

Before the gather, one all_gather of (N, C, plan, dtype, x.dim()) raises the same error on every
rank where the ranks disagree.

Gradients: the gather is a differentiable collective (twice: its backward is recorded too)
whose backward all-reduces (sums) the gradients of the gathered statistics over ranks and keeps
this rank's slice, so each rank's ``x_shard.grad`` equals the matching slice of the unsharded
gradient of ``sum over ranks of each rank's loss``. Every rank must run backward through its
output (the backward is a collective).
``weight``/``bias`` gradients are per rank: all-reduce them (DDP does) for the whole tensor's.

A shard may hold no position (more ranks than rows): its statistics are empty (count 0).
``mask=`` combines: masked local statistics, merged the same way (a group masked on every rank
has count 0 and gets :mod:`groupnorm.masked`'s all-masked result).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from groupnorm.backends import torch_ops
from groupnorm.dispatch import Request
from groupnorm.groups import GroupPlan
from groupnorm.masked import masked_stats, narrowed, normalize_with, upcast
from groupnorm.stats import GroupStats

__all__ = [
    "all_gather_stats",
    "every_rank",
    "merge_many",
    "refused_together",
    "run_sharded",
]


class _AllGather(torch.autograd.Function):
    """(…) -> (W, …): every rank's tensor. Its backward is :class:`_ReduceScatter` and that
    one's backward is this gather, each recorded by autograd: double backward (a gradient
    penalty) goes through the same collectives."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _ReduceScatter.apply(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """(W, …) -> (…): the sum over ranks of every rank's tensor, this rank's slice."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        total = t.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total[dist.get_rank(group)]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllGather.apply(grad, ctx.group), None


def check_process_group(group: object) -> None:
    """Raise unless torch.distributed is initialized and ``group`` is one of its process groups."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group= needs torch.distributed initialized first "
            "(torch.distributed.init_process_group(...)); pass None for a single process"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
            f"dist.new_group(ranks)), got {type(group).__name__}"
        )


AGREED = 5  # numbers _check_ranks_agree gathers: N, C, the plan's hash, the dtype's, x.dim()


def _check_device(group: Any) -> torch.device:
    """Where the agreement checks' numbers travel: nccl gathers CUDA tensors only; gloo (and
    a mixed "cpu:gloo,cuda:nccl" group) takes CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def every_rank(values: list[int], group: Any, refused: bool = False) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (the same count on each), in rank order: one all_gather of int64
    numbers, for checks that the ranks' calls agree before their real collectives. A rank whose
    own arguments were refused joins it with ``refused=True`` (see :func:`refused_together`),
    and the others raise here instead of waiting in a collective it never joins."""
    mine = torch.tensor([int(refused), *values], dtype=torch.int64, device=_check_device(group))
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    seen = [tuple(t.tolist()) for t in every]
    failed = [r for r, v in enumerate(seen) if v[0]]
    if failed and not refused:
        ranks = ", ".join(map(str, failed))
        raise ValueError(
            f"process_group=: rank {ranks} refused its arguments (its own error says why), so "
            "every rank stops before the collective"
        )
    return [v[1:] for v in seen]


@contextlib.contextmanager
def refused_together(group: Any, count: int = AGREED) -> Iterator[None]:
    """Run a rank's argument checks so that a refusal reaches every rank: the refusing rank
    joins the :func:`every_rank` gather of ``count`` numbers that the others reach next, marked
    refused, then raises its own error (alone, it would leave them waiting). ``group`` is
    checked first (:func:`check_process_group`): the refusal travels through it. Not while
    torch.compile records, where the agreement check is not made either, nor under
    torch.jit.trace, which refuses process_group= on every rank that traces."""
    check_process_group(group)
    try:
        yield
    except (TypeError, ValueError):
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            every_rank([0] * count, group, refused=True)
        raise


def _check_ranks_agree(local: GroupStats, group: Any, dtype: torch.dtype, ndim: int) -> None:
    """Raise on every rank, before the statistics are gathered, unless all ranks hold
    statistics of the same shape and plan, of inputs of one ``dtype`` and ``ndim`` dimensions
    (0 for :func:`all_gather_stats`, which has statistics and no input): gathered as they are,
    (N, G) fields of different sizes abort a gloo process (an error Python cannot catch), the
    same sizes for different plans merge into wrong statistics without one, and shards of
    different dtypes or numbers of dimensions ((N, C, H, W) and (N, C, L)) are parts of no one
    tensor. One all_gather of five int64 numbers; skipped while torch.compile records (the
    comparison reads values)."""
    if torch.compiler.is_compiling():
        return
    assert local.plan is not None
    sizes = local.plan.sizes
    # crc32, not hash(): a str's hash differs between processes
    code = zlib.crc32(str(dtype).encode())
    seen = every_rank([local.shape[0], local.plan.num_channels, hash(sizes), code, ndim], group)
    if len(set(seen)) > 1:
        rows = ", ".join(f"rank {r}: N={v[0]}, C={v[1]}" for r, v in enumerate(seen))
        differ = []
        if len({v[4] for v in seen}) > 1:
            dims = ", ".join(f"rank {r}: {v[4]}" for r, v in enumerate(seen))
            differ.append(f"numbers of dimensions ({dims})")
        if len({v[:2] for v in seen}) == 1:  # a different C is a different plan already
            differ += [
                what
                for i, what in ((2, "group plans"), (3, "dtypes"))
                if len({v[i] for v in seen}) > 1
            ]
        raise ValueError(
            "process_group=: every rank must call with the same N, C, number of dimensions, "
            "group plan and dtype (each holds a spatial part of one tensor; only the spatial "
            f"sizes may differ); got {rows}"
            + (", and different " + " and ".join(differ) if differ else "")
            + f" (this rank: {local.plan.describe()}, {dtype})"
        )


def merge_many(every: torch.Tensor, dtype: torch.dtype, plan: GroupPlan) -> GroupStats:
    """The W-way merge of the module doc: ``every`` is (W, 4, N, G), each rank's pivot,
    shifted_mean, m2 and count stacked; returns the whole's statistics in ``dtype`` for ``plan``."""
    pivot, shifted_mean, m2, count = every.to(torch.float64).unbind(1)  # (W, N, G) each
    n = count.sum(0)
    empty = n == 0
    safe = torch.where(empty, 1, n)
    # Rounded to the statistics' dtype first: the means below are relative to the stored pivot.
    common = torch.where(empty, 0, (count * pivot).sum(0) / safe).to(dtype).to(torch.float64)
    means = (pivot - common) + shifted_mean  # (W, N, G)
    mean = torch.where(empty, 0, (count * means).sum(0) / safe)
    dev = means - mean
    total_m2 = m2.sum(0) + (count * dev * dev).sum(0)
    return GroupStats(common.to(dtype), mean.to(dtype), total_m2.to(dtype), n.to(dtype), plan=plan)


def all_gather_stats(local: GroupStats, group: Any) -> GroupStats:
    """Merge every rank's statistics of its shard into the whole tensor's (see the module doc).

    Differentiable: gradients flow back into each rank's ``local`` statistics.
    """
    with refused_together(group):
        if not isinstance(local, GroupStats):
            raise TypeError(
                f"all_gather_stats(local=...) needs a GroupStats (from group_stats), got "
                f"{type(local).__name__}"
            )
    _check_ranks_agree(local, group, local.pivot.dtype, 0)
    return _gathered(local, group)


def _gathered(local: GroupStats, group: Any) -> GroupStats:
    """:func:`all_gather_stats` past its checks."""
    # Gathered in float64 whatever the local dtype: the merge is in float64 anyway, and a rank
    # whose statistics were widened (its call records autograd) sends as many bytes as the rest.
    fields = torch.stack([local.pivot, local.shifted_mean, local.m2, local.count])  # (4, N, G)
    assert local.plan is not None
    return merge_many(
        _AllGather.apply(fields.to(torch.float64), group), local.pivot.dtype, local.plan
    )


def check_sharded(r: Request, group: object) -> None:
    """What :func:`run_sharded` cannot do, raised with the other argument checks (inside
    :func:`refused_together`)."""
    if torch.jit.is_tracing():
        raise TypeError(
            "torch.jit.trace cannot record process_group= (a TorchScript graph holds no "
            "torch.distributed collective); trace without process_group=, or use torch.compile"
        )
    if r.stats is not None:
        raise ValueError(
            "process_group= and stats= together: stats= already holds the statistics to use; "
            "merge them across ranks with groupnorm.distributed.all_gather_stats and drop "
            "process_group="
        )


def run_sharded(
    r: Request, group: object, mask: torch.Tensor | None
) -> tuple[torch.Tensor, GroupStats | None]:
    """A request that passed :func:`check_sharded` on this rank's shard: ``(y_shard,
    whole-tensor stats or None)``."""
    wide = upcast(r, mask)
    if mask is None and not wide.x.numel():
        # A shard with no position (more ranks than rows, say): empty statistics, count 0.
        mask = torch.ones((), dtype=torch.bool, device=wide.x.device)
    local = (
        torch_ops.compute_stats(wide.x, r.plan)
        if mask is None
        else masked_stats(wide.x, r.plan, mask)
    )
    # The shards' dtype, not the statistics': a float32 call that autograd records widens them.
    _check_ranks_agree(local, group, r.x.dtype, r.x.dim())
    stats = _gathered(local, group)
    return normalize_with(wide, stats).to(r.x.dtype), (
        narrowed(stats, r.x.dtype) if r.return_stats else None
    )
