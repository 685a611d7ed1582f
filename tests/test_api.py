"""The public API's contracts: drop-in parity with torch.nn.GroupNorm, the statistics API as tiled
decoding uses it, dispatch, warnings and errors raised before any work."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import dispatch
from groupnorm.backends import torch_ops
from groupnorm.functional import resolve_plan
from groupnorm.stats import GroupStats
from tests._inputs import LAYOUTS, make_x, rand, reference
from tests._tolerances import assert_matches, to_numpy

# ---- drop-in module ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"eps": 1e-3}, {"affine": False}, {"dtype": torch.float64}, {"bias": False}],
    ids=["default", "eps", "no_affine", "fp64", "no_bias"],
)
def test_module_is_a_drop_in(kwargs: dict) -> None:
    torch.manual_seed(0)
    if "bias" in kwargs and "bias" not in inspect.signature(nn.GroupNorm).parameters:
        pytest.skip(f"torch {torch.__version__}'s nn.GroupNorm has no bias= flag to compare with")
    ours, theirs = groupnorm.GroupNorm(8, 32, **kwargs), nn.GroupNorm(8, 32, **kwargs)
    assert isinstance(ours, nn.GroupNorm)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    if theirs.affine:
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
    ours.load_state_dict(theirs.state_dict())
    dtype = kwargs.get("dtype", torch.float32)
    for layout in ("nchw", "channels_last"):
        x = make_x((2, 32, 6, 5), dtype, layout)
        torch.testing.assert_close(ours(x), theirs(x))


def test_module_state_dict_round_trip() -> None:
    m = groupnorm.GroupNorm(num_channels=48, group_size=16)
    with torch.no_grad():
        m.weight.normal_()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = groupnorm.GroupNorm(num_channels=48, group_size=16)
    fresh.load_state_dict(torch.load(buf))
    x = make_x((2, 48, 3, 3), torch.float32)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    clone = copy.deepcopy(m)
    torch.testing.assert_close(clone(x), m(x), rtol=0, atol=0)


def test_module_extras_and_repr() -> None:
    m = groupnorm.GroupNorm(32, 48, uneven=True)
    assert m.num_groups == 32 and m.plan.sizes == (2,) * 16 + (1,) * 16
    assert "group_sizes=" in repr(m)
    act = groupnorm.GroupNormAct(4, 16)
    torch_repr = repr(nn.GroupNorm(4, 16))
    assert repr(act) == "GroupNormAct" + torch_repr[len("GroupNorm") : -1] + ", activation='silu')"
    x = make_x((2, 16, 3, 3), torch.float32)
    assert_matches(
        act(x),
        reference(x, resolve_plan(16, 4), act.weight, act.bias, activation="silu")[0],
        torch.float32,
    )
    assert_matches(
        m(make_x((2, 48, 3, 3), torch.float32, seed=1)),
        reference(make_x((2, 48, 3, 3), torch.float32, seed=1), m.plan, m.weight, m.bias)[0],
        torch.float32,
    )


def test_regression_a_group_norm_act_without_activation_says_so() -> None:
    """GroupNormAct(32, 64, activation=None) printed as GroupNormAct(32, 64, ...), which
    builds a SiLU one (its default)."""
    m = groupnorm.GroupNormAct(32, 64, activation=None)
    assert repr(m).endswith(", activation=None)")
    assert eval("groupnorm." + repr(m)).activation is None
    assert "activation" not in repr(groupnorm.GroupNorm(32, 64))


def test_module_errors() -> None:
    with pytest.raises(ValueError, match="uneven=True"):
        groupnorm.GroupNorm(32, 48)
    with pytest.raises(TypeError, match="num_channels is required"):
        groupnorm.GroupNorm(num_groups=32)
    with pytest.raises(TypeError, match="give each once"):
        groupnorm.GroupNorm(8, num_groups=4, num_channels=8)
    with pytest.raises(ValueError, match="activation"):
        groupnorm.GroupNorm(4, 8, activation="tanh")
    with pytest.raises(
        ValueError,
        match=r"expected x with 8 channels \(dim 1\) for 4 groups "
        r"of 2, got shape \(2, 6, 3\)",
    ):
        groupnorm.GroupNorm(4, 8)(torch.randn(2, 6, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        groupnorm.GroupNorm(4, 8)([[1.0]])


def test_module_trains() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3),
        groupnorm.GroupNormAct(5, 12, uneven=True),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---- statistics API ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan_kw", [{"num_groups": 4}, {"num_groups": 5, "uneven": True}], ids=["even", "uneven"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiled_statistics_equal_whole(plan_kw: dict, dtype: torch.dtype) -> None:
    """What tiled VAE decoding does: stats per spatial tile, merged, then each tile normalized
    with the merged stats; stitched back, this equals normalizing the whole tensor."""
    x = make_x((2, 12, 20, 18), dtype, "channels_last", loc=30.0, std=0.5)
    w, b = rand((12,), dtype, 1), rand((12,), dtype, 2)
    tiles = [x[..., i : i + 7, j : j + 9] for i in range(0, 20, 7) for j in range(0, 18, 9)]
    merged = groupnorm.group_stats(tiles[0], **plan_kw)
    for t in tiles[1:]:
        merged = groupnorm.merge_stats(merged, groupnorm.group_stats(t, **plan_kw))
    whole = groupnorm.group_stats(x, **plan_kw)
    torch.testing.assert_close(merged.count, whole.count)
    plan = resolve_plan(12, **plan_kw)
    groups = [
        x.double()[:, a : a + n].reshape(2, -1)
        for a, n in zip(plan.offsets, plan.sizes, strict=False)
    ]
    mean = torch.stack([g.mean(1) for g in groups], 1)
    var = torch.stack([g.var(1, correction=0) for g in groups], 1)
    for stats in (merged, whole):
        assert_matches(stats.mean, to_numpy(mean), torch.float32, what="mean")
        assert_matches(stats.var, to_numpy(var), torch.float32, what="var")
    out = torch.empty_like(x)
    for i in range(0, 20, 7):
        for j in range(0, 18, 9):
            tile = x[..., i : i + 7, j : j + 9]
            out[..., i : i + 7, j : j + 9] = groupnorm.group_norm(
                tile, weight=w, bias=b, stats=merged, activation="silu", **plan_kw
            )
    expected, _ = reference(x, resolve_plan(12, **plan_kw), w, b, activation="silu")
    assert_matches(out, expected, dtype)


def _eps_of_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the eps of every torch.native_group_norm call from now on (eps = 0: statistics)."""
    seen: list[float] = []
    native = torch.native_group_norm

    def spy(*args: Any) -> Any:
        seen.append(args[-1])
        return native(*args)

    monkeypatch.setattr(torch, "native_group_norm", spy)
    return seen


