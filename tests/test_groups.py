"""Group plans and the G chooser: examples, errors, and properties over all channel counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupnorm.groups import GroupPlan, choose_num_groups, divisors, make_plan


def test_even_plan() -> None:
    p = make_plan(64, 32)
    assert p.sizes == (2,) * 32 and p.is_even and p.channels_per_group == 2
    assert p.offsets[:3] == (0, 2, 4) and p.offsets[-1] == 64
    np.testing.assert_array_equal(p.channel_group[:5], [0, 0, 1, 1, 2])


def test_uneven_plan_larger_groups_first() -> None:
    p = make_plan(48, 32, uneven=True)
    assert p.sizes == (2,) * 16 + (1,) * 16
    assert p.describe() == "16x2 + 16x1 (C=48)"


def test_group_size_and_explicit_sizes() -> None:
    assert make_plan(48, group_size=16).sizes == (16, 16, 16)
    assert make_plan(10, group_sizes=[4, 3, 3]).sizes == (4, 3, 3)


def test_not_dividing_lists_the_choices() -> None:
    with pytest.raises(ValueError) as e:
        make_plan(48, 32)
    msg = str(e.value)
    for needle in (
        "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]",
        "uneven=True",
        "group_size=",
        "choose_num_groups(48) -> 24",
    ):
        assert needle in msg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_groups": 5, "group_size": 2}, "exactly one"),
        ({}, "exactly one"),
        ({"group_size": 4}, "group_size=4 does not divide"),
        ({"group_size": 20}, "larger than num_channels"),
        ({"num_groups": 11}, "larger than num_channels"),
        ({"num_groups": 0}, "positive integer"),
        ({"group_sizes": [4, 4]}, "sum to num_channels=10"),
        ({"group_sizes": [11, -1]}, r"positive and sum to num_channels=10 \(entry 1 is -1\)"),
    ],
    ids=[
        "two_ways",
        "no_way",
        "size_not_dividing",
        "size_too_big",
        "too_many_groups",
        "zero_groups",
        "sizes_wrong_sum",
        "negative_size",
    ],
)
def test_plan_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_plan(10, **kwargs)


def test_bad_channel_count() -> None:
    with pytest.raises(ValueError, match="num_channels"):
        make_plan(0, 1)


@pytest.mark.parametrize(
    ("C", "G", "cpg"),
    [(48, 24, 2), (96, 32, 3), (100, 25, 4), (64, 32, 2), (2048, 32, 64), (3, 1, 3), (1, 1, 1)],
)
def test_chooser_examples(C: int, G: int, cpg: int) -> None:
    choice = choose_num_groups(C)
    assert (choice.num_groups, choice.channels_per_group) == (G, cpg)
    assert choice.reason


@given(C=st.integers(1, 4096), G=st.integers(1, 512))
def test_uneven_plan_properties(C: int, G: int) -> None:
    if G > C:
        with pytest.raises(ValueError):
            make_plan(C, G, uneven=True)
        return
    p = make_plan(C, G, uneven=True)
    assert p.num_groups == G and p.num_channels == C
    assert max(p.sizes) - min(p.sizes) <= 1
    assert list(p.sizes) == sorted(p.sizes, reverse=True)
    assert len(p.channel_group) == C and p.channel_group[-1] == G - 1
    if C % G == 0:
        assert p == make_plan(C, G)


@given(C=st.integers(1, 4096), target=st.integers(1, 128))
def test_chooser_properties(C: int, target: int) -> None:
    choice = choose_num_groups(C, target)
    assert C % choice.num_groups == 0
    assert choice.channels_per_group * choice.num_groups == C
    if C >= 2:
        assert choice.channels_per_group >= 2
    # No other admissible divisor is strictly closer to the target (log scale).
    best = abs(np.log(choice.num_groups / target))
    for d in divisors(C):
        if C // d >= 2:
            assert abs(np.log(d / target)) >= best - 1e-12


@given(st.lists(st.integers(1, 9), min_size=1, max_size=20))
def test_explicit_plan_properties(sizes: list[int]) -> None:
    p = make_plan(sum(sizes), group_sizes=sizes)
    assert p == GroupPlan(tuple(sizes))
    assert [p.offsets[g + 1] - p.offsets[g] for g in range(p.num_groups)] == sizes
    assert np.bincount(p.channel_group).tolist() == sizes
    # runs: maximal stretches of equal sizes that tile the channels in order
    assert p.runs[0][0] == 0 and p.runs[-1][1] == p.num_channels
    for (_, end, size), (start, _, nxt) in zip(p.runs, p.runs[1:], strict=False):
        assert end == start and size != nxt
    expanded = [size for start, end, size in p.runs for _ in range((end - start) // size)]
    assert expanded == sizes


def test_uneven_plan_has_two_runs() -> None:
    assert make_plan(48, 32, uneven=True).runs == ((0, 32, 2), (32, 48, 1))
    assert make_plan(64, 32).runs == ((0, 64, 2),)
