"""``group_norm`` and the statistics API: validate once, then dispatch to a backend.

Every check runs before any computation, and each error says what was wrong and what would be
right.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, overload

import numpy as np
import torch

from groupnorm import dispatch, masked
from groupnorm.activations import check_activation
from groupnorm.backends import torch_ops
from groupnorm.dispatch import FLOAT_DTYPES
from groupnorm.groups import GroupPlan, check_group_sizes, make_plan
from groupnorm.stats import GroupStats, check_stats_values

_T = TypeVar("_T")

__all__ = ["SingleElementGroupWarning", "group_norm", "group_stats", "resolve_plan"]


class SingleElementGroupWarning(UserWarning):
    """A group holds one element: its variance is 0 and its output is just beta."""


# A plain dict rather than lru_cache: torch.compile warns about (and bypasses) lru_cache wrappers.
_PLANS: dict[tuple[object, ...], GroupPlan] = {}


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_eps(eps: object) -> float:
    """eps as a float: what ``F.group_norm`` takes (a Python or NumPy real, a 0-d real tensor),
    but not a bool, and finite and >= 0. Raises before any work."""
    if type(eps) is float or isinstance(eps, torch.SymFloat):  # symbolic: compile(dynamic=True)
        value: object = eps
    elif isinstance(eps, bool | np.bool_) or not isinstance(
        eps, int | float | np.integer | np.floating | torch.Tensor
    ):
        raise TypeError(f"eps must be a real number, got {eps!r} ({type(eps).__name__})")
    elif isinstance(eps, torch.Tensor):
        if eps.dim() or not (eps.dtype.is_floating_point or _is_integer(eps.dtype)):
            raise TypeError(f"eps as a tensor must be a 0-d real number, got {eps!r}")
        value = float(eps.item())
    else:
        value = float(eps)
    # Comparisons, not math.isinf: they work on a symbolic float, and NaN fails the first.
    if not (value >= 0 and value < math.inf):  # type: ignore[operator]
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value  # type: ignore[return-value]


def check_backend_name(backend: object) -> str:
    """``"auto"`` or a registered backend's name (whether it can serve a call is decided then)."""
    names = sorted(dispatch.available_backends())
    if backend != "auto" and backend not in names:
        raise ValueError(f"unknown backend {backend!r}; one of {['auto', *names]}")
    return backend  # type: ignore[return-value]


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_count(name: str, value: object) -> int | None:
    """None or an int: a NumPy integer or a 0-d integer tensor too, as ``F.group_norm`` takes
    them; any other type (a bool, float, string, another tensor) is a TypeError, as torch's
    (whether it is >= 1 is :func:`make_plan`'s check)."""
    if value is None or type(value) is int:
        return value
    if isinstance(value, torch.Tensor) and not value.dim() and _is_integer(value.dtype):
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{name} must be a positive integer (an int, a NumPy integer or a 0-d integer "
            f"tensor), got {value!r} ({type(value).__name__})"
        )
    return int(value)


def _plan_key(
    num_channels: int,
    num_groups: int | None,
    group_size: int | None,
    sizes: tuple[int, ...] | None,
    uneven: bool,
) -> tuple[int, int | None, int | None, tuple[int, ...] | None, bool]:
    """The plan cache's key for checked arguments (``sizes`` as :func:`check_group_sizes`
    returns them)."""
    return (int(num_channels), num_groups, group_size, sizes, uneven)


def resolve_plan(
    num_channels: int,
    num_groups: int | None = None,
    *,
    group_size: int | None = None,
    group_sizes: Sequence[int] | None = None,
    uneven: bool = False,
) -> GroupPlan:
    """:func:`groupnorm.groups.make_plan`, cached (plans are immutable; at most 4096 kept).

    The argument types are checked before the cache is consulted, so what is accepted does not
    depend on what was called before (2.0 and True hash like 2 and 1)."""
    if isinstance(num_channels, bool) or not (
        isinstance(num_channels, int | np.integer | torch.SymInt)
        # jit.trace's sizes: 0-d integer tensors
        or (
            isinstance(num_channels, torch.Tensor)
            and not num_channels.dim()
            and _is_integer(num_channels.dtype)
        )
    ):
        raise TypeError(
            f"num_channels must be a positive integer (an int, a NumPy integer or a 0-d integer "
            f"tensor), got {num_channels!r} "
            f"({type(num_channels).__name__})"
        )
    num_groups = _check_count("num_groups", num_groups)
    group_size = _check_count("group_size", group_size)
    check_flag("uneven", uneven)
    sizes = None if group_sizes is None else check_group_sizes(group_sizes)
    # A symbolic C (torch.compile with dynamic shapes) is specialized: the plan's structure,
    # hence the graph, depends on it.
    key = _plan_key(num_channels, num_groups, group_size, sizes, uneven)
    plan = _PLANS.get(key)
    if plan is None:
        plan = make_plan(
            key[0], num_groups, group_size=group_size, group_sizes=sizes, uneven=uneven
        )
        if len(_PLANS) < 4096:
            _PLANS[key] = plan
    return plan