def _stats_cases(cases: list[tuple[torch.dtype, str, float, float]]) -> Any:
    """Parametrize a test by (dtype, layout, loc, std)."""
    ids = [f"{str(d)[6:]}-{layout}-mean{loc:g}" for d, layout, loc, _ in cases]
    return pytest.mark.parametrize(("dtype", "layout", "loc", "std"), cases, ids=ids)


# At a mean of 1e4 spreads of 1e-2 only float32 is judged: float64's own rounding of such a
# mean (ulp 1.8e-12, times rstd 100) exceeds its 1e-12 bound in the reference itself.
STATS_CASES = [
    *[
        (d, layout, 0.5, 2.0)
        for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
        for layout in ("nchw", "channels_last")
    ],
    *[(torch.float32, layout, 1e4, 1e-2) for layout in ("nchw", "channels_last")],
]


@pytest.mark.usefixtures("without_fused_kernel")
@_stats_cases(STATS_CASES)
@pytest.mark.parametrize("spatial", [(6, 5), (9, 10)])
def test_statistics_in_and_out_match_float64(
    dtype: torch.dtype,
    layout: str,
    loc: float,
    std: float,
    spatial: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without autograd, statistics out come from torch's kernel (eps = 0) where its mean is
    trusted (float32 channels-last past 8^2 positions: from sums of x and x^2), and y from given
    statistics is one multiply-add on x itself (no shift); at a mean of 1e4 spreads of 1e-2
    both decline and the shifted path answers. Either way every statistic and y match
    float64."""
    x = make_x((2, 12, *spatial), dtype, layout, loc=loc, std=std)
    positions = spatial[0] * spatial[1]
    w, b = rand((12,), dtype, 1), rand((12,), dtype, 2)
    eps_seen = _eps_of_kernel_calls(monkeypatch)
    with torch.no_grad():
        stats = groupnorm.group_stats(x, 4)
        y_out, out_stats = groupnorm.group_norm(x, 4, w, b, activation="silu", return_stats=True)
        y_in = groupnorm.group_norm(x, 4, w, b, activation="silu", stats=stats)
    # float32 channels-last past 8^2 positions goes to the sums (torch's kernel there misses the
    # float32 bound).
    kernel = not (dtype == torch.float32 and layout == "channels_last" and positions > 64)
    assert (0.0 in eps_seen) == kernel  # the kernel was asked
    # Its statistics are kept as pivot = mean, shifted_mean = 0; the shifted path's pivot is an
    # element of the group.
    for got in (stats, out_stats):
        if kernel:
            assert bool((got.shifted_mean == 0).all()) == (loc < 100)
    expected, cache = reference(x, resolve_plan(12, 4), w, b, activation="silu")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for got in (stats, out_stats):
        assert_matches(got.mean, cache.mean, acc, what="mean")
        assert_matches(got.var, cache.var, acc, what="var")
        assert got.count.tolist() == [[3.0 * positions] * 4] * 2
    for y in (y_out, y_in):
        assert_matches(y, expected, dtype)
        assert y.stride() == x.stride()


UNEVEN_STATS_CASES = [
    *[(d, layout, 0.5, 2.0) for d in (torch.float64, torch.float32) for layout in LAYOUTS],
    *[(torch.float32, layout, 1e4, 1e-2) for layout in ("nchw", "channels_last")],
]


@pytest.mark.usefixtures("without_fused_kernel")
@_stats_cases(UNEVEN_STATS_CASES)
def test_uneven_statistics_in_and_out_match_float64(
    dtype: torch.dtype, layout: str, loc: float, std: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without autograd, an uneven plan's statistics out and ``group_stats`` come from sums of x
    and x^2 (|mean| * rstd = 0.25 here); at a mean of 1e4 spreads of 1e-2 they decline and the
    shifted path answers. Either way every statistic and y match float64, and the count is each
    group's size times the positions."""
    served: list[bool] = []
    from_sums = torch_ops._from_sums

    def spy(*args: Any) -> Any:
        got = from_sums(*args)
        served.append(got is not None)
        return got

    monkeypatch.setattr(torch_ops, "_from_sums", spy)
    x = make_x((2, 10, 6, 5), dtype, layout, loc=loc, std=std)
    w, b = rand((10,), dtype, 1), rand((10,), dtype, 2)
    plan_kw: dict[str, Any] = {"num_groups": 4, "uneven": True}  # 3, 3, 2, 2
    with torch.no_grad():
        stats = groupnorm.group_stats(x, **plan_kw)
        y_out, out_stats = groupnorm.group_norm(
            x, weight=w, bias=b, activation="silu", return_stats=True, **plan_kw
        )
        y_in = groupnorm.group_norm(x, weight=w, bias=b, activation="silu", stats=stats, **plan_kw)
    assert served[:2] == [loc < 100] * 2
    expected, cache = reference(x, resolve_plan(10, **plan_kw), w, b, activation="silu")
    for got in (stats, out_stats):
        assert_matches(got.mean, cache.mean, dtype, what="mean")
        assert_matches(got.var, cache.var, dtype, what="var")
        assert got.count.tolist() == [[90.0, 90.0, 60.0, 60.0]] * 2
    for y in (y_out, y_in):
        assert_matches(y, expected, dtype)
        assert y.stride() == torch.empty_like(x).stride()  # x's dense layout


@pytest.mark.usefixtures("without_fused_kernel")
@pytest.mark.parametrize("G", [32, 1])
def test_kernel_statistics_near_the_trust_limit(G: int) -> None:
    """|mean| * rstd = 1.9 (NATIVE_TRUST_FLOAT32 is 2), groups of 2K and 128K elements: the
    kernel's statistics are kept and hold the float32 bound unscaled by the group size."""
    gen = torch.Generator().manual_seed(5)
    x = (1.9 + torch.randn(2, 64, 32, 32, generator=gen, dtype=torch.float64)).float()
    with torch.no_grad():
        stats = groupnorm.group_stats(x, G)
    assert bool((stats.shifted_mean == 0).all())
    _, cache = reference(x, resolve_plan(64, G))
    assert_matches(stats.mean, cache.mean, torch.float32, what="mean")
    assert_matches(stats.var, cache.var, torch.float32, what="var")


@pytest.mark.usefixtures("without_fused_kernel")
def test_statistics_of_a_constant_group_take_the_shifted_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A constant group has rstd = inf from the kernel at eps = 0 (``group_stats``), and
    ``|mean| * rstd`` past the limit at eps > 0 (statistics out): its statistics are computed
    exactly instead (variance 0), and y there is beta."""
    x = make_x((2, 8, 4, 4), torch.float32)
    x[1, 2:4] = 3.0
    b = rand((8,), torch.float32, 2)
    eps_seen = _eps_of_kernel_calls(monkeypatch)
    with torch.no_grad():
        alone = groupnorm.group_stats(x, 4)
        y, stats = groupnorm.group_norm(x, 4, bias=b, return_stats=True)
    assert 0.0 in eps_seen
    expected, cache = reference(x, resolve_plan(8, 4), None, b)
    for got in (alone, stats):
        assert got.var[1, 1] == 0 and got.mean[1, 1] == 3.0
        assert_matches(got.var, cache.var, torch.float32, what="var")
    assert_matches(y, expected, torch.float32)
    torch.testing.assert_close(y[1, 2:4], b[2:4, None, None].expand(2, 4, 4))


def test_statistics_out_with_a_variance_below_eps_are_not_taken_from_rstd() -> None:
    """``var = rstd^-2 - eps`` cancels when var < eps: such statistics out are computed another
    way, and keep float32's relative accuracy (4e-8 here, against eps = 1e-5)."""
    x = make_x((2, 8, 4, 4), torch.float32)
    x[0, 4:6] = 1e-4 * make_x((2, 4, 4), torch.float32, seed=1)  # var 4e-8, |mean| * rstd 0.02
    with torch.no_grad():
        y, stats = groupnorm.group_norm(x, 4, return_stats=True)
    expected, cache = reference(x, resolve_plan(8, 4))
    torch.testing.assert_close(stats.var, torch.from_numpy(cache.var).float(), rtol=2e-6, atol=0)
    assert_matches(y, expected, torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_statistics_carry_forward_mode_tangents() -> None:
    """Statistics under forward-mode AD: their tangents match finite differences of the
    float64 reference."""
    import torch.autograd.forward_ad as fwAD

    x = make_x((2, 8, 4, 3), torch.float64, seed=2)
    t = make_x((2, 8, 4, 3), torch.float64, seed=3)
    with fwAD.dual_level():
        stats = groupnorm.group_stats(fwAD.make_dual(x, t), 4)
        tangents = [fwAD.unpack_dual(v).tangent for v in (stats.mean, stats.var)]
    h = 1e-6
    _, plus = reference(x + h * t, resolve_plan(8, 4))
    _, minus = reference(x - h * t, resolve_plan(8, 4))
    for got, hi, lo in zip(tangents, (plus.mean, plus.var), (minus.mean, minus.var), strict=True):
        assert got is not None
        torch.testing.assert_close(got, torch.from_numpy((hi - lo) / (2 * h)), rtol=1e-6, atol=1e-7)


def test_statistics_under_autograd_take_the_shifted_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's mean and rstd have no gradient, and the unshifted multiply-add's weight and
    statistics gradients would cancel: a recorded call computes them shifted."""
    x = make_x((2, 8, 4, 4), torch.float32).requires_grad_()
    w = rand((8,), torch.float32, 1).requires_grad_()
    eps_seen = _eps_of_kernel_calls(monkeypatch)
    y, stats = groupnorm.group_norm(x, 4, w, return_stats=True)
    y_in = groupnorm.group_norm(x, 4, w, stats=stats)
    assert eps_seen == []
    expected, _ = reference(x, resolve_plan(8, 4), w)
    assert_matches(y, expected, torch.float32)
    assert_matches(y_in, expected, torch.float32)
    y_in.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_stats_values_against_reference() -> None:
    x = make_x((3, 10, 4, 4), torch.float64)
    stats = groupnorm.group_stats(x, 4, uneven=True)
    _, cache = reference(x, resolve_plan(10, 4, uneven=True))
    torch.testing.assert_close(stats.mean, torch.from_numpy(cache.mean))
    torch.testing.assert_close(stats.var, torch.from_numpy(cache.var))
    assert stats.count[0].tolist() == [48.0, 48.0, 32.0, 32.0]
    _, returned = groupnorm.group_norm(x, 4, uneven=True, return_stats=True)
    torch.testing.assert_close(returned.var, stats.var)


def test_stats_errors() -> None:
    x = make_x((2, 8, 4, 4), torch.float32)
    stats = groupnorm.group_stats(x, 4)
    with pytest.raises(ValueError, match="computed for 4 groups of 2.*2 groups of 4"):
        groupnorm.group_norm(x, 2, stats=stats)
    with pytest.raises(ValueError, match=r"needs \(N, G\) = \(3, 4\)"):
        groupnorm.group_norm(make_x((3, 8, 4, 4), torch.float32), 4, stats=stats)
    with pytest.raises(ValueError, match="cannot merge"):
        groupnorm.merge_stats(stats, groupnorm.group_stats(x, 2))
    with pytest.raises(TypeError, match="GroupStats"):
        groupnorm.group_norm(x, 4, stats=(stats.mean, stats.var))  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="drop one"):
        groupnorm.group_norm(x, 4, stats=stats, return_stats=True)
    with pytest.raises(ValueError, match=r"stats are on meta but x is on cpu; use stats.to"):
        groupnorm.group_norm(x, 4, stats=stats.to("meta"))
    moved = stats.to("cpu")
    torch.testing.assert_close(moved.var, stats.var, rtol=0, atol=0)


# ---- warnings and bad input --------------------------------------------------------------------


def test_single_element_group_warns() -> None:
    x = torch.randn(2, 8)
    with pytest.warns(groupnorm.SingleElementGroupWarning, match="single element"):
        y = groupnorm.group_norm(x, 8, bias=torch.full((8,), 0.25))
    torch.testing.assert_close(y, torch.full_like(x, 0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groupnorm.group_norm(torch.randn(2, 8, 2), 8)
        groupnorm.group_norm(x, 4)


BAD_CALLS = {
    "wrong weight shape": (
        lambda: groupnorm.group_norm(torch.randn(2, 8, 3), 4, torch.ones(4)),
        ValueError,
        r"weight has shape \(4,\), expected \(8,\)",
    ),
    "wrong scale shape": (
        lambda: groupnorm.group_norm(torch.randn(2, 8, 3), 4, scale=torch.ones(8)),
        ValueError,
        r"scale has shape \(8,\), expected \(2, 8\)",
    ),
    "G not dividing C": (
        lambda: groupnorm.group_norm(torch.randn(2, 48, 3), 32),
        ValueError,
        "uneven=True",
    ),
    "group_size not dividing C": (
        lambda: groupnorm.group_norm(torch.randn(2, 48, 3), group_size=5),
        ValueError,
        "group_size=5 does not divide",
    ),
    "(N,) input": (
        lambda: groupnorm.group_norm(torch.randn(8), 2),
        ValueError,
        r"\(N, C, \*spatial\)",
    ),
    "integer dtype": (
        lambda: groupnorm.group_norm(torch.ones(2, 8, 3, dtype=torch.int64), 2),
        TypeError,
        "floating dtype",
    ),
    "empty C": (lambda: groupnorm.group_norm(torch.randn(2, 0, 3), 1), ValueError, "no channels"),
    "mismatched devices": (
        lambda: groupnorm.group_norm(torch.randn(2, 4, 3), 2, torch.ones(4, device="meta")),
        ValueError,
        "weight is on meta but x is on cpu",
    ),
    "integer weight": (
        lambda: groupnorm.group_norm(torch.randn(2, 4, 3), 2, torch.ones(4, dtype=torch.int32)),
        TypeError,
        "weight has dtype torch.int32",
    ),
    "unknown activation": (
        lambda: groupnorm.group_norm(torch.randn(2, 4, 3), 2, activation="tanh"),
        ValueError,
        "activation must be one of",
    ),
    "negative eps": (
        lambda: groupnorm.group_norm(torch.randn(2, 4, 3), 2, eps=-1.0),
        ValueError,
        "eps",
    ),
    "not a tensor": (
        lambda: groupnorm.group_norm([[1.0, 2.0]], 1),  # type: ignore[call-overload]
        TypeError,
        "torch.Tensor",
    ),
    "unknown backend": (
        lambda: groupnorm.group_norm(torch.randn(2, 4, 3), 2, backend="cuda9"),
        ValueError,
        r"unknown backend 'cuda9'; registered: \[.*'torch'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_a_clear_error(
    case: str, register: Callable[[dispatch.Backend], None]
) -> None:
    call, exc, match = BAD_CALLS[case]
    ran = []
    for backend in list(dispatch._REGISTRY.values()):

        def spy(
            r: dispatch.Request, _run: Callable[..., Any] = backend.run
        ) -> tuple[torch.Tensor, GroupStats | None]:
            ran.append(r)
            return _run(r)

        register(
            dispatch.Backend(
                backend.name, backend.priority, backend.why_not, spy, backend.available
            )
        )
    with pytest.raises(exc, match=match):
        call()
    assert not ran, "a backend ran before the error was raised"


def test_explicit_backend_that_cannot_serve_lists_alternatives(
    register: Callable[[dispatch.Backend], None],
) -> None:
    picky = dispatch.Backend(
        "picky",
        5,
        lambda r: "only float64" if r.x.dtype != torch.float64 else None,
        lambda r: (r.x, None),
    )
    register(picky)
    with pytest.raises(
        ValueError,
        match=r"backend 'picky' cannot run this call: only float64. "
        r"Backends that can: \[.*'torch'.*\]",
    ):
        groupnorm.group_norm(torch.randn(2, 4, 3), 2, backend="picky")
    assert (
        dispatch.select_backend(
            dispatch.Request(
                torch.randn(2, 4, 3),
                resolve_plan(4, 2),
                None,
                None,
                1e-5,
                None,
                None,
                None,
                None,
                False,
            )
        ).name
        == "torch"
    )
    x64 = torch.randn(2, 4, 3, dtype=torch.float64)
    assert groupnorm.group_norm(x64, 2, backend="auto") is x64  # picky has the higher priority


def test_available_backends_lists_torch() -> None:
    assert groupnorm.available_backends()["torch"] is None


def test_bias_false_without_torch_support(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch releases before 2.13 have no nn.GroupNorm(bias=); ours drops the bias itself."""
    from groupnorm import modules

    monkeypatch.setattr(modules, "_TORCH_HAS_BIAS_FLAG", False)
    m = groupnorm.GroupNorm(4, 8, bias=False)
    assert m.bias is None and list(m.state_dict()) == ["weight"]
    x = make_x((2, 8, 3), torch.float32)
    assert_matches(m(x), reference(x, resolve_plan(8, 4), m.weight)[0], torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager() -> None:
    """The torch backend under torch.compile: one graph (no break), no recompile on a second call
    with fresh data, same values and gradients as eager. Regression: plan construction with
    numpy and cached_property broke the graph."""
    m = groupnorm.GroupNormAct(5, 12, uneven=True)
    compiled = torch.compile(m, fullgraph=True)
    x = make_x((2, 12, 4, 4), torch.float32, "channels_last").requires_grad_()
    y = compiled(x)
    torch.testing.assert_close(y, m(x))
    (g_compiled,) = torch.autograd.grad(y.sum(), x)
    (g_eager,) = torch.autograd.grad(m(x).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        x2 = make_x((2, 12, 4, 4), torch.float32, "channels_last", seed=3).requires_grad_()
        torch.testing.assert_close(compiled(x2), m(x2))


def test_group_stats_goes_through_the_registry(
    register: Callable[[dispatch.Backend], None],
) -> None:
    """``group_stats`` asks the registry like ``group_norm``: the highest-priority backend's
    ``stats`` serves it, or its ``run`` with ``return_stats=True`` where it has no ``stats``."""
    from groupnorm.backends import torch_ops

    seen: list[dispatch.Request] = []

    def stats_only(r: dispatch.Request) -> GroupStats:
        seen.append(r)
        return torch_ops.compute_stats(r.x, r.plan)

    def run_only(r: dispatch.Request) -> tuple[torch.Tensor, GroupStats | None]:
        seen.append(r)
        return torch_ops.run(r)

    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(3))
    want = groupnorm.group_stats(x, 3, backend="torch")
    for fake in (
        dispatch.Backend("fake", 100, lambda r: None, run_only),
        dispatch.Backend("fake", 100, lambda r: None, run_only, stats=stats_only),
    ):
        seen.clear()
        register(fake)
        got = groupnorm.group_stats(x, 3)
        assert len(seen) == 1 and seen[0].return_stats and seen[0].plan.num_groups == 3
        # The same statistics; the pivot may differ (torch's kernel or a group's element).
        torch.testing.assert_close(got.mean, want.mean)
        torch.testing.assert_close(got.var, want.var)
        assert torch.equal(got.count, want.count)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"uneven": True, "activation": "silu"}, {"scale": True}, {"return_stats": True}],
    ids=["plain", "uneven-silu", "scale-shift", "stats-out"],
)
def test_regression_an_empty_spatial_dimension_gives_an_empty_output(
    layout: str, kw: dict[str, Any]
) -> None:
    """x of shape (2, 8, 0, 5) raised, where nn.GroupNorm returns an empty output. Now the
    output is empty, weight and bias get zero gradients (sums over no element; torch's are
    NaN), statistics have count 0, and the module and group_stats agree."""
    x = make_x((2, 8, 3, 5), torch.float32, layout)[:, :, :0].requires_grad_()
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    extra: dict[str, Any] = dict(kw)
    if extra.pop("scale", False):
        extra.update(scale=torch.randn(2, 8), shift=torch.randn(2, 8))
    out = groupnorm.group_norm(x, 3 if kw.get("uneven") else 4, w, b, **extra)
    y = out[0] if kw.get("return_stats") else out
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert w.grad is not None and b.grad is not None
    assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))
    if kw.get("return_stats"):
        assert torch.equal(out[1].count, torch.zeros(2, 4))
    assert groupnorm.GroupNorm(4, 8)(x).shape == x.shape
    assert torch.equal(groupnorm.group_stats(x.detach(), 4).count, torch.zeros(2, 4))


