"""How channels are split into groups.

Every path in the library (reference, PyTorch, Triton) consumes one :class:`GroupPlan`: a
tuple of group sizes over ``C`` channels, contiguous and in channel order. A plan is built from
exactly one of

* ``num_groups=G``: ``G`` groups of ``C / G`` channels. ``G`` must divide ``C`` (as in
  ``torch.nn.GroupNorm``) unless ``uneven=True``, in which case the groups differ by at most one
  channel, larger groups first (``C = 48, G = 32`` gives 16 groups of 2 then 16 groups of 1).
* ``group_size=S``: ``C / S`` groups of ``S`` channels. ``S`` must divide ``C`` unless
  ``uneven=True``, in which case ``C / S`` rounded to the nearest integer groups that differ by
  at most one channel (:func:`groups_of_size`; ``C = 8, S = 3`` gives 3, 3, 2), as
  ``convert_batchnorm(group_size=S, policy="uneven")`` plans them.
* ``group_sizes=[s0, s1, ...]``: explicit sizes that sum to ``C``.

Uneven groups are always an explicit choice; an impossible request is a ``ValueError`` that lists
what would work. :func:`choose_num_groups` picks ``G`` for awkward channel counts and says why.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GroupChoice",
    "GroupPlan",
    "check_group_sizes",
    "choose_num_groups",
    "divisors",
    "groups_of_size",
    "make_plan",
]


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def runs_of(sizes: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal consecutive group sizes: (first channel, end channel, size).
    TorchScript compiles it too (a scripted fx graph's explicit sizes, in modules.py)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for size in sizes:  # a plain loop: torch.compile traces plan construction
        if len(runs) > 0 and runs[-1][2] == size:
            runs[-1] = (runs[-1][0], runs[-1][1] + size, size)
        else:
            runs.append((start, start + size, size))
        start += size
    return runs


@dataclass(frozen=True)
class GroupPlan:
    """Contiguous channel groups: ``sizes[g]`` channels in group ``g``, in channel order.

    Derived from ``sizes`` once, at construction: ``num_groups``, ``num_channels``, ``is_even``
    (all groups the same size), ``min_size``, ``offsets`` (first channel of each group, length
    G + 1), ``channel_group`` (group index of each channel, length C) and ``runs`` (each maximal
    run of equal-size groups as (first channel, end channel, group size)). They are plain Python
    attributes computed without numpy: torch.compile traces plan construction, turns numpy calls
    into tensor ops (data-dependent offsets) and cannot trace ``functools.cached_property``.
    """

    sizes: tuple[int, ...]
    num_groups: int = field(init=False, compare=False, repr=False)
    num_channels: int = field(init=False, compare=False, repr=False)
    is_even: bool = field(init=False, compare=False, repr=False)
    min_size: int = field(init=False, compare=False, repr=False)
    offsets: tuple[int, ...] = field(init=False, compare=False, repr=False)
    channel_group: tuple[int, ...] = field(init=False, compare=False, repr=False)
    channel_first: tuple[int, ...] = field(init=False, compare=False, repr=False)
    runs: tuple[tuple[int, int, int], ...] = field(init=False, compare=False, repr=False)
    # Index tensors of the plan per device, filled by the torch backend in eager calls: a
    # compiled graph reads them as constants instead of building them with ops of its own.
    index_cache: dict[object, object] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        sizes = check_group_sizes(self.sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"group sizes must be positive integers, got {list(self.sizes)}")
        offsets = (0, *itertools.accumulate(sizes))
        derived = {
            "sizes": sizes,
            "num_groups": len(sizes),
            "num_channels": sum(sizes),
            "is_even": len(set(sizes)) == 1,
            "min_size": min(sizes),
            "offsets": offsets,
            "channel_group": tuple(g for g, s in enumerate(sizes) for _ in range(s)),
            "channel_first": tuple(
                o for o, s in zip(offsets, sizes, strict=False) for _ in range(s)
            ),
            "runs": tuple(runs_of(list(sizes))),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def __getstate__(self) -> dict[str, object]:
        """Pickled without ``index_cache``: tensors on this machine's devices, rebuilt on use
        (and a weights-only load admits only the classes it is told of)."""
        return {k: v for k, v in self.__dict__.items() if k != "index_cache"}

    def __setstate__(self, state: dict[str, object]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "index_cache", {})

    @property
    def channels_per_group(self) -> int:
        """C / G for an even plan; a ``ValueError`` for an uneven one."""
        if not self.is_even:
            raise ValueError(f"uneven plan {self.describe()} has no single group size")
        return self.sizes[0]

    def describe(self) -> str:
        """Short human description, e.g. ``32 groups of 2`` or ``16x3 + 16x2 (C=80)``."""
        if self.is_even:
            return f"{self.num_groups} groups of {self.sizes[0]}"
        runs: list[tuple[int, int]] = []
        for s in self.sizes:
            if runs and runs[-1][0] == s:
                runs[-1] = (s, runs[-1][1] + 1)
            else:
                runs.append((s, 1))
        return " + ".join(f"{n}x{s}" for s, n in runs) + f" (C={self.num_channels})"


def groups_of_size(num_channels: int, group_size: int) -> int:
    """How many groups of about ``group_size`` channels ``num_channels`` make where it does not
    divide them: ``C / S`` rounded to the nearest integer (half to even), at least 1."""
    return max(1, round(num_channels / group_size))


def _divisibility_error(what: str, value: int, C: int) -> ValueError:
    divs = divisors(C)
    choice = choose_num_groups(C)
    G = groups_of_size(C, value) if what == "group_size" else value
    return ValueError(
        f"{what}={value} does not divide num_channels={C}. "
        f"num_groups that divide {C}: {divs}; or pass group_size= one of {divs} "
        f"(channels per group); or uneven=True for {G} groups that differ by at most one "
        f"channel; or choose_num_groups({C}) -> {choice.num_groups} ({choice.reason})."
    )


MAX_CHANNELS = 1 << 24


def make_plan(
    num_channels: int,
    num_groups: int | None = None,
    *,
    group_size: int | None = None,
    group_sizes: Sequence[int] | None = None,
    uneven: bool = False,
) -> GroupPlan:
    """Build the plan for ``num_channels`` from exactly one of the three ways to say it.

    ``uneven=True`` lets ``num_groups`` or ``group_size`` not divide ``num_channels``: the
    groups then differ by at most one channel (module docstring); it is unused with
    ``group_sizes``."""
    C = positive_int("num_channels", num_channels)
    if not isinstance(uneven, bool):
        raise TypeError(f"uneven must be True or False, got {uneven!r} ({type(uneven).__name__})")
    if C > MAX_CHANNELS:
        # A plan keeps per-channel tables: 10**9 channels ran out of memory building them.
        raise ValueError(
            f"num_channels={C} is more than a plan holds (at most 2**24 = {MAX_CHANNELS})"
        )
    given = [
        n
        for n, v in (
            ("num_groups", num_groups),
            ("group_size", group_size),
            ("group_sizes", group_sizes),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of num_groups=, group_size= or group_sizes=, got {given or 'none'}"
        )
    if group_sizes is not None:
        sizes = check_group_sizes(group_sizes)
        bad = [i for i, s in enumerate(sizes) if s < 1]
        if sum(sizes) != C or bad:
            why = f"entry {bad[0]} is {sizes[bad[0]]}" if bad else f"they sum to {sum(sizes)}"
            raise ValueError(
                f"group_sizes={list(sizes)} must be positive and sum to num_channels={C} ({why})"
            )
        return GroupPlan(sizes)
    if group_size is not None:
        S = positive_int("group_size", group_size)
        if S > C:
            raise ValueError(f"group_size={S} is larger than num_channels={C}; at most {C}")
        if C % S == 0:
            return GroupPlan((S,) * (C // S))
        if not uneven:
            raise _divisibility_error("group_size", S, C)
        return _uneven_plan(C, groups_of_size(C, S))
    G = positive_int("num_groups", num_groups)
    if G > C:
        raise ValueError(
            f"num_groups={G} is larger than num_channels={C}: a group needs at least one "
            f"channel; use num_groups <= {C} (num_groups={C} is InstanceNorm)"
        )
    if C % G == 0:
        return GroupPlan((C // G,) * G)
    if not uneven:
        raise _divisibility_error("num_groups", G, C)
    return _uneven_plan(C, G)


def _uneven_plan(C: int, G: int) -> GroupPlan:
    """G groups over C channels that differ by at most one channel, larger groups first."""
    base = C // G  # not divmod: torch.compile cannot trace it
    extra = C - base * G
    return GroupPlan((base + 1,) * extra + (base,) * (G - extra))


def check_group_sizes(group_sizes: object) -> tuple[int, ...]:
    """``group_sizes`` as a tuple of ints: a list, tuple or 1-D integer array of integers (not
    bools, floats or strings, which ``int()`` would truncate or parse, nor a dict or set)."""
    if isinstance(group_sizes, np.ndarray) and group_sizes.ndim == 1:
        group_sizes = group_sizes.tolist()
    if not isinstance(group_sizes, list | tuple):
        raise TypeError(
            f"group_sizes must be a list or tuple of ints, got {type(group_sizes).__name__}"
        )
    for s in group_sizes:
        if isinstance(s, bool) or not isinstance(s, int | np.integer):
            raise TypeError(
                f"group_sizes must hold ints, got {s!r} ({type(s).__name__}) in {group_sizes!r}"
            )
    return tuple(int(s) for s in group_sizes)


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1 (a NumPy integer or a 0-d integer tensor too, as
    ``group_norm`` takes them): a TypeError naming it where it is no integer (a bool, float,
    string, array, other tensor or None, as torch's TypeError for ``F.group_norm(x, "4")``), a
    ValueError where it is one below 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        count = _zero_d_integer(value)
        if count is None:
            raise TypeError(
                f"{name} must be a positive integer (an int, a NumPy integer or a 0-d integer "
                f"tensor), got {value!r} ({type(value).__name__})"
            )
        value = count
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _zero_d_integer(value: object) -> int | None:
    """The integer a 0-d integer torch tensor holds (not a bool one); None for anything else,
    a NumPy array too (F.group_norm and group_norm refuse them). Duck-typed: this module does
    not import torch; a torch dtype answers is_floating_point, a NumPy one does not."""
    dtype = getattr(value, "dtype", None)
    if (
        getattr(value, "ndim", None) != 0
        or not hasattr(dtype, "is_floating_point")
        or "bool" in str(dtype)
    ):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:  # a floating or complex one
        return None


@dataclass(frozen=True)
class GroupChoice:
    """What :func:`choose_num_groups` picked and why."""

    num_groups: int
    channels_per_group: int
    reason: str


def choose_num_groups(
    num_channels: int, target: int = 32, *, min_channels_per_group: int = 2
) -> GroupChoice:
    """Pick a G that divides ``num_channels``, as close to ``target`` as possible.

    Candidates are the divisors of C that leave at least ``min_channels_per_group`` channels per
    group (Wu & He: very small groups approach InstanceNorm and lose accuracy, table 3b). Ties
    in ``|log(G / target)|`` go to the larger G. If C is too small for any such group, G = 1.
    """
    C = positive_int("num_channels", num_channels)
    if C > MAX_CHANNELS:  # nothing make_plan takes; and trial division to sqrt(C) never ends
        raise ValueError(
            f"num_channels={C} is more than a plan holds (at most 2**24 = {MAX_CHANNELS})"
        )
    target = positive_int("target", target)
    min_channels_per_group = positive_int("min_channels_per_group", min_channels_per_group)
    divs = divisors(C)
    ok = [g for g in divs if C // g >= min_channels_per_group]
    if not ok:
        return GroupChoice(
            1,
            C,
            f"{C} channel{'s' if C > 1 else ''} cannot form groups of "
            f"{min_channels_per_group}; one group (LayerNorm)",
        )
    best = min(ok, key=lambda g: (abs(np.log(g / target)), -g))
    if best == target:
        reason = f"{target} divides {C}"
    else:
        reason = (
            f"{target} does not divide {C}; {best} is the divisor of {C} closest to {target} "
            f"that leaves at least {min_channels_per_group} channels per group"
        )
    return GroupChoice(best, C // best, reason)