def _check_input(x: object, shard: bool = False) -> torch.Tensor:
    """x validated as (N, C, *S) of a floating dtype; ``shard``: x is one rank's part of a
    sharded tensor, which may hold no position (its statistics are empty, the whole's are not)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout is not torch.strided:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(
            f"x must be a dense tensor (layout torch.strided), got {kind}; convert with "
            "x.to_dense(), or normalize a nested tensor's samples one at a time"
        )
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape (N, C, *spatial) with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}; for a single sample use x.unsqueeze(0)"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; group norm needs a floating dtype, one of "
            f"{[str(d) for d in FLOAT_DTYPES]} (convert with x.float())"
        )
    if x.shape[1] == 0:
        raise ValueError(f"x has no channels (shape {tuple(x.shape)}): C must be at least 1")
    return x


def _check_param(
    name: str, t: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor
) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.layout is not torch.strided or t.is_nested:
        what = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense tensor, got {what}; use {name}.to_dense()")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, expected {shape} for x of shape {tuple(x.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; it must be one of {[str(d) for d in FLOAT_DTYPES]}"
        )
    if t.device != x.device:
        raise ValueError(
            f"{name} is on {t.device} but x is on {x.device}; move it with .to({str(x.device)!r})"
        )
    # Contiguous (a copy autograd records, where it is not): torch's kernel reads a strided or
    # expanded weight's storage as if it were dense (a weight of torch.tensor(2.5).expand(C)
    # was 1.7e7 off).
    return t if t.is_contiguous() else t.contiguous()


def _check_stats(stats: GroupStats, x: torch.Tensor, plan: GroupPlan) -> bool | None:
    """Raise if ``stats`` do not fit ``x`` and ``plan``, or (where their values can be read)
    hold counts or m2 no statistics have. Returns whether some group is empty (count 0), read
    with that check, or None where the values were not read."""
    if not isinstance(stats, GroupStats):
        raise TypeError(
            f"stats must be a GroupStats (from group_stats), got {type(stats).__name__}"
        )
    if stats.plan != plan:
        assert stats.plan is not None
        raise ValueError(
            f"stats were computed for {stats.plan.describe()}, but this call normalizes with "
            f"{plan.describe()}; compute the statistics with the same group plan"
        )
    want = (x.shape[0], plan.num_groups)
    if tuple(stats.shape) != want:
        raise ValueError(
            f"stats have shape {tuple(stats.shape)}, but x of shape {tuple(x.shape)} "
            f"with {plan.describe()} needs (N, G) = {want}; compute the statistics with the "
            "same batch and group plan"
        )
    if stats.pivot.device != x.device:
        raise ValueError(
            f"stats are on {stats.pivot.device} but x is on {x.device}; "
            f"use stats.to({str(x.device)!r})"
        )
    acc = torch_ops.accumulation_dtype(x.dtype)
    if stats.dtype != acc:
        raise ValueError(
            f"stats are {stats.dtype}, but x of dtype {x.dtype} is normalized with {acc} "
            "statistics; compute them from an input of x's dtype"
        )
    if torch_ops.can_read_values(stats.m2):
        return check_stats_values(stats, empty=True)
    return None


def _request(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    stats: GroupStats | None,
    return_stats: bool,
    shard: bool = False,
) -> tuple[dispatch.Request, bool | None]:
    """Validate everything but x itself (checked by the caller, which needed its C for the plan).
    ``shard``: x is one rank's part of a sharded tensor, whose positions it does not show.
    Also returns, for given ``stats``, whether some group of theirs is empty (None where their
    values were not read, and without ``stats``)."""
    N, C = x.shape[:2]
    check_activation(activation)
    eps = check_eps(eps)
    check_flag("return_stats", return_stats)
    weight = _check_param("weight", weight, (C,), x)
    bias = _check_param("bias", bias, (C,), x)
    scale = _check_param("scale", scale, (N, C), x)
    shift = _check_param("shift", shift, (N, C), x)
    if weight is None and bias is not None:
        # torch's group_norm backward fails on a bias without a weight ("tensor does not have
        # a device"); a weight of ones changes no value.
        weight = torch.ones_like(bias)
    empty = None
    if stats is not None:
        empty = _check_stats(stats, x, plan)
        if return_stats:
            raise ValueError(
                "return_stats=True with stats= given: the given stats are returned "
                "unchanged; drop one of the two"
            )
    elif (
        N
        and not shard
        and plan.min_size == 1
        and math.prod(x.shape[2:]) == 1
        and not torch.compiler.is_compiling()
    ):
        warnings.warn(
            f"{plan.describe()} over {math.prod(x.shape[2:])} position(s) puts a single element "
            "in a group: its variance is 0 and its output is just beta. Use fewer groups or "
            "inputs with spatial extent.",
            SingleElementGroupWarning,
            stacklevel=3,
        )
    return dispatch.Request(
        x, plan, weight, bias, eps, activation, scale, shift, stats, return_stats
    ), empty


def check_planned_input(x: object, plan: GroupPlan, shard: bool = False) -> torch.Tensor:
    """x validated for a module's ``plan``: (N, C, *S) of a floating dtype with the plan's C
    channels (``shard``: as :func:`_check_input`). The error names the module's channels and
    groups, not the ``group_sizes=`` a module passes on to :func:`group_norm`."""
    x = _check_input(x, shard)
    if x.shape[1] != plan.num_channels:
        raise ValueError(
            f"expected x with {plan.num_channels} channels (dim 1) for "
            f"{plan.describe()}, got shape {tuple(x.shape)}"
        )
    return x


def group_norm_planned(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    backend: str,
) -> torch.Tensor:
    """:func:`group_norm` with a plan made beforehand (the modules' path: the plan is fixed at
    construction, so no per-call lookup). x must have the plan's C channels."""
    x = check_planned_input(x, plan)
    r, _ = _request(x, plan, weight, bias, eps, activation, None, None, None, False)
    chosen = dispatch.select_backend(r, backend)
    return _without_positions(r)[0] if 0 in x.shape[2:] else chosen.run(r)[0]