@pytest.mark.parametrize("outlier_first", [True, False])
def test_regression_merged_statistics_do_not_keep_an_outlier_pivot(outlier_first: bool) -> None:
    """merge_stats kept the first part's pivot, its first element: an outlier there (10 units
    off data at 1e4 with std 1e-2) left the merged mean stored as a float32 shifted mean near
    -10, whose rounding put the normalized tiles at 7.7x the float32 bound."""
    x = make_x((1, 4, 64, 32), torch.float32, seed=47, loc=1e4, std=1e-2)
    x[0, 0, 0, 0] = 1e4 + 10
    top, rest = x[:, :, :1], x[:, :, 1:]
    parts = [groupnorm.group_stats(t, 1) for t in (top, rest)]
    if not outlier_first:
        parts.reverse()
    merged = groupnorm.merge_stats(*parts)
    y = torch.cat([groupnorm.group_norm(t, 1, stats=merged) for t in (top, rest)], dim=2)
    xd = x.double().reshape(1, -1)
    mean = xd.mean(1, keepdim=True)
    xhat = (xd - mean) / torch.sqrt(((xd - mean) ** 2).mean(1, keepdim=True) + 1e-5)
    assert_matches(y, to_numpy(xhat.reshape(x.shape)), torch.float32)


@pytest.mark.parametrize("masked", [False, True])
def test_regression_merged_float64_statistics_keep_the_mean_below_its_last_bit(
    masked: bool,
) -> None:
    """merge_stats took the merged float64 mean as one float64 number and the rest as mean -
    pivot, 0 for float64 statistics: the low part the statistics held was lost, and tiles
    normalized with them were 77x the float64 bound at mean 1e4, std 1e-2."""
    x = make_x((2, 8, 4, 6), torch.float64, seed=48, loc=1e4, std=1e-2)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    halves = [(..., slice(0, 3)), (..., slice(3, 6))]
    parts = [groupnorm.group_stats(x[h], 4, mask=mask[h] if masked else None) for h in halves]
    y = groupnorm.group_norm(x, 4, stats=groupnorm.merge_stats(*parts))
    rows = x.reshape(2, 4, -1)
    deviations = rows - rows[:, :, :1]  # exact: the elements are within a factor 2 of each other
    centered = deviations - deviations.mean(-1, keepdim=True)
    xhat = centered / torch.sqrt((centered**2).mean(-1, keepdim=True) + 1e-5)
    assert_matches(y, to_numpy(xhat.reshape(x.shape)), torch.float64)


