"""Per-(sample, group) statistics as a value: compute on parts, merge exactly, normalize with them.

Statistics are kept relative to a per-group *pivot* (one element of the group, or its mean
where torch's kernel computed that within ~1e-6 of the spread): with ``x`` near
``1e4`` and a spread of ``1e-2``, a float32 absolute mean is off by ~ulp(1e4) = 1e-3, a tenth of
the spread, while ``x - pivot`` is exact in float32 and its mean is accurate
(docs/spec.md#numerics).

All fields are ``(N, G)`` tensors in the accumulation dtype (float32, float64 for float64 x)::

    pivot         p[n,g]
    shifted_mean  mean of (x - p) over the group's elements
    m2            sum of (x - mean)^2 over the group's elements
    count         number of elements
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from groupnorm.backends import torch_ops
from groupnorm.groups import GroupPlan

__all__ = ["GroupStats", "check_stats_values", "merge_stats"]

_FIELDS = ("pivot", "shifted_mean", "m2", "count")


class Widened(NamedTuple):
    """What a float32 :class:`GroupStats` formed under autograd (reverse mode, or forward mode
    whatever the grad mode) keeps behind its fields: the
    statistics in float64, the float64 copies of the inputs they were taken from, and what
    says that nothing has changed since.

    ``group_norm(x, stats=)`` of one of those very inputs normalizes that copy with these
    statistics, so that x's gradient through the statistics and its direct one add in
    float64 (:func:`groupnorm.backends.torch_ops.run`): added in float32, they cancel to
    rounding noise of size rstd |gamma| (the float32 fields and x's gradient alike), which put
    dx at a median 30-61x and up to 244x the float32 bound where rstd is about 700."""

    stats: GroupStats  # float64, with its own autograd history from the inputs' copies
    # (x, its float64 copy, x's version and data pointer when the copy was made)
    sources: tuple[tuple[torch.Tensor, torch.Tensor, int, int], ...]
    fields: tuple[torch.Tensor, ...]  # the float32 fields' values when this was made
    tensors: tuple[torch.Tensor, ...]  # the float32 fields themselves

    def current(self, fields: GroupStats) -> bool:
        """Whether ``fields``, the float32 statistics holding this, still hold the very tensors
        (a copy or ``dataclasses.replace`` keeps them; a field replaced by another, a detached
        one too, has other autograd history) with the values they were made with (compared by
        value: a change through ``.data`` bumps no version), for the same plan."""
        return (
            fields.plan == self.stats.plan
            and all(getattr(fields, f) is t for f, t in zip(_FIELDS, self.tensors, strict=True))
            and all(
                torch.equal(getattr(fields, f), kept)
                for f, kept in zip(_FIELDS, self.fields, strict=True)
            )
        )

    def source(self, fields: GroupStats, x: torch.Tensor) -> torch.Tensor | None:
        """The float64 copy of ``x`` (this very tensor, unchanged since as far as its version
        and storage say) where ``fields`` are current; else None."""
        for src, wide, version, pointer in self.sources:
            if src is x and x._version == version and x.data_ptr() == pointer:
                return wide if self.current(fields) else None
        return None


@dataclass(frozen=True, eq=False)
class GroupStats:
    """Pivot-shifted group statistics, every field (N, G) in the accumulation dtype, and the
    :class:`GroupPlan` they were computed for (its G is the second dimension).

    Built by :func:`groupnorm.group_stats`; the constructor checks types, shapes, dtypes and
    devices (not values: see :func:`check_stats_values`). Compared by identity, as tensors'
    holders are (``==`` of tensor fields has no single truth value).
    """

    pivot: torch.Tensor
    shifted_mean: torch.Tensor
    m2: torch.Tensor
    count: torch.Tensor
    plan: GroupPlan | None = None
    # Internal, set by widened() for group_stats and merge_stats (see Widened). An argument so
    # that dataclasses.replace and copy.copy carry it: it serves only fields that are still
    # the tensors it was made for (Widened.current).
    _widened: Widened | None = field(default=None, kw_only=True, repr=False)

    def __getstate__(self) -> dict[str, object]:
        # The float64 copies behind the fields serve gradients in this process only.
        return {**self.__dict__, "_widened": None}

    def __copy__(self) -> GroupStats:
        return replace(self)

    def __deepcopy__(self, memo: dict[int, object]) -> GroupStats:
        if any(getattr(self, f).grad_fn is not None for f in _FIELDS):
            raise RuntimeError(
                "GroupStats computed under autograd (from an x that requires grad) cannot be "
                "deep-copied: their fields are not graph leaves, which torch does not deep-copy. "
                "copy.copy shares them; or take the statistics under torch.no_grad(), or detach "
                "each field into a new GroupStats"
            )
        pivot, shifted_mean, m2, count = (copy.deepcopy(getattr(self, f), memo) for f in _FIELDS)
        return GroupStats(pivot, shifted_mean, m2, count, plan=self.plan)

    def __post_init__(self) -> None:
        fields = [getattr(self, f) for f in _FIELDS]
        if not all(isinstance(t, torch.Tensor) for t in fields) or not isinstance(
            self.plan, GroupPlan
        ):
            got = ", ".join(type(v).__name__ for v in (*fields, self.plan))
            raise TypeError(
                "GroupStats(pivot, shifted_mean, m2, count, plan) takes four (N, G) tensors and "
                f"the GroupPlan they were computed for; got ({got}). Use groupnorm.group_stats"
            )
        for name, t in zip(_FIELDS, fields, strict=True):
            if t.layout is not torch.strided or t.is_nested:
                what = "a nested tensor" if t.is_nested else f"layout {t.layout}"
                raise TypeError(
                    f"GroupStats.{name} must be a dense tensor (layout torch.strided), got "
                    f"{what}; use .to_dense()"
                )
        if not isinstance(self._widened, Widened | None):
            raise TypeError("GroupStats(_widened=) is internal: leave it out")
        p = self.pivot
        G = self.plan.num_groups
        for name, t in zip(_FIELDS, fields, strict=True):
            if t.dim() != 2 or t.shape[1] != G or t.shape != p.shape:
                raise ValueError(
                    f"GroupStats.{name} has shape {tuple(t.shape)}; every field must be (N, G) "
                    f"with G = {G} for {self.plan.describe()}, and pivot is {tuple(p.shape)}"
                )
            if t.dtype != p.dtype or t.dtype not in (torch.float32, torch.float64):
                raise ValueError(
                    f"GroupStats.{name} has dtype {t.dtype}; every field must be float32 (float64 "
                    f"for float64 inputs), all the same; pivot is {p.dtype}"
                )
            if t.device != p.device:
                raise ValueError(
                    f"GroupStats.{name} is on {t.device} but pivot is on {p.device}: all fields "
                    "must be on one device"
                )

    @property
    def mean(self) -> torch.Tensor:
        """Absolute mean ``pivot + shifted_mean`` (rounded to the accumulation dtype)."""
        return self.pivot + self.shifted_mean

    @property
    def var(self) -> torch.Tensor:
        """Biased variance ``m2 / count``."""
        return self.m2 / self.count

    def rstd(self, eps: float = 1e-5) -> torch.Tensor:
        """``1 / sqrt(var + eps)``; ``eps`` as ``group_norm`` takes it (finite, >= 0)."""
        from groupnorm.functional import check_eps  # functional imports this module

        return torch.rsqrt(self.var + check_eps(eps))

    @property
    def shape(self) -> torch.Size:
        return self.pivot.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.pivot.dtype

    def to(self, device: torch.device | str) -> GroupStats:
        """The statistics on ``device`` (their dtype is x's accumulation dtype: not changed);
        these very statistics where they are on it already (their float64 form, which serves
        gradients, included)."""
        if not isinstance(device, torch.device | str | int):
            raise TypeError(
                f"GroupStats.to takes a device (torch.device, 'cpu', 'cuda:0', an index), got "
                f"{device!r}; the statistics' dtype follows x's"
            )
        device = torch.device(device)
        pivot, shifted_mean, m2, count = moved = [getattr(self, f).to(device) for f in _FIELDS]
        if all(t is getattr(self, f) for f, t in zip(_FIELDS, moved, strict=True)):
            return self
        # Moved, the float64 form is dropped: it serves only the very x it came from, on the
        # device it left.
        return GroupStats(pivot, shifted_mean, m2, count, self.plan)


def widened(
    fields: GroupStats,
    stats: GroupStats,
    sources: tuple[tuple[torch.Tensor, torch.Tensor, int, int], ...],
) -> GroupStats:
    """``fields`` (float32) holding ``stats``, their float64 form, and the float64 copies of
    the inputs they came from (:class:`Widened`)."""
    tensors = tuple(getattr(fields, f) for f in _FIELDS)
    kept = tuple(t.detach().clone() for t in tensors)
    return replace(fields, _widened=Widened(stats, sources, kept, tensors))


def check_stats_values(stats: GroupStats, what: str = "stats", *, empty: bool = False) -> bool:
    """Raise if a count is not positive and finite (0 allowed with ``empty``: merging takes
    empty parts, and ``group_norm(stats=)`` all-masked groups) or an m2 is negative: such
    statistics would give Inf or NaN without an error. A NaN m2 passes: it is what the
    statistics of a group holding NaN are, and that group alone comes out NaN, as it does
    without given statistics. Returns whether some count is 0 (an empty group), so that the
    caller need not read the counts again. Reads the values, all in one transfer (one host
    sync on a device): the caller skips it where that is not possible (tracing) or would
    stall a device."""
    count = stats.count.detach()
    if not count.numel():
        return False
    # aminmax propagates NaN, so a NaN count fails both bounds. Not m2's minimum: a NaN there
    # would hide a negative entry.
    least, most = count.aminmax()
    negative = (stats.m2.detach() < 0).any().to(count.dtype)
    low, high, negative_m2 = torch.stack((least, most, negative)).tolist()
    if not ((low >= 0 if empty else low > 0) and high < math.inf):
        least_ok = "0" if empty else "1"
        raise ValueError(
            f"{what}.count has entries that are not finite numbers >= {least_ok}; a count is a "
            "number of elements"
        )
    if negative_m2:
        raise ValueError(f"{what}.m2 has negative entries; m2 is a sum of squared deviations, >= 0")
    return low == 0


def merge_stats(a: GroupStats, b: GroupStats) -> GroupStats:
    """Exact merge of the statistics of two disjoint parts of the same groups (Chan et al.).

    The merged mean is stored as the mean rounded to the statistics' dtype (the pivot) and
    the rest; where ``a`` is empty (count 0) the merge is ``b``. With ``delta`` the
    difference of the two means::

        n = n_a + n_b;  shifted_mean = mean_a' + delta * n_b / n
        m2 = m2_a + m2_b + delta^2 * n_a * n_b / n

    computed in float64 (the tensors are (N, G): cheap) so that the pivots' difference is exact.
    Both must come from the same plan, batch, dtype and device. Two empty parts of a group
    (count 0, as masked statistics of all-masked positions are) merge to an empty one: count 0
    and m2 0, not NaN.
    """
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, GroupStats):
            raise TypeError(
                f"merge_stats({name}=...) needs a GroupStats (from group_stats), got "
                f"{type(s).__name__}"
            )
    if a.plan != b.plan:
        assert a.plan is not None and b.plan is not None
        raise ValueError(
            f"cannot merge statistics of {a.plan.describe()} with {b.plan.describe()}: "
            "compute both with the same group plan"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"cannot merge statistics of shape {tuple(a.shape)} with {tuple(b.shape)}: "
            "both must be (N, G) for the same batch and group plan"
        )
    if a.dtype != b.dtype:
        raise ValueError(
            f"cannot merge {a.dtype} statistics with {b.dtype} ones: compute both from inputs "
            "of the same precision"
        )
    if a.pivot.device != b.pivot.device:
        raise ValueError(f"statistics on {a.pivot.device} and {b.pivot.device}: move one first")
    if torch_ops.can_read_values(a.m2) and torch_ops.can_read_values(b.m2):
        check_stats_values(a, "a", empty=True)
        check_stats_values(b, "b", empty=True)
    f64 = torch.float64
    na, nb = a.count.to(f64), b.count.to(f64)
    delta = (b.pivot.to(f64) - a.pivot.to(f64)) + (b.shifted_mean.to(f64) - a.shifted_mean.to(f64))
    n = na + nb
    # Counts are >= 0, so n == 0 only where nb == 0 too: dividing by 1 there gives 0 terms,
    # and keeps NaN out of the gradient of an unselected torch.where branch.
    safe_n = torch.where(n > 0, n, 1)
    shifted_mean = a.shifted_mean.to(f64) + delta * (nb / safe_n)
    m2 = a.m2.to(f64) + b.m2.to(f64) + delta * delta * (na * nb / safe_n)
    dtype = a.dtype
    # The merged mean, re-pivoted: the pivot is the mean rounded to the statistics' dtype
    # (detached), the shifted mean the rest, which carries the gradient. Kept relative to a's
    # pivot, the mean was a's shifted mean rounded whole: an outlier first element 1000
    # deviations from the data put normalization at 7.7x the float32 bound; an empty part's
    # pivot (0 for masked statistics) 0.046 off at mean 1e4, std 1e-2. The rest is taken as
    # (a's pivot - the new pivot) + shifted mean, not as the float64 mean minus the pivot: the
    # mean as one float64 number drops what float64 statistics hold below its last bit (77x
    # the float64 bound at mean 1e4, std 1e-2).
    a_pivot = a.pivot.to(f64)
    pivot = (a_pivot + shifted_mean).detach().to(dtype)
    rest = (a_pivot - pivot.to(f64)) + shifted_mean
    empty = a.count == 0
    # An empty part adds nothing, whatever its fields hold (a NaN m2 of a hand-made one too).
    b_empty = b.count == 0
    merged = GroupStats(
        torch.where(empty, b.pivot, torch.where(b_empty, a.pivot, pivot)),
        torch.where(empty, b.shifted_mean, torch.where(b_empty, a.shifted_mean, rest.to(dtype))),
        torch.where(empty, b.m2, torch.where(b_empty, a.m2, m2.to(dtype))),
        n.to(dtype),
        plan=a.plan,
    )
    if (a._widened is None and b._widened is None) or not torch_ops.can_read_values(a.m2):
        return merged
    wide_a, wide_b = _wide_form(a), _wide_form(b)
    if wide_a is None or wide_b is None:
        return merged
    # The float64 statistics merged alongside, for gradients that add in float64 (Widened).
    wide = merge_stats(wide_a[0], wide_b[0])
    return widened(merged, wide, wide_a[1] + wide_b[1])


def _wide_form(
    s: GroupStats,
) -> tuple[GroupStats, tuple[tuple[torch.Tensor, torch.Tensor, int, int], ...]] | None:
    """``s``'s float64 statistics and their sources for :func:`merge_stats`, or None where it
    has none. Statistics of no element (every count 0: an empty tile's, an all-masked part's)
    add nothing to a merge, so their own fields in float64 serve: without that an empty tile in
    a chain dropped the merged float64 form, and dx reached 5.6x the float32 bound."""
    if s._widened is not None:
        return (s._widened.stats, s._widened.sources) if s._widened.current(s) else None
    if bool((s.count == 0).all()):
        pivot, shifted_mean, m2, count = (getattr(s, f).detach().double() for f in _FIELDS)
        return GroupStats(pivot, shifted_mean, m2, count, plan=s.plan), ()
    return None