def _fx_node(input: torch.fx.Proxy, *args: object, **kwargs: object) -> Any:
    """torch.fx.symbolic_trace's record of a call: one node calling :func:`group_norm`, as
    ``F.group_norm`` records (the checks cannot read a Proxy's shape); keyword arguments left
    at their defaults are left out of it."""
    defaults = {"uneven": False, "return_stats": False, "backend": "auto"}
    given = {k: v for k, v in kwargs.items() if v is not None and defaults.get(k) != v}
    return input.tracer.create_proxy("call_function", group_norm, (input, *args), given)


@overload
def group_norm(
    input: torch.Tensor,
    num_groups: int | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    group_sizes: Sequence[int] | None = None,
    uneven: bool = False,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    stats: GroupStats | None = None,
    return_stats: Literal[False] = False,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    process_group: object | None = None,
) -> torch.Tensor: ...


@overload
def group_norm(
    input: torch.Tensor,
    num_groups: int | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    group_sizes: Sequence[int] | None = None,
    uneven: bool = False,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    stats: GroupStats | None = None,
    return_stats: Literal[True],
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    process_group: object | None = None,
) -> tuple[torch.Tensor, GroupStats]: ...


def group_norm(
    input: torch.Tensor,
    num_groups: int | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    group_sizes: Sequence[int] | None = None,
    uneven: bool = False,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    stats: GroupStats | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    process_group: object | None = None,
) -> torch.Tensor | tuple[torch.Tensor, GroupStats]:
    """Group normalization of ``input`` (N, C, *S), a drop-in for ``torch.nn.functional.group_norm``
    (same positional and keyword arguments, ``input=`` included).

    For each sample n and group g (channels of g, all positions)::

        y = act( ((x - mean[n,g]) / sqrt(var[n,g] + eps) * weight[c] + bias[c])
                 * (1 + scale[n,c]) + shift[n,c] )

    Groups come from exactly one of ``num_groups`` (must divide C unless ``uneven=True``),
    ``group_size`` (channels per group; must divide C unless ``uneven=True``, which makes C / S
    rounded groups) or ``group_sizes`` (explicit, summing to C). Uneven groups differ by at
    most one channel, larger first.
    ``weight``/``bias``: (C,); ``scale``/``shift``: (N, C) per-sample modulation (AdaGroupNorm);
    ``activation``: None, "silu", "gelu" (exact) or "relu". ``stats``: normalize with these
    statistics (e.g. merged from tiles) instead of computing them (a group of count 0, all masked,
    normalizes as with ``mask``); ``return_stats=True`` also
    returns the computed :class:`GroupStats`. The output has the input's dtype and memory
    format; statistics are accumulated in float32 (float64 for float64 input).

    ``mask``: statistics over the valid positions only (bool, or non-negative float weights,
    broadcastable to (N, 1, *S) or (N, C, *S)); see :mod:`groupnorm.masked` for the output at
    masked positions and for all-masked groups. ``process_group``: ``x`` is this rank's shard
    of a tensor split along a spatial axis across the group's ranks, normalized with the whole
    tensor's statistics; see :mod:`groupnorm.distributed`.
    """
    plain = (
        return_stats is False
        and scale is None
        and shift is None
        and stats is None
        and mask is None
        and process_group is None
    )
    if (
        plain
        and type(num_groups) is int
        and group_size is None
        and group_sizes is None
        and uneven is False
        and type(input) is torch.Tensor
        and not input.is_nested
        and input.dim() > 2
        and (torch.compiler.is_compiling() or not torch._C._is_tracing())
    ):
        # A plan made before is valid for these arguments, and the fast path checks the rest:
        # the common call skips the checks below (a quarter of its Python time). (Not while
        # torch.jit.trace records: x's channel count is a traced size there.)
        known = _PLANS.get(_plan_key(input.shape[1], num_groups, None, None, False))
        if known is not None:
            y = dispatch.run_plain(input, known, weight, bias, eps, activation, backend)
            if y is not None:
                return y
            plain = False  # the same call below would decline again
    if isinstance(input, torch.fx.Proxy):
        return _fx_node(
            input,
            num_groups,
            weight,
            bias,
            eps,
            group_size=group_size,
            group_sizes=group_sizes,
            uneven=uneven,
            activation=activation,
            scale=scale,
            shift=shift,
            stats=stats,
            return_stats=return_stats,
            backend=backend,
            mask=mask,
            process_group=process_group,
        )
    return traced_quietly(
        _checked_group_norm,
        input,
        num_groups,
        weight,
        bias,
        eps,
        group_size,
        group_sizes,
        uneven,
        activation,
        scale,
        shift,
        stats,
        return_stats,
        backend,
        mask,
        process_group,
        plain,
    )