def test_regression_statistics_load_with_weights_only_and_compare_by_identity() -> None:
    """safe_globals() left GroupStats out (torch.load(weights_only=True) refused saved
    statistics), and == between two GroupStats raised on their tensor fields."""
    stats = groupnorm.group_stats(make_x((2, 8, 4, 4), torch.float32), 4)
    buffer = io.BytesIO()
    torch.save(stats, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(groupnorm.safe_globals()):
        loaded = torch.load(buffer, weights_only=True)
    assert loaded.plan == stats.plan and torch.equal(loaded.m2, stats.m2)
    assert stats == stats and stats != loaded and stats in [stats]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_regression_an_affine_free_module_normalizes_any_channel_count_its_groups_divide(
    layout: str,
) -> None:
    """nn.GroupNorm(4, 8, affine=False) normalizes a 12-channel input in 4 groups (without
    parameters it never reads num_channels); ours refused it. A count 4 does not divide is
    still an error, and a module with parameters still checks its channel count."""
    x = make_x((2, 12, 5, 5), torch.float32, layout, seed=3, loc=2.0, std=1.5)
    y = groupnorm.GroupNorm(4, 8, affine=False)(x)
    expected, _ = reference(x, resolve_plan(12, 4))
    assert_matches(y, expected, torch.float32, reduction=3 * 25)
    with pytest.raises(ValueError, match="num_groups=4 does not divide num_channels=10"):
        groupnorm.GroupNorm(4, 8, affine=False)(make_x((2, 10, 3, 3), torch.float32, layout))
    with pytest.raises(ValueError, match="8 channels"):
        groupnorm.GroupNorm(4, 8)(x)


def test_regression_unhashable_activation_and_backend_get_a_clear_error() -> None:
    """A list or dict as activation or backend raised "unhashable type" from a dictionary lookup,
    which says neither which argument was wrong nor what it takes."""
    x = torch.randn(2, 4, 3, 3)
    for call in (
        lambda: groupnorm.group_norm(x, 2, activation=["silu"]),  # type: ignore[call-overload]
        lambda: groupnorm.GroupNorm(2, 4, activation={}),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=r"activation must be one of \[None, 'silu'"):
            call()
    module = groupnorm.GroupNorm(2, 4)
    module.backend = ["torch"]  # type: ignore[assignment]
    for call in (
        lambda: groupnorm.group_norm(x, 2, backend=["torch"]),  # type: ignore[call-overload]
        lambda: groupnorm.group_stats(x, 2, backend={}),  # type: ignore[arg-type]
        lambda: module(x),
    ):
        with pytest.raises(ValueError, match="unknown backend .*; registered: "):
            call()


def test_regression_sparse_and_nested_input_get_a_clear_error() -> None:
    """A sparse or nested x failed deep inside: "can't convert Sparse layout tensor to numpy",
    "NestedTensorImpl doesn't support sizes"."""
    x = torch.randn(2, 4, 3, 3)
    nested = torch.nested.nested_tensor(
        [torch.randn(4, 3, 3), torch.randn(4, 2, 3)], layout=torch.jagged
    )
    module = groupnorm.GroupNorm(2, 4)
    calls = (
        lambda t: groupnorm.group_norm(t, 2),
        lambda t: groupnorm.group_stats(t, 2),
        module,
    )
    for bad, what in ((x.to_sparse(), "layout torch.sparse_coo"), (nested, "a nested tensor")):
        for call in calls:
            with pytest.raises(TypeError, match=f"x must be a dense tensor .*, got {what}"):
                call(bad)


def test_regression_statistics_values_are_checked_where_they_are_used() -> None:
    """rstd(-1) gave NaN; merge_stats merged negative counts and m2 into statistics that
    normalize without an error; statistics held as nn.Parameter skipped the value check that
    plain tensors get (a negative count gave ``bias``)."""
    x = make_x((2, 8, 3, 3), torch.float32)
    stats = groupnorm.group_stats(x, 4)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            stats.rstd(eps)
    with pytest.raises(TypeError, match="eps must be a real number"):
        stats.rstd(True)
    exact = 1 / torch.sqrt(stats.var.double() + 1e-3)
    torch.testing.assert_close(stats.rstd(torch.tensor(1e-3)).double(), exact)  # type: ignore[arg-type]

    def replaced(field: str, value: float, as_parameter: bool = False) -> GroupStats:
        fields = {f: getattr(stats, f) for f in ("pivot", "shifted_mean", "m2", "count")}
        fields[field] = fields[field].clone()
        fields[field][1, 2] = value
        if as_parameter:
            fields = {f: nn.Parameter(t, requires_grad=False) for f, t in fields.items()}
        return GroupStats(**fields, plan=stats.plan)

    for field, value, match in (
        ("m2", -1.0, r"a\.m2 has negative"),
        ("count", -2.0, "a.count"),
        ("count", float("nan"), "a.count"),
        ("count", float("inf"), r"a\.count has entries that are not finite numbers >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            groupnorm.merge_stats(replaced(field, value), stats)
    with pytest.raises(ValueError, match=r"b\.m2 has negative"):
        groupnorm.merge_stats(stats, replaced("m2", -float("inf")))
    # An empty part adds nothing in either order, whatever its m2 holds.
    empty = replaced("count", 0.0)
    empty = GroupStats(
        empty.pivot, empty.shifted_mean, empty.m2 * torch.nan, empty.count, plan=stats.plan
    )
    for merged in (groupnorm.merge_stats(stats, empty), groupnorm.merge_stats(empty, stats)):
        assert torch.equal(merged.m2[1, 2], stats.m2[1, 2])
    for field, value, match in (
        ("count", -1.0, "count has entries that are not finite numbers >= 0"),
        ("count", float("inf"), "count"),
        ("m2", -1.0, "m2"),
    ):
        with pytest.raises(ValueError, match=match):
            groupnorm.group_norm(x, 4, stats=replaced(field, value, as_parameter=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_regression_given_statistics_counts_read_twice(dtype: torch.dtype) -> None:
    """group_norm(x, stats=) read the counts twice, in the value check and again to route a
    count-0 group to the masked formula, and m2 apart (three host reads, each a sync on a
    device): 46.1-47.8 us per call on (2, 32, 8, 8), one CPU thread, 38.2-39.8 us read once.
    check_stats_values now returns whether a count is 0, read with the rest; the routing
    takes that. The count-0 group still normalizes to x_hat = 0 (its output is bias), the rest
    as without, and bad values are still refused, a NaN beside them included."""
    from groupnorm.stats import check_stats_values

    x = make_x((2, 8, 3, 3), dtype)
    plan = resolve_plan(8, 4)
    w, b = rand((8,), dtype, 1), rand((8,), dtype, 2)
    stats = groupnorm.group_stats(x, 4)

    def replaced(**values: float) -> GroupStats:
        fields = {f: getattr(stats, f).clone() for f in ("pivot", "shifted_mean", "m2", "count")}
        for field, value in values.items():
            fields[field][1, 2] = value
        return GroupStats(**fields, plan=plan)

    assert check_stats_values(stats, empty=True) is False
    empty = replaced(count=0.0)
    assert check_stats_values(empty, empty=True) is True
    expected, _ = reference(x, plan, w, b)
    expected[1, 4:6] = b[4:6].double().numpy()[:, None, None]  # group 2 of sample 1: x_hat = 0
    assert_matches(groupnorm.group_norm(x, 4, w, b, stats=empty), expected, dtype)
    for values, match in (
        ({"count": -1.0}, "count has entries that are not finite numbers >= 0"),
        ({"count": float("nan")}, "count has entries"),
        ({"count": float("inf")}, "count has entries"),
        ({"m2": -1.0}, "m2 has negative entries"),
    ):
        bad = replaced(**values)
        with pytest.raises(ValueError, match=match):
            check_stats_values(bad, empty=True)
        with pytest.raises(ValueError, match=match):
            groupnorm.group_norm(x, 4, w, b, stats=bad)
    nan_beside = replaced(m2=-1.0)
    nan_beside.m2[0, 0] = torch.nan  # a NaN m2 passes, and must not hide a negative one
    with pytest.raises(ValueError, match="m2 has negative entries"):
        groupnorm.group_norm(x, 4, w, b, stats=nan_beside)


def test_regression_zero_dim_integer_tensors_count_as_torch_takes_them() -> None:
    """F.group_norm takes num_groups and eps as 0-d integer tensors; ours refused both."""
    x = make_x((2, 8, 3, 3), torch.float64)
    y = groupnorm.group_norm(x, torch.tensor(4), eps=torch.tensor(1))  # type: ignore[call-overload]
    assert_matches(y, reference(x, resolve_plan(8, 4), eps=1.0)[0], torch.float64)
    module = groupnorm.GroupNorm(torch.tensor(2), 8)  # type: ignore[arg-type]
    assert type(module.num_groups) is int and module.num_groups == 2
    for bad in (torch.tensor(True), torch.tensor(2.0), torch.tensor([2])):
        with pytest.raises(TypeError, match="num_groups must be a positive integer"):
            groupnorm.group_norm(x, bad)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="eps as a tensor must be a 0-d real number"):
        groupnorm.group_norm(x, 4, eps=torch.tensor(True))  # type: ignore[call-overload]


def test_regression_group_counts_of_the_wrong_type_raised_value_error() -> None:
    """num_groups="4", 4.0, True, a float or 1-d tensor or a list raised ValueError from
    group_norm, group_stats, GroupNorm, resolve_plan, make_plan and choose_num_groups (torch
    raises TypeError for F.group_norm(x, "4")); so did num_channels=None where a count is
    needed, and resolve_plan took num_channels=torch.tensor(8.0) or torch.tensor([8]). A wrong
    type is now a TypeError naming what was given; a count below 1 stays a ValueError."""
    from groupnorm.groups import make_plan

    x = make_x((2, 8, 3, 3), torch.float32)
    calls: dict[str, Callable[[Any], object]] = {
        "group_norm": lambda g: groupnorm.group_norm(x, g),
        "group_stats": lambda g: groupnorm.group_stats(x, g),
        "GroupNorm": lambda g: groupnorm.GroupNorm(g, 8),
        "GroupNorm keyword": lambda g: groupnorm.GroupNorm(8, num_groups=g),
        "GroupNormAct": lambda g: groupnorm.GroupNormAct(g, 8),
        "resolve_plan": lambda g: resolve_plan(8, g),
        "make_plan": lambda g: make_plan(8, g),
        "choose_num_groups": lambda g: groupnorm.choose_num_groups(8, g),
    }
    for bad in ("4", 4.0, True, torch.tensor(4.0), torch.tensor([4]), [4]):
        for name, call in calls.items():
            kind = type(bad).__name__
            with pytest.raises(TypeError, match=rf"(num_groups|target) .*got .* \({kind}\)"):
                call(bad)
                pytest.fail(f"{name} took {bad!r}")
    for channels in (None, "8", 8.0, torch.tensor(8.0), torch.tensor([8])):
        kind = type(channels).__name__
        for call in (
            lambda c: resolve_plan(c, 4),
            lambda c: make_plan(c, 4),
            lambda c: groupnorm.choose_num_groups(c),
        ):
            with pytest.raises(TypeError, match=rf"num_channels .*got .* \({kind}\)"):
                call(channels)
    with pytest.raises(TypeError, match="num_channels is required"):
        groupnorm.GroupNorm(num_groups=4)
    for call in calls.values():
        with pytest.raises(ValueError, match="must be a positive integer, got 0"):
            call(0)
    traced_sizes: Any = (torch.tensor(8), torch.tensor(4))  # as torch.jit.trace gives them
    assert resolve_plan(*traced_sizes).sizes == (2,) * 4


def test_regression_choose_num_groups_takes_the_0d_integer_tensors_group_norm_takes() -> None:
    """group_norm and GroupNorm take a 0-d integer tensor as a count, as F.group_norm does;
    choose_num_groups, make_plan and the other counts checked by groups.positive_int refused
    one with a TypeError. Bool, floating and 1-d tensors and NumPy arrays (which group_norm and
    F.group_norm refuse too) stay refused."""
    from groupnorm.groups import make_plan

    c: Any = torch.tensor(64)
    g: Any = torch.tensor(16)
    assert groupnorm.choose_num_groups(c) == groupnorm.choose_num_groups(64)
    assert groupnorm.choose_num_groups(c, g).num_groups == 16
    assert make_plan(c, g).sizes == (4,) * 16
    assert groupnorm.choose_num_groups(64, min_channels_per_group=g).num_groups == 4
    bad: Any
    for bad in (torch.tensor(True), torch.tensor(64.0), torch.tensor([64]), np.array(64)):
        kind = type(bad).__name__
        with pytest.raises(TypeError, match=rf"num_channels .*0-d integer tensor.*\({kind}\)"):
            groupnorm.choose_num_groups(bad)
        with pytest.raises(TypeError, match=rf"num_groups .*\({kind}\)"):
            groupnorm.group_norm(torch.randn(2, 64, 3), bad)


def test_regression_the_default_of_32_groups_is_named_when_it_does_not_fit() -> None:
    """GroupNorm(4, None) said "num_groups=32 is larger than num_channels=4", a 32 the caller
    never wrote (a lone positional argument is the channel count, groups default to 32)."""
    for args in ((4, None), (4,), (48,)):
        with pytest.raises(ValueError, match=r"no num_groups, .* so 32 groups \(timm's default\)"):
            groupnorm.GroupNorm(*args)
    with pytest.raises(ValueError, match="num_groups=32 is larger than num_channels=4") as info:
        groupnorm.GroupNorm(32, 4)
    assert "default" not in str(info.value)


@pytest.mark.parametrize("shape", [(2, 8), (2, 8, 3, 3)])
def test_regression_a_list_weight_gets_the_type_error_on_the_fast_path(
    shape: tuple[int, ...],
) -> None:
    """The common call's fast path read weight.requires_grad before the parameters were
    checked: a list or ndarray weight raised AttributeError where a TypeError says what fits."""
    x = make_x(shape, torch.float32)
    for bad in ([1.0] * 8, np.ones(8)):
        for kw in ({"weight": bad}, {"weight": torch.ones(8), "bias": bad}):
            with pytest.raises(TypeError, match="must be a torch.Tensor or None, got"):
                groupnorm.group_norm(x, 2, **kw)  # type: ignore[call-overload]


def test_regression_sparse_parameters_are_refused_by_name() -> None:
    """A sparse weight, bias or scale passed every check, then is_contiguous() raised inside."""
    x = make_x((2, 8, 3, 3), torch.float32)
    for name, t in (
        ("weight", torch.ones(8)),
        ("bias", torch.ones(8)),
        ("scale", torch.ones(2, 8)),
    ):
        with pytest.raises(TypeError, match=f"{name} must be a dense tensor, got layout"):
            groupnorm.group_norm(x, 2, **{name: t.to_sparse()})  # type: ignore[call-overload]


def test_regression_sparse_statistics_fields_are_refused_by_name() -> None:
    """GroupStats took sparse fields, and group_norm(stats=) and merge_stats then failed deep
    inside with NotImplementedError."""
    stats = groupnorm.group_stats(make_x((2, 8, 3, 3), torch.float32), 4)
    fields = {f: getattr(stats, f) for f in ("pivot", "shifted_mean", "m2", "count")}
    for name, t in fields.items():
        with pytest.raises(
            TypeError, match=f"GroupStats.{name} must be a dense tensor .*layout torch.sparse_coo"
        ):
            GroupStats(**{**fields, name: t.to_sparse()}, plan=stats.plan)


def test_regression_changed_attributes_follow_nn_group_norm() -> None:
    """nn.GroupNorm's forward is F.group_norm(x, num_groups, weight, bias): without affine
    parameters a changed num_groups normalizes any channel count it divides, and num_channels
    is never read. Ours re-planned from num_channels and raised."""
    for channels in (6, 9):
        x = make_x((2, channels, 3, 3), torch.float32)
        theirs, ours = nn.GroupNorm(2, 8, affine=False), groupnorm.GroupNorm(2, 8, affine=False)
        theirs.num_groups = ours.num_groups = 3
        assert_matches(ours(x), to_numpy(theirs(x.double())), torch.float32)
    x = make_x((2, 8, 3, 3), torch.float32)
    theirs, ours = nn.GroupNorm(2, 8).double(), groupnorm.GroupNorm(2, 8)
    theirs.num_channels = ours.num_channels = 16
    assert_matches(ours(x), to_numpy(theirs(x.double())), torch.float32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        groupnorm.GroupNorm(2, 8, affine=False)([1, 2])  # type: ignore[arg-type]
    edited = groupnorm.GroupNorm(4, 8)
    edited.num_groups = 2
    traced = torch.fx.symbolic_trace(nn.Sequential(edited))  # the parameters are Proxies there
    expected = nn.functional.group_norm(x.double(), 2, edited.weight.double(), edited.bias.double())
    assert_matches(traced(x), to_numpy(expected), torch.float32)


def _split_group_norm64(
    x: torch.Tensor, sizes: list[int], weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """float64 group norm over explicit group sizes: each group normalized alone by torch."""
    parts = [nn.functional.group_norm(p, 1) for p in x.double().split(sizes, dim=1)]
    y = torch.cat(parts, dim=1)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y


def test_regression_edited_attributes_keep_the_constructors_group_sizes() -> None:
    """GroupNorm(num_channels=8, group_sizes=[2, 6]) with num_channels then set to 9 (which
    nn.GroupNorm never reads) re-planned as 4 groups of 4: 0.74 off its own output before the
    edit. num_groups set 3 -> 2 -> 3 on group_sizes=[4, 3, 3] raised "3 does not divide 10"."""
    x = make_x((2, 8, 4), torch.float32)
    for affine in (True, False):
        m = groupnorm.GroupNorm(num_channels=8, group_sizes=[2, 6], affine=affine)
        m.num_channels = 9
        assert_matches(m(x), to_numpy(_split_group_norm64(x, [2, 6], m.weight, m.bias)), x.dtype)
        assert m.plan.sizes == (2, 6) and "group_sizes=[2, 6]" in repr(m)
    x = make_x((2, 10, 3), torch.float32)
    m = groupnorm.GroupNorm(num_channels=10, group_sizes=[4, 3, 3])
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    m.num_groups = 2
    expected = nn.functional.group_norm(x.double(), 2, m.weight.double(), m.bias.double())
    assert_matches(m(x), to_numpy(expected), x.dtype)
    m.num_groups = 3
    assert_matches(m(x), to_numpy(_split_group_norm64(x, [4, 3, 3], m.weight, m.bias)), x.dtype)
    # Parameters of another length: the sizes no longer fit, the module re-plans as before.
    m.weight = nn.Parameter(torch.ones(12))
    m.bias = nn.Parameter(torch.zeros(12))
    assert m(make_x((2, 12, 3), torch.float32)).shape == (2, 12, 3) and m.plan.is_even


def test_regression_group_size_with_uneven_plans_as_the_converter_does() -> None:
    """GroupNorm(num_channels=8, group_size=3, uneven=True) and group_norm(x, group_size=3,
    uneven=True) ignored uneven and raised "... or uneven=True for groups that differ by at most
    one channel", the flag passed, while convert_batchnorm(group_size=5, policy="uneven")
    planned 48 channels as 8x5 + 2x4."""
    x = make_x((2, 8, 5), torch.float32)
    m = groupnorm.GroupNorm(num_channels=8, group_size=3, uneven=True)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    expected = to_numpy(_split_group_norm64(x, [3, 3, 2], m.weight, m.bias))
    assert_matches(m(x), expected, x.dtype)
    y = groupnorm.group_norm(x, group_size=3, uneven=True, weight=m.weight, bias=m.bias)
    assert_matches(y, expected, x.dtype)
    assert m.num_groups == 3 and "group_sizes=[3, 3, 2]" in repr(m)
    converted, report = groupnorm.convert_batchnorm(
        nn.Sequential(nn.BatchNorm2d(48)), group_size=5, policy="uneven"
    )
    assert report.replaced[0].plan == resolve_plan(48, group_size=5, uneven=True)
    assert converted[0].plan.sizes == (5,) * 8 + (4,) * 2
    with pytest.raises(ValueError, match="or uneven=True for 3 groups that differ"):
        groupnorm.GroupNorm(num_channels=8, group_size=3)


def test_an_edited_module_plans_once() -> None:
    """The plan is kept for the attributes it was made for: an affine-free module whose
    num_groups changed, given channel counts other than num_channels, re-planned every call."""
    m = groupnorm.GroupNorm(2, 8, affine=False)
    m.num_groups = 3
    m(make_x((2, 6, 3, 3), torch.float32))
    plan = m.plan
    for channels in (9, 6, 3):
        m(make_x((2, channels, 3, 3), torch.float32))
    assert m.plan is plan


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_regression_affine_parameters_replaced_by_another_length_are_planned_for() -> None:
    """nn.GroupNorm normalizes with whatever weight and bias it holds: replaced by parameters
    of 48 channels, it takes x of 48 channels. Ours kept its plan for 64 and refused x."""
    x = make_x((2, 48, 3, 3), torch.float32)
    for keep_bias in (True, False):
        ours = groupnorm.GroupNorm(8, 64)
        ours.weight = nn.Parameter(torch.rand(48) + 0.5)
        ours.bias = nn.Parameter(torch.randn(48)) if keep_bias else None  # type: ignore[assignment]
        bias = ours.bias.double() if ours.bias is not None else None
        expected = to_numpy(nn.functional.group_norm(x.double(), 8, ours.weight.double(), bias))
        for layout in (torch.contiguous_format, torch.channels_last):
            assert_matches(ours(x.to(memory_format=layout)), expected, torch.float32)
        assert_matches(torch.jit.script(ours)(x), expected, torch.float32)
        assert ours.plan.num_channels == 48
    # torch.fx before any eager call: its trace hands Proxies for the parameters, and recorded
    # the old plan (the graph refused x of 48 channels).
    traced = groupnorm.GroupNorm(8, 64)
    traced.weight = nn.Parameter(torch.rand(48) + 0.5)
    traced.bias = nn.Parameter(torch.randn(48))
    graph = torch.fx.symbolic_trace(nn.Sequential(traced))
    expected = to_numpy(
        nn.functional.group_norm(x.double(), 8, traced.weight.double(), traced.bias.double())
    )
    assert_matches(graph(x), expected, torch.float32)


def test_regression_a_module_pickled_before_it_kept_group_sizes_can_be_edited() -> None:
    """A GroupNorm saved whole by an earlier version has no _group_sizes attribute (kept since
    for re-planning): editing its num_groups raised AttributeError, and so did its repr."""
    old = pickle.loads(pickle.dumps(groupnorm.GroupNorm(4, 8)))
    del old._group_sizes  # as unpickled from that version
    old.num_groups = 2
    x = make_x((2, 8, 3, 3), torch.float32)
    expected = nn.functional.group_norm(x.double(), 2, old.weight.double(), old.bias.double())
    assert_matches(old(x), to_numpy(expected), torch.float32)
    assert repr(old).startswith("GroupNorm(2, 8")


def test_regression_choose_num_groups_refuses_what_no_plan_holds() -> None:
    """Trial division up to sqrt(C) took seconds at 1e16 channels and hours at 1e20, and
    recommended plans make_plan refuses."""
    with pytest.raises(ValueError, match="more than a plan holds"):
        groupnorm.choose_num_groups(2**40)
    assert "1 channel cannot" in groupnorm.choose_num_groups(1).reason


def test_regression_a_first_argument_given_twice_is_named_for_what_it_is() -> None:
    """GroupNormAct(4, 8, num_groups=2) said "GroupNorm got a positional 4 besides num_groups=
    and num_channels=", where num_channels was positional and the class another."""
    with pytest.raises(
        TypeError,
        match=r"GroupNormAct got 4 as its first argument besides "
        r"num_groups=2 and num_channels=8",
    ):
        groupnorm.GroupNormAct(4, 8, num_groups=2)  # type: ignore[misc]


def test_regression_group_stats_to_takes_a_device() -> None:
    """GroupStats.to(torch.float64) converted the fields to a dtype the statistics of that x
    never have; a float gave a bare error from inside."""
    stats = groupnorm.group_stats(make_x((2, 4, 3), torch.float32), 2)
    assert stats.to("cpu").m2.device.type == "cpu"
    for bad in (torch.float64, 3.5):
        with pytest.raises(TypeError, match="GroupStats.to takes a device"):
            stats.to(bad)  # type: ignore[arg-type]