def traced_quietly(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)``, without the TracerWarnings of torch.jit.trace, which records x's sizes as
    tensors, so that each argument check comparing them warns that the trace "might not
    generalize": the traced graph does not depend on them (C is the plan's, and the traced
    path reads no values; a trace runs on other N, H and W, and either layout)."""
    if torch.compiler.is_compiling() or not torch._C._is_tracing():
        return fn(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return fn(*args)


def _checked_group_norm(
    input: torch.Tensor,
    num_groups: int | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    group_size: int | None,
    group_sizes: Sequence[int] | None,
    uneven: bool,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    stats: GroupStats | None,
    return_stats: bool,
    backend: str,
    mask: torch.Tensor | None,
    process_group: object | None,
    plain: bool,
) -> torch.Tensor | tuple[torch.Tensor, GroupStats]:
    """:func:`group_norm` past its fast path: every argument checked, then the call run
    (``plain``: no statistics in or out, no epilogue beyond the activation, no mask, no
    process group, and the fast path has not declined it already)."""
    refusal: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if process_group is not None:
        from groupnorm import distributed

        refusal = distributed.refused_together(process_group)
    with refusal:
        x = _check_input(input, shard=process_group is not None)
        plan = resolve_plan(
            x.shape[1], num_groups, group_size=group_size, group_sizes=group_sizes, uneven=uneven
        )
        if plain:
            y = dispatch.run_plain(x, plan, weight, bias, eps, activation, backend)
            if y is not None:
                return y
        r, empty = _request(
            x,
            plan,
            weight,
            bias,
            eps,
            activation,
            scale,
            shift,
            stats,
            return_stats,
            shard=process_group is not None,
        )
        if mask is not None:
            # Before the empty-position shortcut too: a bad mask is an error whatever x holds.
            mask = masked.check_mask(mask, x)
            if stats is not None:
                raise ValueError(
                    "mask= and stats= together: the mask only selects the positions the statistics "
                    "come from, and stats= replaces them; pass group_stats(x, ..., mask=mask) as "
                    "stats="
                )
        chosen = dispatch.select_backend(r, backend)
        if process_group is not None:
            distributed.check_sharded(r, process_group)
    if process_group is None and 0 in x.shape[2:]:
        y, out_stats = _without_positions(r)
    elif mask is not None or process_group is not None:
        y, out_stats = _run_beyond_one_tensor(r, mask, process_group)
    elif stats is not None and _may_hold_empty_groups(stats, empty, chosen):
        y, out_stats = masked.normalize_with(r, stats), None
    else:
        y, out_stats = chosen.run(r)
    if return_stats:
        assert out_stats is not None
        return y, out_stats
    return y


def _may_hold_empty_groups(stats: GroupStats, empty: bool | None, chosen: dispatch.Backend) -> bool:
    """Whether given statistics go to :func:`groupnorm.masked.normalize_with`, which normalizes
    a group of count 0 (all masked: ``group_stats(x, ..., mask=)``) as ``group_norm(x, mask=)``
    does, to ``x_hat = 0``, where the backends' own formula gives NaN (0 / 0): statistics that
    hold such a group, where their values can be read; where they cannot (torch.compile,
    export, torch.func transforms), every call the torch backend serves (its two selects on
    (N, G) tensors cost nothing there); the Triton kernels keep those (docs/spec.md).
    ``empty``: what :func:`_check_stats` read of the counts, None where it read nothing."""
    if empty is not None:
        return empty
    if torch_ops.can_read_values(stats.count):  # m2 alone is a torch.func wrapper
        return bool((stats.count == 0).any())
    return chosen.name == "torch"


def _without_positions(r: dispatch.Request) -> tuple[torch.Tensor, GroupStats | None]:
    """x with an empty spatial dimension (no element in any group): an empty output, as torch
    gives, recorded through weight, bias, scale and shift, whose gradients are sums over no
    element (0); statistics, where asked, of count 0, as an all-masked group's are."""
    stats = r.stats
    if stats is None:
        everywhere = torch.ones((), dtype=torch.bool, device=r.x.device)
        stats = masked.masked_stats(r.x, r.plan, everywhere)
    y = masked.normalize_with(r, stats).to(r.x.dtype)
    return y, (stats if r.return_stats else None)


def _run_beyond_one_tensor(
    r: dispatch.Request, mask: torch.Tensor | None, process_group: object | None
) -> tuple[torch.Tensor, GroupStats | None]:
    """Masked and cross-process calls (``mask`` validated): the torch backend's composite ops
    with statistics made by :mod:`groupnorm.masked` / :mod:`groupnorm.distributed` (the Triton
    kernels defer to it)."""
    from groupnorm import distributed

    if process_group is not None:
        return distributed.run_sharded(r, process_group, mask)
    assert mask is not None
    return masked.run_masked(r, mask)


def group_stats(
    x: torch.Tensor,
    num_groups: int | None = None,
    *,
    group_size: int | None = None,
    group_sizes: Sequence[int] | None = None,
    uneven: bool = False,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
) -> GroupStats:
    """Per-(sample, group) statistics of ``x`` (N, C, *S) as :class:`GroupStats`, (N, G) each.

    With :func:`groupnorm.merge_stats` and ``group_norm(..., stats=)`` this normalizes a tensor
    processed in parts (tiled VAE decoding): the stats of the parts, merged, equal the stats of
    the whole. ``backend`` is chosen as for :func:`group_norm` (the Triton kernels on CUDA).
    With ``mask``, the statistics of the valid positions only (``count`` is then the sum of the
    mask's weights; see :mod:`groupnorm.masked`; the torch backend computes them).
    """
    x = _check_input(x)
    plan = resolve_plan(
        x.shape[1], num_groups, group_size=group_size, group_sizes=group_sizes, uneven=uneven
    )
    r = dispatch.Request(x, plan, None, None, 0.0, None, None, None, None, True)
    chosen = dispatch.select_backend(r, backend)
    if mask is None and 0 in x.shape[2:]:
        mask = torch.ones((), dtype=torch.bool, device=x.device)  # count 0: no element
    if mask is not None:
        return masked.stats_of(r, masked.check_mask(mask, x))
    return chosen.stats_of(r)
