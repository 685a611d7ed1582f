"""The Triton kernels against the float64 reference: every regime, layout, dtype, group plan
and epilogue, forward and backward. Without CUDA they run in Triton's interpreter on CPU, on tiny
shapes (it is slow); see tests/_triton_interpreted.py for how TRITON_INTERPRET is handled."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import groupnorm
from groupnorm import reference as ref
from groupnorm.groups import GroupPlan, make_plan
from groupnorm.stats import GroupStats
from groupnorm.triton import backend as triton_backend
from tests._tolerances import ATOL, assert_matches, to_numpy
from tests._triton_interpreted import INTERPRET, count_traffic, kernels

group_norm_triton = kernels.group_norm_triton


# Under Triton's interpreter every kernel test takes seconds: the matrix runs in CI, not in the
# quick loop (./dev test -m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The triton backend serves CPU tensors only while TRITON_INTERPRET=1."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
REGIMES = ["onchip", "fused", "split", "wave"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(
    shape: tuple[int, ...],
    seed: int,
    *,
    loc: float = 0.5,
    std: float = 2.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fresh random values (never zeros), made on CPU then moved to the test device."""
    return (torch.randn(shape, generator=_gen(seed)) * std + loc).to(dtype).to(DEVICE)


# name -> builder of x (N, C, *S) with C = 6 in the layout the name says.
LAYOUTS = {
    "nchw": lambda dt: _rand((2, 6, 5, 7), 1, dtype=dt),
    "nhwc": lambda dt: _rand((2, 6, 4, 5), 2, dtype=dt).to(memory_format=torch.channels_last),
    "ndhwc": lambda dt: _rand((2, 6, 2, 3, 4), 3, dtype=dt).to(
        memory_format=torch.channels_last_3d
    ),
    "ncl-channel-stride-1": lambda dt: _rand((2, 9, 6), 4, dtype=dt).transpose(1, 2),
    "nc-no-spatial": lambda dt: _rand((3, 6), 5, dtype=dt),
    "batch-slice-view": lambda dt: _rand((4, 6, 5, 3), 6, dtype=dt)[::2],
    "hw-transposed-view-copied": lambda dt: _rand((2, 6, 5, 4), 7, dtype=dt).transpose(2, 3),
}


def _reference(
    x: torch.Tensor,
    plan: GroupPlan,
    weight=None,
    bias=None,
    eps=1e-5,
    *,
    activation=None,
    scale=None,
    shift=None,
):
    def np_or_none(t):
        return None if t is None else to_numpy(t)

    return ref.group_norm_forward(
        to_numpy(x),
        gamma=np_or_none(weight),
        beta=np_or_none(bias),
        eps=eps,
        plan=plan,
        activation=activation,
        scale=np_or_none(scale),
        shift=np_or_none(shift),
    )


def _interpreter_bf16(expected: np.ndarray) -> torch.Tensor:
    """``expected`` as Triton's interpreter stores it in bfloat16: rounded toward zero (it drops
    the low 16 bits of the float32 value; a GPU rounds to nearest even)."""
    f32 = torch.from_numpy(expected).float()
    return (f32.view(torch.int32) & -65536).view(torch.float32)


def check(actual, expected, dtype, **kw):
    """The tolerance table; under the interpreter, bfloat16 results are judged against the
    exact result as the interpreter rounds it (toward zero) instead of rounded to nearest."""
    if INTERPRET and dtype == torch.bfloat16 and "baseline" not in kw:
        kw["baseline"] = _interpreter_bf16(expected)
    assert_matches(actual, expected, dtype, **kw)


def _run(x, plan, weight=None, bias=None, *, regime, **kw):
    y, stats = group_norm_triton(x, plan, weight, bias, regime=regime, **kw)
    return y, stats


# ---------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_layouts(layout, dtype, regime):
    x = LAYOUTS[layout](dtype)
    plan = make_plan(6, 3)
    w, b = _rand((6,), 10, loc=1.0, std=0.5, dtype=dtype), _rand((6,), 11, dtype=dtype)
    y, _ = _run(x, plan, w, b, regime=regime)
    expected, _ = _reference(x, plan, w, b)
    check(y, expected, dtype, what=f"y ({layout}, {regime})")
    if layout != "hw-transposed-view-copied":
        assert y.stride() == torch.empty_like(x).stride(), "y must keep x's memory format"


PLANS = {
    "even-G2": lambda: make_plan(12, 2),
    "uneven-G5": lambda: make_plan(12, 5, uneven=True),
    "group_size-4": lambda: make_plan(12, group_size=4),
    "explicit-sizes-7-1-4": lambda: GroupPlan((7, 1, 4)),
    "G1-layernorm": lambda: make_plan(12, 1),
    "G=C-instancenorm": lambda: make_plan(12, 12),
    "odd-C/G-3": lambda: make_plan(12, 4),
}


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("plan_kind", list(PLANS))
def test_forward_group_plans(plan_kind, channels_last, regime):
    plan = PLANS[plan_kind]()
    x = _rand((2, 12, 3, 5), 20)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = _rand((12,), 21), _rand((12,), 22)
    y, stats = _run(x, plan, w, b, regime=regime, return_stats=True)
    expected, cache = _reference(x, plan, w, b)
    check(y, expected, torch.float32, what=f"y ({plan.describe()})")
    check(stats.mean, cache.mean, torch.float32, what="mean")
    check(stats.var, cache.var, torch.float32, what="var")
    counts = np.broadcast_to(np.asarray(plan.sizes, np.float64) * 15, (2, plan.num_groups))
    check(stats.count, counts, torch.float32, what="count")


EPILOGUES = {
    "silu": ("silu", False, False),
    "gelu-erf": ("gelu", False, False),
    "relu": ("relu", False, False),
    "scale-shift": (None, True, True),
    "scale-only": (None, True, False),
    "shift-only-silu": ("silu", False, True),
    "scale-shift-gelu": ("gelu", True, True),
}


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_forward_epilogues(epilogue, dtype, regime):
    activation, has_scale, has_shift = EPILOGUES[epilogue]
    plan = make_plan(10, 4, uneven=True)
    x = _rand((2, 10, 4, 6), 30, dtype=dtype)
    # weight/bias in float32 while x is half precision: mixed parameter dtypes.
    w, b = _rand((10,), 31, loc=1.0, std=0.5), _rand((10,), 32)
    scale = _rand((2, 10), 33, loc=0.0, std=0.5, dtype=dtype) if has_scale else None
    shift = _rand((2, 10), 34, loc=0.0, std=0.5, dtype=dtype) if has_shift else None
    y, _ = _run(x, plan, w, b, regime=regime, activation=activation, scale=scale, shift=shift)
    expected, _ = _reference(x, plan, w, b, activation=activation, scale=scale, shift=shift)
    check(y, expected, dtype, what=f"y ({epilogue})")


@pytest.mark.parametrize("regime", REGIMES)
def test_affine_false_and_public_api(regime):
    x = _rand((2, 8, 3, 3), 40, dtype=torch.bfloat16)
    plan = make_plan(8, 4)
    y, _ = _run(x, plan, regime=regime)
    expected, _ = _reference(x, plan)
    check(y, expected, torch.bfloat16, what="y (affine=False)")
    y_api = groupnorm.group_norm(x, 4, backend="triton")
    check(y_api, expected, torch.bfloat16, what="y through group_norm(backend='triton')")


@pytest.mark.parametrize("regime", REGIMES)
def test_large_offset_small_spread(regime):
    """The README's exactness claim: fp32 x with mean 1e4 and std 1e-2 normalizes within 1e-6
    of float64 on the same input."""
    x = _rand((1, 4, 16, 16), 41, loc=1e4, std=1e-2)
    plan = make_plan(4, 2)
    y, _ = _run(x, plan, regime=regime)
    expected, _ = _reference(x, plan)
    err = np.abs(to_numpy(y) - expected).max()
    assert err <= 1e-6, f"max error {err:.2e} at mean 1e4, std 1e-2"


@pytest.mark.parametrize("regime", REGIMES)
def test_fp16_near_its_max_does_not_overflow(regime):
    """docs/spec.md#numerics: squares of fp16 inputs up to 6e4 are formed in fp32 (6e4^2
    overflows fp16)."""
    x = _rand((2, 4, 5, 5), 43, loc=0.0, std=3e4).clamp(-6e4, 6e4).to(torch.float16)
    plan = make_plan(4, 2)
    y, stats = _run(x, plan, regime=regime, return_stats=True)
    expected, cache = _reference(x, plan)
    assert torch.isfinite(stats.var).all()
    check(stats.var, cache.var, torch.float32, reduction=50, what="var of large fp16")
    check(y, expected, torch.float16, what="y of large fp16")


@pytest.mark.parametrize("regime", REGIMES)
def test_nan_stays_in_its_group(regime):
    x = _rand((2, 6, 4, 4), 42)
    x[1, 2, 1, 1] = float("nan")
    plan = make_plan(6, 3)
    y, _ = _run(x, plan, regime=regime, activation="relu")
    bad = torch.isnan(y)
    assert bad[1, 2:4].all(), "the NaN's group must be NaN (relu included)"
    bad[1, 2:4] = False
    assert not bad.any(), "a NaN must not leak into other groups or samples"


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_stats_in_from_merged_tiles(channels_last, regime):
    """Normalize one tile with statistics merged over two tiles: equals normalizing the whole."""
    whole = _rand((2, 6, 8, 5), 43, dtype=torch.float16)
    if channels_last:
        whole = whole.to(memory_format=torch.channels_last)
    plan = make_plan(6, 3, uneven=True)
    top, bottom = whole[:, :, :4], whole[:, :, 4:]
    _, s_top = _run(top, plan, regime=regime, return_stats=True)
    _, s_bottom = _run(bottom, plan, regime=regime, return_stats=True)
    merged = groupnorm.merge_stats(s_top, s_bottom)
    w, b = _rand((6,), 44), _rand((6,), 45)
    y, _ = _run(bottom, plan, w, b, regime=regime, stats=merged, activation="silu")
    expected, _ = _reference(whole, plan, w, b, activation="silu")
    check(y, expected[:, :, 4:], torch.float16, what="y of a tile with merged stats")


def test_stats_match_torch_backend_layout():
    x = _rand((2, 6, 5, 5), 46)
    plan = make_plan(6, 2)
    _, ours = _run(x, plan, regime="fused", return_stats=True)
    theirs = groupnorm.group_stats(x, 2, backend="torch")
    assert isinstance(ours, GroupStats)
    # Pivots may differ (an element of the group, or the mean from torch's kernel); the
    # statistics they stand for may not.
    torch.testing.assert_close(ours.mean, theirs.mean)
    torch.testing.assert_close(ours.var, theirs.var)
    assert ours.count.dtype == torch.float32 and ours.count.shape == (2, 2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_stats_on_the_triton_backend(channels_last):
    """group_stats(backend="triton") runs the kernels (auto picks them on CUDA) and matches the
    float64 statistics."""
    x = _rand((2, 10, 4, 5), 52)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    plan = make_plan(10, 4, uneven=True)
    stats = groupnorm.group_stats(x, 4, uneven=True, backend="triton")
    _, cache = _reference(x, plan)
    check(stats.mean, cache.mean, torch.float32, reduction=60, what="mean")
    check(stats.var, cache.var, torch.float32, reduction=60, what="var")


EDGE_SHAPES = {
    "HW=1": ((3, 6, 1, 1), 3),
    "N=1-huge-group-G1": ((1, 4, 64, 72), 1),
    "G=C-single-element-groups": ((2, 6), 6),
}


@pytest.mark.parametrize("regime", ["auto", *REGIMES])
@pytest.mark.parametrize("edge", list(EDGE_SHAPES))
def test_edge_shapes_forward_backward(edge, regime):
    shape, G = EDGE_SHAPES[edge]
    x = _rand(shape, 47)
    if regime == "onchip" and edge == "N=1-huge-group-G1":
        # 4 x 4608 fp32 elements take 32 K tile slots, over the on-chip limit: a clear error
        with pytest.raises(ValueError, match="group of at most 16384 tile slots"):
            group_norm_triton(x, make_plan(shape[1], G), regime="onchip")
        return
    _backward_case(x, make_plan(shape[1], G), regime=regime, dtype=torch.float32, has_scale=True)


@pytest.mark.parametrize("offset", [30.0, 300.0, 1000.0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("regime", REGIMES)
def test_regression_float32_forward_with_a_pivot_far_out_in_its_group(
    regime, channels_last, offset
):
    """One-channel groups of data at an offset with a zero of padding first: the pivot (the
    group's first element) lies about 16 deviations from the mean, and y = (x - p) a +
    (bias - mean a) cancelled between its halves: y at up to 3x the float32 bound on chip and
    1.4-3.3x in the loop regimes (whose float32 mean also carried its summation's error). On
    chip y now comes from x - p - mean and the float32 mean's residual; the loop regimes sum the
    mean in float64 and normalize around it (``_centred``)."""
    plan = make_plan(4, 4)
    x = _rand((8, 4, 16, 16), 121, loc=offset, std=0.01)
    x[:, :, 0, 0] = 0.0
    x[:, :, 5, 3] = 0.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = _rand((4,), 122, loc=2.5, std=0.3), _rand((4,), 123)
    y, stats = _run(x, plan, w, b, regime=regime, return_stats=True)
    expected, cache = _reference(x, plan, w, b)
    check(y, expected, torch.float32)
    check(stats.mean, cache.mean, torch.float32, what="mean")
    check(stats.var, cache.var, torch.float32, reduction=256, what="var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("regime", REGIMES)
def test_regression_eps_0_one_element_groups_have_nan_gradients_in_every_regime(
    regime, channels_last, dtype
):
    """At eps = 0 a one-element group's variance is 0, rstd infinite and y NaN; its dx and
    dweight are NaN (the float64 reference, torch, the on-chip regime). The loop regimes zeroed
    rstd for such groups (y does not depend on x at eps > 0) and returned 0 for both."""
    x = _rand((2, 6, 1, 1), 111, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    plan = make_plan(6, 6)
    xg = x.clone().requires_grad_()
    w = _rand((6,), 112, loc=1.0, std=0.5, dtype=dtype).requires_grad_()
    b = _rand((6,), 113, dtype=dtype).requires_grad_()
    dy = _rand((2, 6, 1, 1), 114, loc=0.0, std=1.0, dtype=dtype)
    with np.errstate(divide="ignore", invalid="ignore"):  # the interpreter's numpy, 0 * inf
        y, _ = group_norm_triton(xg, plan, w, b, eps=0.0, regime=regime)
        y.backward(dy)
        _, cache = _reference(x, plan, w, b, eps=0.0)
        grads = ref.group_norm_backward(to_numpy(dy), cache)
    assert np.isnan(grads.dx).all() and np.isnan(grads.dgamma).all()
    assert torch.isnan(y).all()
    assert torch.isnan(xg.grad).all(), xg.grad
    assert torch.isnan(w.grad).all(), w.grad
    check(b.grad, grads.dbeta, dtype, reduction=2, what="dbias")


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 1), (2, 8, 8, 4), (2, 8, 32, 32)], ids=str)
def test_regression_float32_backward_of_small_groups_at_small_spread(
    shape, channels_last, activation, modulated
):
    """Groups of 2 channels at std 3e-3 around 0.5 (rstd ~ 230), |w| ~ 2: dx cancels, and from
    float32 statistics in float32 arithmetic the kernels' dx reached 13x the float32 bound
    (groups of 2-2048 elements). The on-chip regime (auto's choice here) now takes a float32
    backward in float64 from statistics it recomputes, and with scale in float64 from 1 + scale
    (rounded to float32 first, it left dx at 3.4x the bound, found by fuzzing). Every gradient
    against float64."""
    x = _rand(shape, 101, loc=0.5, std=3e-3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    plan = make_plan(8, 4)
    xg = x.clone().requires_grad_()
    w = _rand((8,), 102, std=2.0).requires_grad_()
    b = _rand((8,), 103).requires_grad_()
    mod = {}
    if modulated:
        mod = {"scale": _rand((2, 8), 105, loc=0.0, std=0.3), "shift": _rand((2, 8), 106)}
        mod = {k: v.requires_grad_() for k, v in mod.items()}
    params = (w, b, mod.get("scale"), mod.get("shift"))
    launch = kernels._launch_of("bwd", x, x, plan.sizes, "auto", params, activation)
    assert launch.cfg.regime == "onchip"
    y, _ = group_norm_triton(xg, plan, w, b, activation=activation, **mod)
    dy = _rand(shape, 104, loc=0.0, std=1.0)
    y.backward(dy)
    _, cache = _reference(x, plan, w, b, activation=activation, **mod)
    grads = ref.group_norm_backward(to_numpy(dy), cache)
    N, L = shape[0], shape[2] * shape[3]
    check(xg.grad, grads.dx, torch.float32, reduction=2 * L, what="dx")
    check(w.grad, grads.dgamma, torch.float32, reduction=N * L, what="dweight")
    check(b.grad, grads.dbeta, torch.float32, reduction=N * L, what="dbias")
    if modulated:
        check(mod["scale"].grad, grads.dscale, torch.float32, reduction=L, what="dscale")
        check(mod["shift"].grad, grads.dshift, torch.float32, reduction=L, what="dshift")


LOOP_EXACT_CASES = {
    # name: (shape, layout, groups, x loc, x std, zero padding, dy = 1)
    "small-spread": ((2, 8, 8, 4), "nchw", 4, 0.5, 3e-3, 0, False),
    "small-spread-runs": ((2, 8, 8, 4), "nhwc", 4, 0.5, 3e-3, 0, False),
    "small-spread-flat": ((2, 8, 5, 7), "nchw", 4, 0.5, 3e-3, 0, False),
    "wide-group": ((1, 40, 3, 3), "nchw", 1, -2.0, 1e-2, 0, False),
    "dy-of-y-sum": ((2, 8, 8, 4), "nchw", 8, 30.0, 1.0, 1, True),
    "dy-of-y-sum-runs": ((2, 8, 8, 4), "nhwc", 8, 30.0, 1.0, 1, True),
}


@pytest.mark.parametrize("activation", [None, "silu", "gelu", "relu"])
@pytest.mark.parametrize("regime", ["fused", "split", "wave"])
@pytest.mark.parametrize("case", list(LOOP_EXACT_CASES))
def test_regression_loop_regimes_take_a_float32_backward_in_float64(case, regime, activation):
    """The loop regimes' float32 backward took x_hat from the saved float32 statistics and
    summed in float32: dx reached 1.6-2.8x the float32 bound at small spread (SiLU 4.4x, GELU
    4.8x, ReLU 1.35x), and dweight of y.sum()'s gradient 1.2-1.7x on one-channel groups of
    zero-padded data (whose dweight is 0). They now sum in float64 and retake the mean and rstd
    from those sums, as the on-chip regime recomputes them, with du moved to them to first order
    (see _bwd_dx_chunk). Every gradient against float64."""
    _float32_gradients_match(LOOP_EXACT_CASES[case], 101, regime=regime, activation=activation)


def _padded(shape, layout, loc, std, pad, seed):
    """float32 (loc, std) normal values with ``pad`` zeros around H and W, NCHW or NHWC."""
    N, C = shape[:2]
    inner = tuple(s - 2 * pad for s in shape[2:])
    x = F.pad(_rand((N, C, *inner), seed, loc=loc, std=std), (pad,) * 4)
    return x.to(memory_format=torch.channels_last) if layout == "nhwc" else x


def _float32_gradients_match(case, seed, *, regime, activation):
    """One of LOOP_EXACT_CASES' kind of case: every gradient of a float32 call (|w| ~ 2, dy
    random or 1) against float64."""
    shape, layout, G, loc, std, pad, ones = case
    x = _padded(shape, layout, loc, std, pad, seed)
    C = shape[1]
    plan = make_plan(C, G)
    xg = x.clone().requires_grad_()
    w = _rand((C,), seed + 1, std=2.0).requires_grad_()
    b = _rand((C,), seed + 2).requires_grad_()
    y, _ = group_norm_triton(xg, plan, w, b, regime=regime, activation=activation)
    dy = torch.ones(shape, device=DEVICE) if ones else _rand(shape, seed + 3, loc=0.0, std=1.0)
    y.backward(dy)
    _, cache = _reference(x, plan, w, b, activation=activation)
    _check_float32_gradients(plan, dy, cache, xg, w, b)


def _check_float32_gradients(plan, dy, cache, xg, w, b, scale=None):
    """Every gradient of a float32 call (the leaves' .grad) against the float64 reference's."""
    grads = ref.group_norm_backward(to_numpy(dy), cache)
    N, L = dy.shape[0], dy[0, 0].numel()
    check(xg.grad, grads.dx, torch.float32, reduction=max(plan.sizes) * L, what="dx")
    check(w.grad, grads.dgamma, torch.float32, reduction=N * L, what="dweight")
    check(b.grad, grads.dbeta, torch.float32, reduction=N * L, what="dbias")
    if scale is not None:
        check(scale.grad, grads.dscale, torch.float32, reduction=L, what="dscale")


ONCHIP_8K_CASES = {
    # name: ((shape, layout, groups, x loc, x std, zero padding, dy = 1), activation)
    "dy-of-y-sum": (((2, 2, 64, 128), "nchw", 2, 30.0, 1.0, 1, True), None),
    "dy-of-y-sum-small-spread-nhwc": (((2, 2, 128, 64), "nhwc", 2, 0.5, 3e-3, 0, True), None),
    "silu-small-spread": (((1, 2, 64, 64), "nchw", 1, 0.5, 3e-3, 0, False), "silu"),
    "gelu-small-spread-runs": (((1, 8, 32, 32), "nhwc", 1, 0.5, 3e-3, 0, False), "gelu"),
}


@pytest.mark.parametrize("case", list(ONCHIP_8K_CASES))
def test_regression_float32_groups_of_8k_slots_take_an_exact_backward(case):
    """Float32 groups of 4097-8192 tile slots went through the on-chip backward in float32
    arithmetic from the forward's float32 mean: y.sum()'s gradient reached dx 26x and dweight
    51-156x the float32 bound (one-channel groups, zero-padded or at std 3e-3), SiLU 9x and GELU
    4.9x at random dy. Float64 tiles of that size spill, so these groups now take the loop
    regimes, exact in float64 (the forward stays on chip, at 8192 slots)."""
    spec, activation = ONCHIP_8K_CASES[case]
    shape, layout, G = spec[:3]
    x = _padded(shape, layout, 0.0, 1.0, 0, 130)
    params = (x.new_ones(shape[1]), None, None, None)
    fwd = kernels._launch_of("fwd", x, x, make_plan(shape[1], G).sizes, "auto", params, activation)
    assert fwd.cfg.regime == "onchip" and fwd.cfg.block_c * fwd.cfg.block_l == 8192
    _float32_gradients_match(spec, 131, regime="auto", activation=activation)


# name: (shape of one sample, groups, regime, scale)
LARGE_MEAN_DY_CASES = {
    "onchip": ((8, 6, 6), 2, "auto", False),
    "onchip-scale": ((8, 6, 6), 2, "auto", True),
    "fused": ((8, 6, 6), 2, "fused", True),
    "split": ((8, 6, 6), 2, "split", False),
}


@pytest.mark.parametrize("case", list(LARGE_MEAN_DY_CASES))
def test_regression_float32_parameter_gradients_of_a_dy_with_a_large_mean(case):
    """The backward's per-(n, c) sums A and B were exact but stored in float32, and the
    parameter kernel combined them in float32 (dweight = sum_n (1 + scale) A). Where dy has a
    large mean and the samples' A cancel, that rounding shows: the fuzzer found dweight at 8.7x
    and dscale at 4x the float32 bound (on-chip and fused regimes). Here sample 1 is -sample 0
    with channel offsets inside each group, so A = 1000 sum_l x_hat is large and opposite in
    the two samples. A and B are float64 for float32 x now. Every gradient against float64."""
    inner, G, regime, with_scale = LARGE_MEAN_DY_CASES[case]
    C = inner[0]
    half = _rand((1, *inner), 141, loc=0.0, std=1.0) + _rand((1, C, 1, 1), 142, std=2.0)
    x = torch.cat([half, -half])
    shape = x.shape
    plan = make_plan(C, G)
    xg = x.clone().requires_grad_()
    w = _rand((C,), 143, loc=1.0, std=0.5).requires_grad_()
    b = _rand((C,), 144, std=0.5).requires_grad_()
    scale = torch.zeros(2, C, device=DEVICE).requires_grad_() if with_scale else None
    y, _ = group_norm_triton(xg, plan, w, b, regime=regime, scale=scale)
    dy = _rand(tuple(shape), 145, loc=1000.0, std=1.0)
    y.backward(dy)
    _, cache = _reference(x, plan, w, b, scale=scale)
    _check_float32_gradients(plan, dy, cache, xg, w, b, scale)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_regression_an_expanded_gradient_takes_the_exact_backward(channels_last):
    """y.sum().backward() hands the backward a gradient of zero strides, which sent it to a
    float32 loop regime: dx reached 2.3x the float32 bound (SiLU, std 1e-2), where a dense
    gradient of the same values gave 0.02x."""
    x = _rand((2, 8, 4, 4), 111, loc=0.3, std=1e-2)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    plan = make_plan(8, 4)
    w, b = _rand((8,), 112, loc=1.0, std=0.7), _rand((8,), 113, std=0.7)
    xg = x.clone().requires_grad_()
    y, _ = group_norm_triton(xg, plan, w, b, activation="silu")
    y.sum().backward()
    _, cache = _reference(x, plan, w, b, activation="silu")
    grads = ref.group_norm_backward(np.ones(x.shape), cache)
    check(xg.grad, grads.dx, torch.float32, reduction=2 * 16, what="dx")


@pytest.mark.parametrize("regime", ["auto", *REGIMES])
@pytest.mark.parametrize("base", [(2, 4, 1), (1, 4, 1, 1)], ids=["N-C-1", "1-C-1-1"])
def test_regression_an_input_expanded_over_its_positions(base, regime):
    """An (N, C, 1, ...) tensor expanded over its positions has channel stride 1, so it was
    read as channels-last while its output, allocated like it, is NCHW: the on-chip kernels
    address both by x's layout, and most of y and dx was never written (6e5x the float32
    bound, no error)."""
    shape = (2, 4, 3, 5)[: len(base)]
    small = _rand(base, 151)
    x = small.expand(shape)
    xg = small.clone().requires_grad_()
    plan = make_plan(4, 2)
    w, b = _rand((4,), 152, loc=1.0, std=0.5), _rand((4,), 153)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    y, _ = group_norm_triton(xg.expand(shape), plan, wg, bg, regime=regime)
    dy = _rand(shape, 154)
    y.backward(dy)
    expected, cache = _reference(x.contiguous(), plan, w, b)
    check(y, expected, torch.float32, what="y")
    grads = ref.group_norm_backward(to_numpy(dy), cache)
    dx = grads.dx.sum(axis=tuple(d for d, n in enumerate(base) if n == 1))
    check(xg.grad, dx.reshape(base), torch.float32, reduction=x.numel(), what="dx")
    check(wg.grad, grads.dgamma, torch.float32, reduction=x[:, 0].numel(), what="dweight")


@pytest.mark.parametrize("regime", ["auto", "fused", "split", "wave"])
def test_a_channel_slice_of_a_channels_last_input_comes_back_channels_last(regime):
    """Channel stride 2, not channels-fast, while its output is channels-last: read as it is,
    not copied (a regression of the copy above gave NCHW y, which torch.compile refused as
    unlike the op's fake kernel)."""
    x = _rand((2, 8, 3, 5), 155).to(memory_format=torch.channels_last)[:, ::2]
    y, _ = group_norm_triton(x, make_plan(4, 2), regime=regime)
    assert y.stride() == torch.empty_like(x).stride()
    check(y, _reference(x, make_plan(4, 2))[0], torch.float32, what="y")


@pytest.mark.parametrize("regime", ["auto", *REGIMES])
@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 1, 1)], ids=["NC", "NCHW-1x1"])
def test_regression_one_element_groups_give_dx_exactly_zero(shape, regime):
    """A group of one element normalizes to 0 whatever x is, so dx = 0. On an H200 every
    regime gave 2.2e-5 (11x the float32 bound): compiled with fused multiply-adds, du * w -
    mean(du * w) kept the rounding of one product, times rstd = 1 / sqrt(eps)."""
    x = _rand(shape, 91).requires_grad_()
    w, b = _rand((6,), 92).requires_grad_(), _rand((6,), 93)
    y, _ = group_norm_triton(x, make_plan(6, 6), w, b, regime=regime, activation="silu")
    y.backward(_rand(shape, 94, std=50.0))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("regime", REGIMES)
def test_empty_batch(regime):
    """N = 0 (the float64 reference cannot reshape an empty batch, so checked directly):
    empty outputs and statistics, zero weight/bias gradients."""
    x = torch.randn(0, 6, 3, 3, device=DEVICE).requires_grad_()
    w, b = torch.randn(6, device=DEVICE).requires_grad_(), torch.randn(6, device=DEVICE)
    y, stats = group_norm_triton(x, make_plan(6, 3), w, b, regime=regime, return_stats=True)
    assert y.shape == x.shape and stats.mean.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("regime", REGIMES)
def test_regression_empty_batch_in_a_layout_that_does_not_collapse(regime):
    """N = 0 with H and W transposed: an empty tensor counts as contiguous whatever its
    strides, so the copy to a flat layout kept them and a bare AssertionError followed."""
    x = torch.randn(0, 6, 5, 4, device=DEVICE).transpose(2, 3).requires_grad_()
    y, stats = group_norm_triton(x, make_plan(6, 3), regime=regime, return_stats=True)
    assert y.shape == x.shape and stats.mean.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_groupnorm_module_on_triton_matches_float64_like_the_torch_backend():
    """The drop-in module with backend="triton" and the same module on the torch backend, each
    against float64: output and weight gradient (channels-last bf16 input, uneven groups, SiLU)."""
    x = _rand((2, 10, 4, 5), 48, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    mods = [
        groupnorm.GroupNormAct(4, 10, uneven=True, backend=name, device=DEVICE)
        for name in ("triton", "torch")
    ]
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(_rand((10,), 49, loc=1.0, std=0.3))
            m.bias.copy_(_rand((10,), 50))
    outs = [m(x) for m in mods]
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    dy = _rand(tuple(x.shape), 51, dtype=torch.bfloat16)
    for y in outs:
        y.backward(dy)
    _, cache = _reference(
        x, make_plan(10, 4, uneven=True), mods[1].weight, mods[1].bias, activation="silu"
    )
    # Both against float64; torch has no uneven GroupNorm + SiLU, so the half-precision bound
    # is twice the error of the exactly rounded result.
    expected = cache.u / (1 + np.exp(-cache.u))
    grads = ref.group_norm_backward(to_numpy(dy), cache)
    for m, y, name, judge in zip(
        mods, outs, ("triton", "torch"), (check, assert_matches), strict=True
    ):
        judge(y, expected, torch.bfloat16, what=f"GroupNormAct(backend={name!r})")
        judge(m.weight.grad, grads.dgamma, torch.bfloat16, reduction=40, what=f"dweight ({name})")


@pytest.mark.parametrize(
    "case",
    [
        "module-fp32-nchw-grad",
        "module-bf16-nhwc-silu-grad",
        "function-fp16-nchw",
        "function-fp32-uneven",
    ],
)
def test_plain_calls_take_the_fast_path_and_match_float64(case, monkeypatch):
    """Module and function calls with weight, bias and an activation at most skip the validated
    path (no backend selection) and launch straight away; output and gradients against
    float64."""
    selected = []
    select = groupnorm.dispatch.select_backend
    monkeypatch.setattr(
        groupnorm.dispatch, "select_backend", lambda *a: selected.append(1) or select(*a)
    )
    kind, dtype_name, *rest = case.split("-")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    activation = "silu" if "silu" in rest else None
    C, G = (10, 4) if "uneven" in rest else (8, 4)
    plan = make_plan(C, G, uneven=C % G != 0)
    fmt = torch.channels_last if "nhwc" in rest else torch.contiguous_format
    x = _rand((2, C, 5, 3), 120, dtype=dtype).to(memory_format=fmt)
    w, b = _rand((C,), 121, loc=1.0, std=0.5), _rand((C,), 122)
    grad = "grad" in rest
    if kind == "module":
        m = groupnorm.GroupNorm(G, C, activation=activation, backend="triton", device=DEVICE)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        leaf = x.detach().clone().requires_grad_()
        y = m(leaf)
        weight = m.weight
    else:
        leaf, weight = x, w
        y = groupnorm.group_norm(
            x, G, w, b, uneven=C % G != 0, activation=activation, backend="triton"
        )
    assert not selected, "a plain call went through backend selection"
    assert y.is_contiguous(memory_format=fmt)
    expected, cache = _reference(x, plan, w, b, activation=activation)
    check(y, expected, dtype, what=f"y ({case})")
    if grad:
        dy = _rand(tuple(x.shape), 123, loc=0.0, std=1.0, dtype=dtype)
        y.backward(dy)
        grads = ref.group_norm_backward(to_numpy(dy), cache)
        check(leaf.grad, grads.dx, dtype, reduction=(C // G + 1) * 15, what=f"dx ({case})")
        check(weight.grad, grads.dgamma, dtype, reduction=30, what=f"dweight ({case})")


def test_plain_calls_outside_the_fast_path_take_the_validated_one(monkeypatch):
    """What the fast path does not serve reaches the validated path, which decides: float64
    (refused by name, served by the torch backend under auto), parameters on another device
    than x, and one-element groups (warned about there)."""
    selected = []
    select = groupnorm.dispatch.select_backend
    monkeypatch.setattr(
        groupnorm.dispatch, "select_backend", lambda *a: selected.append(1) or select(*a)
    )
    x64 = torch.randn(2, 4, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        groupnorm.GroupNorm(2, 4, backend="triton", device=DEVICE).double()(x64)
    assert selected
    selected.clear()
    with pytest.warns(groupnorm.SingleElementGroupWarning):
        groupnorm.group_norm(_rand((2, 4, 1, 1), 124), 4, backend="triton")
    assert selected


def test_regression_packed_statistics_reach_the_op_as_their_own_fields():
    """A plain eager forward packs its statistics in one buffer (the kernels read field k at
    k * N * G); a backward that goes through the op (here: dy a tensor subclass, which is not a
    plain eager call) must hand the op each field as its own tensor."""

    class Marked(torch.Tensor):
        pass

    x = _rand((2, 6, 4, 3), 125).requires_grad_()
    w = _rand((6,), 126, loc=1.0, std=0.5).requires_grad_()
    plan = make_plan(6, 3)
    y, _ = group_norm_triton(x, plan, w)
    dy = _rand(tuple(x.shape), 127, loc=0.0, std=1.0)
    dx, dw = torch.autograd.grad(y, (x, w), dy.as_subclass(Marked))
    _, cache = _reference(x, plan, w)
    grads = ref.group_norm_backward(to_numpy(dy), cache)
    check(dx, grads.dx, torch.float32, reduction=24, what="dx through the op")
    check(dw, grads.dgamma, torch.float32, reduction=24, what="dweight through the op")


def test_regression_an_empty_batch_backpropagates_through_the_plain_call():
    """The plain eager call saves four tensors (x, weight, bias, packed statistics); its
    backward told them apart from the op's ten by N * G, which is 0 for an empty batch, and
    unpacked four tensors as ten."""
    x = torch.empty((0, 4, 3, 3), device=DEVICE).requires_grad_()
    m = groupnorm.GroupNorm(2, 4, backend="triton", device=DEVICE)
    dx, dw, db = torch.autograd.grad(m(x), (x, m.weight, m.bias), torch.ones_like(x))
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(4, device=DEVICE))
    assert torch.equal(db, torch.zeros(4, device=DEVICE))


# ----------------------------------------------------------------------------------- dispatch


def _plain_request(x):
    """A validated call with 2 groups and nothing else, as group_norm would build it."""
    plan = groupnorm.functional.resolve_plan(x.shape[1], 2)
    return groupnorm.dispatch.Request(x, plan, None, None, 1e-5, None, None, None, None, False)


def test_auto_never_picks_triton_for_cpu_tensors():
    r = _plain_request(torch.randn(2, 4, 3))
    assert groupnorm.dispatch.select_backend(r).name == "torch"


def test_float64_is_refused_with_a_reason():
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        groupnorm.group_norm(x, 2, backend="triton")


def test_declines_while_an_onnx_export_is_traced(monkeypatch):
    """The custom op has no ONNX form: during export the torch backend's composite ops must be
    traced instead, also for CUDA tensors where auto would pick the kernels."""
    r = _plain_request(torch.randn(2, 4, 3, device=DEVICE))
    assert triton_backend.why_not(r) is None
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert "ONNX export" in (triton_backend.why_not(r) or "")
    assert groupnorm.dispatch.select_backend(r).name == "torch"


def test_available_names_the_missing_pieces(monkeypatch):
    monkeypatch.setattr(triton_backend, "_installed", lambda: False)
    assert "pip install groupnorm[triton]" in (triton_backend.available() or "")
    monkeypatch.undo()
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in (triton_backend.available() or "")
        r = _plain_request(torch.randn(2, 4))
        assert "TRITON_INTERPRET=1" in (triton_backend.why_not(r) or "")


def test_import_groupnorm_without_triton():
    """``import groupnorm`` must not need triton; the backend then says how to install it."""
    code = (
        "import sys, importlib.util\n"
        "sys.modules['triton'] = None\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'triton' else real(n, *a)\n"
        "import torch, groupnorm\n"
        "reason = groupnorm.available_backends()['triton']\n"
        "assert 'pip install groupnorm[triton]' in reason, reason\n"
        "y = groupnorm.group_norm(torch.randn(2, 4, 3), 2)\n"
        "assert y.shape == (2, 4, 3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------- backward


def _backward_case(
    x,
    plan,
    *,
    regime,
    dtype,
    param_dtype=None,
    activation=None,
    has_scale=False,
    has_shift=False,
    affine=True,
    seed=50,
):
    """Run forward + backward through the op's autograd; compare every gradient with the
    float64 reference backward. Returns the gradients (for the determinism test)."""
    pdt = param_dtype or dtype
    C = x.shape[1]
    N = x.shape[0]
    leaves = {"x": x.detach().clone().requires_grad_()}
    if affine:
        leaves["weight"] = _rand((C,), seed, loc=1.0, std=0.5, dtype=pdt).requires_grad_()
        leaves["bias"] = _rand((C,), seed + 1, dtype=pdt).requires_grad_()
    if has_scale:
        leaves["scale"] = _rand((N, C), seed + 2, loc=0.0, std=0.5, dtype=dtype).requires_grad_()
    if has_shift:
        leaves["shift"] = _rand((N, C), seed + 3, loc=0.0, std=0.5, dtype=dtype).requires_grad_()
    y, _ = group_norm_triton(
        leaves["x"],
        plan,
        leaves.get("weight"),
        leaves.get("bias"),
        activation=activation,
        scale=leaves.get("scale"),
        shift=leaves.get("shift"),
        regime=regime,
    )
    dy = _rand(tuple(x.shape), seed + 4, loc=0.0, std=1.0, dtype=dtype)  # NCHW even if x is not
    y.backward(dy)
    _, cache = _reference(
        x,
        plan,
        leaves.get("weight"),
        leaves.get("bias"),
        activation=activation,
        scale=leaves.get("scale"),
        shift=leaves.get("shift"),
    )
    grads = ref.group_norm_backward(to_numpy(dy), cache)
    L = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1
    check(leaves["x"].grad, grads.dx, dtype, reduction=max(plan.sizes) * L, what="dx")
    checks = {
        "weight": (grads.dgamma, N * L),
        "bias": (grads.dbeta, N * L),
        "scale": (grads.dscale, L),
        "shift": (grads.dshift, L),
    }
    for name, (expected, reduction) in checks.items():
        if name in leaves:
            assert leaves[name].grad.dtype == leaves[name].dtype
            check(leaves[name].grad, expected, dtype, reduction=reduction, what=f"d{name}")
    return {k: v.grad for k, v in leaves.items()}


BACKWARD_LAYOUTS = [
    "nchw",
    "nhwc",
    "ndhwc",
    "ncl-channel-stride-1",
    "nc-no-spatial",
    "hw-transposed-view-copied",
]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", BACKWARD_LAYOUTS)
def test_backward_layouts(layout, dtype, regime):
    _backward_case(LAYOUTS[layout](dtype), make_plan(6, 3), regime=regime, dtype=dtype)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("plan_kind", list(PLANS))
def test_backward_group_plans(plan_kind, regime):
    x = _rand((2, 12, 3, 5), 51).to(memory_format=torch.channels_last)
    _backward_case(x, PLANS[plan_kind](), regime=regime, dtype=torch.float32, activation="silu")


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_backward_epilogues(epilogue, dtype, regime):
    activation, has_scale, has_shift = EPILOGUES[epilogue]
    x = _rand((2, 10, 4, 6), 52, dtype=dtype)
    _backward_case(
        x,
        make_plan(10, 4, uneven=True),
        regime=regime,
        dtype=dtype,
        param_dtype=torch.float32,
        activation=activation,
        has_scale=has_scale,
        has_shift=has_shift,
    )


@pytest.mark.parametrize("regime", REGIMES)
def test_backward_affine_false(regime):
    _backward_case(
        _rand((2, 6, 3, 4), 53),
        make_plan(6, 2),
        regime=regime,
        dtype=torch.float32,
        affine=False,
        has_scale=True,
    )


@pytest.mark.parametrize("regime", REGIMES)
def test_backward_bitwise_deterministic(regime):
    x = _rand((2, 8, 6, 6), 54, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    kw = dict(
        regime=regime,
        dtype=torch.bfloat16,
        param_dtype=torch.float32,
        activation="gelu",
        has_scale=True,
        has_shift=True,
    )
    first = _backward_case(x, make_plan(8, 3, uneven=True), **kw)
    second = _backward_case(x, make_plan(8, 3, uneven=True), **kw)
    for name, g in first.items():
        assert torch.equal(g, second[name]), f"d{name} differs between two identical runs"


@pytest.mark.parametrize("regime", REGIMES)
def test_backward_with_given_stats_treats_them_as_constants(regime):
    """With stats given, y = act(x_hat * w + b) with constant mean/rstd: dx = rstd * dx_hat."""
    plan = make_plan(6, 3)
    x = _rand((2, 6, 4, 4), 55).requires_grad_()
    stats = groupnorm.group_stats(_rand((2, 6, 4, 4), 56), 3)
    w = _rand((6,), 57, loc=1.0, std=0.5).requires_grad_()
    y, _ = group_norm_triton(x, plan, w, None, stats=stats, activation="silu", regime=regime)
    dy = _rand((2, 6, 4, 4), 58)
    y.backward(dy)
    mean, rstd = (
        to_numpy(t)[:, :, None, None].repeat(2, axis=1) for t in (stats.mean, stats.rstd())
    )
    xhat = (to_numpy(x) - mean) * rstd
    u = xhat * to_numpy(w)[None, :, None, None]
    du = to_numpy(dy) * ref.activation_grad(u, "silu")
    check(
        x.grad,
        du * to_numpy(w)[None, :, None, None] * rstd,
        torch.float32,
        what="dx with given stats",
    )
    check(
        w.grad,
        (du * xhat).sum(axis=(0, 2, 3)),
        torch.float32,
        reduction=32,
        what="dweight with given stats",
    )


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("std", [1e-3, 1e-2])
def test_regression_onchip_backward_from_given_stats_is_exact(activation, std):
    """The on-chip backward took given statistics in float32 (x_hat, u and rstd), so the
    activation's derivative at u, where it is near 0, put dx at 3.4-7.2x the float32 bound
    (std 1e-3 to 1e-2); the torch backend was at 0.03x. The expected values come from the given
    fields in float64."""
    plan = make_plan(8, 4)
    x = _rand((2, 8, 6, 6), 121, loc=0.0, std=std).requires_grad_()
    stats = groupnorm.group_stats(x.detach(), 4)
    w = _rand((8,), 122, std=2.0)
    b = _rand((8,), 123)
    launch = kernels._launch_of("bwd", x, x, plan.sizes, "auto", (w, b, None, None), activation)
    assert launch.cfg.regime == "onchip"
    y, _ = group_norm_triton(x, plan, w, b, stats=stats, activation=activation)
    dy = _rand((2, 8, 6, 6), 124)
    y.backward(dy)
    pivot, smean, m2, count = (
        to_numpy(t) for t in (stats.pivot, stats.shifted_mean, stats.m2, stats.count)
    )
    rstd = (1 / np.sqrt(m2 / count + 1e-5)).repeat(2, axis=1)[:, :, None, None]
    centered = (to_numpy(x) - pivot.repeat(2, axis=1)[:, :, None, None]) - smean.repeat(2, axis=1)[
        :, :, None, None
    ]
    wd, bd = (to_numpy(t)[None, :, None, None] for t in (w, b))
    u = centered * rstd * wd + bd
    expected = to_numpy(dy) * ref.activation_grad(u, activation) * wd * rstd
    check(x.grad, expected, torch.float32, what="dx from given statistics")


def test_regression_the_backward_reads_the_given_shifted_mean():
    """The forward with given statistics saved the shifted mean it re-derived, sum(cnt * mean)
    / cnt in float32, an ulp off the given one: dweight took it times rstd * sum(dy), 11.6x the
    float32 bound on chip for statistics from the Triton kernels (pivot the first element,
    large shifted means) and a dy of mean 100. Expected from the given fields in float64."""
    x = (torch.randn(2, 4, 4, 5, generator=_gen(0), dtype=torch.float64) * 1e-2 + 30).float()
    stats = groupnorm.group_stats(x, 4, backend="triton")
    gen = _gen(1)
    w = (2 * torch.randn(4, generator=gen)).requires_grad_()
    b = torch.randn(4, generator=gen)
    dy = torch.randn(x.shape, generator=gen) + 100
    y, _ = group_norm_triton(x, make_plan(4, 4), w, b, stats=stats, regime="onchip")
    y.backward(dy)
    mean = (stats.pivot.double() + stats.shifted_mean.double())[:, :, None, None]
    rstd = 1 / torch.sqrt(stats.m2.double() / stats.count.double() + 1e-5)[:, :, None, None]
    x_hat = (x.double() - mean) * rstd
    expected = (dy.double() * x_hat).sum(dim=(0, 2, 3))
    check(w.grad, to_numpy(expected), torch.float32, reduction=2 * 20, what="dweight")


@pytest.mark.parametrize("regime", REGIMES)
def test_regression_relu_passes_the_gradient_at_nan_as_torch_does(regime):
    """relu's derivative at NaN was 0 in the kernels, so dbias dropped a NaN group's dy; torch's
    relu backward, the torch backend and the reference pass it (1)."""
    x = _rand((2, 4, 3), 171)
    x[1, 0, 1] = float("nan")
    w = _rand((4,), 172)
    b = _rand((4,), 173).requires_grad_()
    y, _ = group_norm_triton(x, make_plan(4, 2), w, b, regime=regime, activation="relu")
    y.backward(torch.ones_like(y))
    u = F.group_norm(x.double(), 2, w.double(), b.detach().double())
    expected = (~(u <= 0)).double().sum(dim=(0, 2))
    assert torch.equal(b.grad.double(), expected)


def _float64_group_norm(x, sizes, mean, var, weight, eps=1e-5):
    """silu(x_hat * weight) in float64 torch ops from (N, G) mean and var: independent of both
    backends, differentiable by autograd."""
    index = torch.tensor([g for g, size in enumerate(sizes) for _ in range(size)])
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    mean_c, var_c = (v[:, index].reshape(shape) for v in (mean, var))
    x_hat = (x - mean_c) / torch.sqrt(var_c + eps)
    return torch.nn.functional.silu(x_hat * weight.reshape((1, -1) + (1,) * (x.dim() - 2)))


def _leaf64(t):
    return t.detach().double().requires_grad_()


GRADIENT_BACKENDS = ["torch", *REGIMES]


def _group_norm_on(backend, x, plan, weight, **kw):
    """(y, stats or None) from the torch backend or the Triton op in one regime."""
    if backend == "torch":
        out = groupnorm.group_norm(
            x, weight=weight, group_sizes=list(plan.sizes), backend="torch", **kw
        )
        return out if isinstance(out, tuple) else (out, None)
    return group_norm_triton(x, plan, weight, None, regime=backend, **kw)


@pytest.mark.parametrize("backend", GRADIENT_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_regression_gradients_flow_into_given_statistics(channels_last, backend):
    """Given statistics that require grad get dL/dpivot, dL/dshifted_mean, dL/dm2 and
    dL/dcount, and dx is rstd * dx_hat, on both backends (the Triton op once treated them as
    constants), against float64 autograd of the formula; at an offset of 10 std."""
    plan = GroupPlan((4, 2))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _rand((2, 6, 3, 4), 70, loc=20.0).to(memory_format=fmt).requires_grad_()
    w = _rand((6,), 71, loc=1.0, std=0.5).requires_grad_()
    made = groupnorm.group_stats(_rand((2, 6, 3, 4), 72, loc=20.0), group_sizes=[4, 2])
    fields = [
        getattr(made, f).detach().clone().requires_grad_()
        for f in ("pivot", "shifted_mean", "m2", "count")
    ]
    stats = GroupStats(*fields, plan=plan)
    y, _ = _group_norm_on(backend, x, plan, w, stats=stats, activation="silu")
    dy = _rand((2, 6, 3, 4), 73, loc=0.0, std=1.0)
    y.backward(dy)

    x64, w64, p64, s64, m64, n64 = (_leaf64(t) for t in (x, w, *fields))
    y64 = _float64_group_norm(x64, plan.sizes, p64 + s64, m64 / n64, w64)
    y64.backward(dy.double())
    check(x.grad, to_numpy(x64.grad), torch.float32, what="dx")
    check(w.grad, to_numpy(w64.grad), torch.float32, reduction=24, what="dweight")
    for name, leaf, ref64 in zip(
        ("pivot", "shifted_mean", "m2", "count"), fields, (p64, s64, m64, n64), strict=True
    ):
        check(leaf.grad, to_numpy(ref64.grad), torch.float32, reduction=48, what=f"d{name}")


@pytest.mark.parametrize("backend", GRADIENT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_regression_returned_statistics_are_differentiable_in_x(dtype, backend):
    """Statistics out carry gradients to x through shifted_mean and m2 (the pivot is a detached
    constant) on both backends, added to y's own gradient and rounded once, against float64
    autograd; also when only the statistics enter the loss."""
    plan = GroupPlan((4, 2))
    x = _rand((2, 6, 3, 4), 74, loc=50.0, dtype=dtype).requires_grad_()
    w = _rand((6,), 75, loc=1.0, std=0.5, dtype=dtype)
    y, stats = _group_norm_on(backend, x, plan, w, activation="silu", return_stats=True)
    a, b = (_rand((2, 2), seed, std=1.0) for seed in (76, 77))
    dy = _rand((2, 6, 3, 4), 78, loc=0.0, std=1.0, dtype=dtype)
    for with_y in (True, False):
        x.grad = None
        loss = (stats.shifted_mean * a).sum() + (stats.m2 * b).sum() * 1e-2
        if with_y:
            loss = loss + (y.float() * dy.float()).sum()
        loss.backward(retain_graph=with_y)

        x64 = _leaf64(x)
        index = torch.tensor([0, 0, 0, 0, 1, 1])
        pivot = x64.detach()[:, [0, 4], 0, 0]
        groups = [x64[:, index == g].reshape(2, -1) for g in range(2)]
        mean = torch.stack([v.mean(1) for v in groups], 1)
        m2 = torch.stack([((v - v.mean(1, keepdim=True)) ** 2).sum(1) for v in groups], 1)
        loss64 = ((mean - pivot) * a.double()).sum() + (m2 * b.double()).sum() * 1e-2
        if with_y:
            counts = torch.tensor([48.0, 24.0], dtype=torch.float64, device=x64.device)
            y64 = _float64_group_norm(x64, plan.sizes, mean, m2 / counts, w.double())
            loss64 = loss64 + (y64 * dy.double()).sum()
        loss64.backward()
        check(x.grad, to_numpy(x64.grad), dtype, reduction=48, what=f"dx (y in the loss: {with_y})")


@pytest.mark.parametrize("regime", REGIMES)
def test_backward_op_keeps_channels_last(regime):
    """The backward op writes dx in x's layout (no copy), whatever dy's layout."""
    group_norm_bwd_op, group_norm_fwd_op = kernels.group_norm_bwd_op, kernels.group_norm_fwd_op
    x = _rand((2, 6, 3, 4), 59).to(memory_format=torch.channels_last)
    _, pivot, smean, _, _, rstd = group_norm_fwd_op(
        x, None, None, None, None, [3, 3], 1e-5, None, None, None, None, None, regime
    )
    dx = group_norm_bwd_op(
        _rand((2, 6, 3, 4), 60),
        x,
        None,
        None,
        None,
        None,
        [3, 3],
        pivot,
        smean,
        rstd,
        None,
        False,
        regime,
        False,
        1e-5,
    )[0]
    assert dx.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------ op contracts


def test_eager_calls_launch_directly_and_refuse_double_backward(monkeypatch):
    """Eager calls, forward and backward, skip the custom op (its dispatch alone cost several
    times nn.GroupNorm's whole call); like the op they have no double backward, and say so
    rather than return zero second derivatives."""

    def op(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(kernels, "group_norm_fwd_op", op)
    monkeypatch.setattr(kernels, "group_norm_bwd_op", op)
    x = _rand((2, 6, 3, 4), 80).requires_grad_()
    w = _rand((6,), 81, loc=1.0, std=0.5).requires_grad_()
    y, _ = group_norm_triton(x, make_plan(6, 3), w, None)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


# torch 2.14's opcheck fakes its own clones of the inputs and reads their .grad, which warns
# (torch/_subclasses/meta_utils.py, safe_grad); nothing of ours is involved.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_opcheck_forward_and_backward_ops():
    group_norm_bwd_op, group_norm_fwd_op = kernels.group_norm_bwd_op, kernels.group_norm_fwd_op
    x = _rand((2, 6, 3, 4), 61).to(memory_format=torch.channels_last).requires_grad_()
    w = _rand((6,), 62).requires_grad_()
    scale = _rand((2, 6), 63, loc=0.0, std=0.5).requires_grad_()
    torch.library.opcheck(
        group_norm_fwd_op,
        (x, w, None, scale, None, [4, 2], 1e-5, "silu", None, None, None, None, "split"),
    )
    # The backward op is not itself differentiable (no double backward): plain inputs.
    plain = (x.detach(), w.detach(), None, scale.detach(), None, [4, 2])
    _, pivot, smean, _, _, rstd = group_norm_fwd_op(*plain, 1e-5, "silu", *[None] * 4, "fused")
    torch.library.opcheck(
        group_norm_bwd_op,
        (
            _rand((2, 6, 3, 4), 64),
            *plain,
            pivot,
            smean,
            rstd,
            "silu",
            False,
            "fused",
            True,
            1e-5,
        ),
    )


# inductor's own import of torch.jit warns on torch 2.13; not ours to fix.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) sees the custom op as one node: no graph break, no
    recompile on a second call, same values and gradients as eager (inductor on CPU under the
    interpreter; on CUDA the same test runs the real kernels)."""
    torch._dynamo.reset()
    plan = make_plan(6, 4, uneven=True)

    def f(x, w, b):
        y, _ = group_norm_triton(x, plan, w, b, activation="gelu")
        return (y * 2).sum(), y

    x = _rand((2, 6, 3, 5), 65).to(memory_format=torch.channels_last).requires_grad_()
    w, b = _rand((6,), 66).requires_grad_(), _rand((6,), 67).requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    loss_c, y_c = compiled(x, w, b)
    grads_c = torch.autograd.grad(loss_c, (x, w, b))
    loss_e, y_e = f(x, w, b)
    grads_e = torch.autograd.grad(loss_e, (x, w, b))
    assert torch.equal(y_c, y_e) and y_c.stride() == y_e.stride()
    for gc, ge in zip(grads_c, grads_e, strict=True):
        assert torch.equal(gc, ge)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x.detach().clone().requires_grad_(), w, b)


def test_autocast_runs_in_the_input_dtype():
    """The op has no autocast rule: under autocast it runs in x's own dtype (fp32 statistics
    inside either way), unlike torch.group_norm, which autocast casts to float32."""
    plan = make_plan(6, 3)
    for dtype in (torch.float32, torch.bfloat16):
        x = _rand((2, 6, 4, 4), 68, dtype=dtype)
        with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
            y, _ = group_norm_triton(x, plan, regime="fused")
        assert y.dtype == dtype
        check(y, _reference(x, plan)[0], dtype, what=f"y under autocast ({dtype})")


# --------------------------------------------------------------- 64-bit indexing, heuristics


@pytest.mark.parametrize("regime", REGIMES)
def test_int64_index_path(monkeypatch, regime):
    """The IDX64 kernels (used above 2^31 elements) on a small tensor: lower the threshold.
    Channels-last with an uneven plan, and in the fused and split regimes channels-last runs of
    groups (2 fp16 channels, 4 bytes: runs of 4) and NCHW rows of 15 fp16 elements (flat)."""
    monkeypatch.setattr(kernels, "_INT32_MAX", 16)
    kernels._launch.cache_clear()  # launch decisions are cached: none made at the real limit
    cl = torch.channels_last
    try:
        for C, plan, fmt in (
            (6, make_plan(6, 4, uneven=True), cl),
            (8, make_plan(8, 4), cl),
            (6, make_plan(6, 2), torch.contiguous_format),
        ):
            x = _rand((2, C, 3, 5), 70, dtype=torch.float16).to(memory_format=fmt)
            _backward_case(
                x,
                plan,
                regime=regime,
                dtype=torch.float16,
                activation="relu",
                has_scale=True,
                has_shift=True,
            )
    finally:
        kernels._launch.cache_clear()


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a GPU with > 10 GB: the interpreter cannot run 2^31 elements",
)
def test_more_than_2_31_elements_against_chunked_float64():
    """fp16 1 x 64 x 8192 x 4200 (2.2e9 elements): statistics and output checked per group
    against float64 computed group by group (a whole float64 copy would need 17 GB)."""
    x = torch.randn((1, 64, 8192, 4200), dtype=torch.float16, device="cuda")
    plan = make_plan(64, 8)
    y, stats = group_norm_triton(x, plan, return_stats=True)
    for g in range(8):
        xg = x[0, 8 * g : 8 * (g + 1)].double()
        mean, var = xg.mean(), xg.var(correction=0)
        assert abs(stats.mean[0, g].item() - mean.item()) < 1e-5
        assert abs(stats.var[0, g].item() / var.item() - 1) < 1e-5
        expected = (xg - mean) / torch.sqrt(var + 1e-5)
        # the table's half-precision rule, evaluated on the GPU: twice the exactly rounded
        # result's error plus atol
        allowed = 2 * (expected.half().double() - expected).abs() + ATOL[torch.float16]
        excess = (y[0, 8 * g : 8 * (g + 1)].double() - expected).abs() - allowed
        assert excess.max().item() <= 0, f"group {g}: error above the fp16 tolerance"
        del xg, expected


def test_launch_heuristics_are_consistent():
    from groupnorm.triton import heuristics as h

    H100_SMS = 132
    # ResNet b32 (8 x 3136-element groups): on chip forward; backward holds half the tile, and
    # 1024 (sample, group) pairs fill the GPU: fused. VAE decode at batch 1 (N*G = 32,
    # 262 K-element groups): split into enough chunks to give every SM several programs.
    resnet = dict(even=True, elem_bytes=2)
    assert h.choose_config(32, 56 * 56, 8, 32, False, H100_SMS, **resnet).regime == "onchip"
    bwd = h.choose_config(32, 56 * 56, 8, 32, False, H100_SMS, direction="bwd", **resnet)
    assert bwd.regime == "fused"
    vae = h.choose_config(1, 512 * 512, 4, 32, False, H100_SMS)
    assert vae.regime == "split" and vae.chunks * 32 >= H100_SMS
    for cfg, L in (
        (vae, 512 * 512),
        (h.choose_config(1, 35, 6, 2, True, 1, "split"), 35),
        (h.choose_config(2, 20 * 256 * 256, 4, 32, True, H100_SMS), 20 * 256 * 256),
    ):
        assert cfg.block_c * cfg.block_l <= h.TILE
        assert cfg.chunk_l % cfg.block_l == 0, "chunks are whole tiles"
        assert (cfg.chunks - 1) * cfg.chunk_l < L <= cfg.chunks * cfg.chunk_l, "chunks cover L"
        assert cfg.chunks <= h.MAX_CHUNKS
    assert h.choose_config(1, 35, 6, 2, True, 1, "split").chunks > 1, "forced split splits"
    with pytest.raises(ValueError, match="regime"):
        h.choose_config(1, 35, 6, 2, True, 1, "fast")


@given(
    N=st.integers(1, 64),
    G=st.integers(1, 64),
    cg=st.integers(1, 64),
    L=st.integers(1, 1 << 20),
    channels_fast=st.booleans(),
    elem_bytes=st.sampled_from([2, 4]),
)
def test_wave_plans_cover_every_row_and_position(N, G, cg, L, channels_fast, elem_bytes):
    """A wave plan, forward and backward, covers every (sample, group) row and every position
    with whole-tile chunks, keeps a wave within wave_bytes (unless one row alone is larger: then
    a wave is one row), chunks near WAVE_TICKET_BYTES (at most MAX_CHUNKS a row), a persistent
    grid of at most WAVE_PROGRAMS_PER_SM per SM."""
    from groupnorm.triton import heuristics as h

    rows, row_bytes = N * G, cg * L * elem_bytes
    for direction in ("fwd", "bwd"):
        cfg = h.choose_config(
            N, L, cg, G, channels_fast, 132, "wave", elem_bytes=elem_bytes, direction=direction
        )
        assert cfg.regime == "wave"
        assert cfg.block_c * cfg.block_l <= h.TILE and cfg.chunk_l % cfg.block_l == 0
        assert (cfg.chunks - 1) * cfg.chunk_l < L <= cfg.chunks * cfg.chunk_l
        assert (cfg.waves - 1) * cfg.wave_rows < rows <= cfg.waves * cfg.wave_rows
        assert cfg.wave_rows == 1 or cfg.wave_rows * row_bytes <= h.wave_bytes(direction)
        chunk_bytes = cg * cfg.chunk_l * elem_bytes
        ticket = max(h.WAVE_TICKET_BYTES, row_bytes / h.MAX_CHUNKS)
        assert cfg.chunks == 1 or chunk_bytes <= 2 * ticket + cg * cfg.block_l * elem_bytes
        assert 1 <= cfg.programs <= h.WAVE_PROGRAMS_PER_SM * 132


def _compile_module(*args: str) -> subprocess.CompletedProcess:
    """Run tests/_triton_compile.py in a subprocess: this process interprets the kernels."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.runtime.jit import JITFunction

    if not hasattr(JITFunction, "_pack_args"):
        pytest.skip("this triton's launch binder differs (written for triton 3.9's _pack_args)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-m", "tests._triton_compile", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=root,
    )


def test_kernels_compile_for_sm90():
    """The real Triton compiler (not the interpreter) accepts every kernel, each with the
    specialization of a real launch of the launchers; see tests/_triton_compile.py."""
    done = _compile_module()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


@pytest.mark.slow
def test_onchip_kernels_at_their_limits_have_no_spills_and_128_bit_accesses():
    """Each on-chip kernel at the largest tile the heuristics give it (ONCHIP_MAX_SLOTS), with
    every epilogue on, NCHW and channels-last, bf16 and fp32, compiled for sm_90 with a real
    launch's specialization: no local memory, ld.global.v4 and st.global.v4 in the PTX."""
    done = _compile_module("--limits")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "no spills, 128-bit accesses at every on-chip limit" in done.stdout


@example(L=63_000, r=63_000 + 4095)
@given(L=st.integers(1, 1 << 17), r=st.integers(0, (1 << 17) + 4096))
def test_flat_channel_index_is_exact_where_the_heuristics_allow_flat(L, r):
    """_normalize_flat finds r // L as (r * ceil(2^32 / L)) >> 32 for r < TILE + L; the
    heuristics allow the flat layout only where (TILE + L) * L < 2^32, where that is exact."""
    from groupnorm.triton import heuristics as h

    assume((h.TILE + L) * L < 2**32 and r < h.TILE + L)
    assert (r * -(-(1 << 32) // L)) >> 32 == r // L


@pytest.mark.parametrize("regime", ["fused", "split", "wave"])
def test_flat_forward_serves_nchw_rows_that_are_not_16_byte_multiples(regime, poisoned_outputs):
    """Rows of 35 bf16 elements (70 bytes), and (N, C) inputs (rows of one element): the loop
    regimes' forward reads each group flat (an even plan, NCHW), with every epilogue, into
    poisoned buffers; an uneven plan and channels-last keep the 2-D tiles. Both against
    float64."""
    for shape, plan, channels_last, flat in (
        ((2, 8, 5, 7), make_plan(8, 2), False, True),
        ((3, 40), make_plan(40, 1), False, True),
        ((2, 11, 5, 7), make_plan(11, 3, uneven=True), False, False),
        ((2, 8, 5, 7), make_plan(8, 2), True, False),
    ):
        C = shape[1]
        x = _rand(shape, 160, dtype=torch.bfloat16)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w, b = _rand((C,), 161, loc=1.0, std=0.5), _rand((C,), 162)
        scale, shift = (_rand((shape[0], C), s, loc=0.0, std=0.5) for s in (163, 164))
        kw = dict(activation="gelu", scale=scale, shift=shift)
        y, stats = _run(x, plan, w, b, regime=regime, return_stats=True, **kw)
        has = (True, True, True, True)
        cfg = kernels._launch(
            "fwd", tuple(x.shape), x.stride(), None, x.dtype, x.device, plan.sizes, regime, has,
            "gelu",
        ).cfg  # fmt: skip
        assert cfg.flat == flat, (shape, channels_last, cfg)
        expected, cache = _reference(x, plan, w, b, **kw)
        check(y, expected, torch.bfloat16, what=f"y (flat={flat})")
        check(stats.mean, cache.mean, torch.float32, what="mean")
        check(stats.var, cache.var, torch.float32, what="var")


@pytest.mark.parametrize("regime", ["fused", "split", "wave"])
def test_flat_backward_serves_nchw_rows_that_are_not_16_byte_multiples(regime, poisoned_outputs):
    """Rows of 35 bf16 elements (70 bytes), of 9 float32 ones, and (N, C) inputs: the loop
    regimes' backward sums each channel through 16-byte-aligned windows and writes dx flat (an
    even plan, NCHW x and dy); an uneven plan, channels-last, and a channels-last dy keep the
    2-D tiles. Every gradient against float64, into poisoned buffers."""
    nchw = torch.contiguous_format
    for shape, plan, fmt, dy_fmt, flat, dtype, activation in (
        ((2, 8, 5, 7), make_plan(8, 2), nchw, nchw, True, torch.bfloat16, "gelu"),
        ((3, 12, 3, 3), make_plan(12, 3), nchw, nchw, True, torch.float32, None),
        ((3, 40), make_plan(40, 1), nchw, nchw, True, torch.bfloat16, "silu"),
        ((2, 11, 5, 7), make_plan(11, 3, uneven=True), nchw, nchw, False, torch.bfloat16, None),
        ((2, 8, 5, 7), make_plan(8, 2), torch.channels_last, nchw, False, torch.bfloat16, None),
        ((2, 8, 5, 7), make_plan(8, 2), nchw, torch.channels_last, False, torch.bfloat16, None),
    ):
        x = _rand(shape, 165, dtype=dtype).to(memory_format=fmt)
        dy_strides = torch.empty(shape).to(memory_format=dy_fmt).stride()
        cfg = kernels._launch(
            "bwd", tuple(x.shape), x.stride(), dy_strides, x.dtype, x.device, plan.sizes, regime,
            (True, True, True, True), activation,
        ).cfg  # fmt: skip
        assert cfg.flat == flat, (shape, fmt, dy_fmt, cfg)
        if dy_fmt is nchw:  # _backward_case's dy is NCHW
            _backward_case(
                x, plan, regime=regime, dtype=dtype, param_dtype=torch.float32,
                activation=activation, has_scale=True, has_shift=True,
            )  # fmt: skip


@pytest.mark.slow
def test_loop_kernels_have_128_bit_accesses_and_no_spills():
    """The fused, split and wave kernels compiled for sm_90 (tests/_triton_compile.py
    LOOP_CASES): R50-GN C5's NCHW rows of 950 elements read flat, and channels-last groups of 8
    channels with their channels known to the compiler, load x (and dy) and store y (and dx) 128
    bits at a time, with no local memory. Before, both were 16-bit accesses in 136-255
    registers, and the channels-last dx kernel spilled 40 B."""
    done = _compile_module("--loops")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "no spills, 128-bit accesses in the loop kernels" in done.stdout


def test_bench_pipeline_checks_and_times_on_a_tiny_shape():
    """groupnorm.bench.run end to end where there is no GPU: the interpreter runs ours, the
    timer is a CPU clock. Checks correctness gating and the row contents, not speed."""
    import time

    from groupnorm import bench

    def cpu_timer(fn, graph, reps):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        return elapsed, elapsed, elapsed

    shape = bench.Shape("tiny", 2, 8, (3, 5), G=4, dtype=torch.bfloat16)
    names = ("ours", "ours-wave", "torch", "cudnn-batchnorm")
    rows = bench.run(
        [shape],
        bench.LAYOUTS,
        bench.DIRECTIONS,
        [p for p in bench.PROVIDERS if p.name in names],
        timer=cpu_timer,
        device=DEVICE,
        reps=1,
        copy_bw=1e9,
        echo=lambda line: None,
    )
    assert len(rows) == 2 * 2 * len(names)
    for row in rows:
        assert "error" not in row, row
        assert row["bytes"] == bench.bytes_moved(shape, row["direction"])
        assert row["median_us"] > 0 and row["cuda_graph"]


# ------------------------------------------------------- poisoned outputs, wide channels-last


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every float buffer the launchers allocate (outputs, statistics, partials) starts as NaN,
    so an element a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda *a, **k: poison(real_new_empty(*a, **k)))


@pytest.mark.parametrize("regime", REGIMES)
def test_channels_last_groups_wider_than_64_channels(regime, poisoned_outputs):
    """Groups of 72 channels (more than one 64-channel block of the older kernels) in
    channels-last bf16, forward and backward, into NaN-poisoned buffers."""
    x = _rand((2, 144, 3, 4), 80, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    _backward_case(
        x,
        make_plan(144, 2),
        regime=regime,
        dtype=torch.bfloat16,
        param_dtype=torch.float32,
        activation="silu",
        has_scale=True,
    )


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_runs_of_groups_and_uneven_plans_poisoned(channels_last, regime, poisoned_outputs):
    """Several groups per on-chip program (Cg = 10 bf16 rows are widened to 4 groups), an
    uneven plan, and G = C, with every output buffer poisoned."""
    for C, plan in ((40, make_plan(40, 4)), (11, make_plan(11, 3, uneven=True)), (8, None)):
        plan = plan or make_plan(C, C)
        x = _rand((2, C, 3, 3), 81 + C, dtype=torch.bfloat16)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        _backward_case(x, plan, regime=regime, dtype=torch.bfloat16, param_dtype=torch.float32)


@given(
    N=st.integers(1, 64),
    G=st.integers(1, 64),
    cg=st.integers(1, 160),
    L=st.integers(1, 1 << 20),
    elem_bytes=st.sampled_from([2, 4]),
    regime=st.sampled_from(["auto", "fused", "split", "wave"]),
    direction=st.sampled_from(["fwd", "bwd"]),
)
@example(N=2, G=32, cg=1, L=16384, elem_bytes=4, regime="wave", direction="fwd")
def test_channels_last_run_plans(N, G, cg, L, elem_bytes, regime, direction):
    """The loop regimes' channels-last runs (heuristics.loop_run): consecutive groups whose
    channels are a 16-byte multiple, doubled while fewer than RUN_CHANNELS (in a float32
    backward, up to EXACT_RUN_GROUPS groups, in a float32 forward's wave regime up to
    EXACT_WAVE_RUN_GROUPS), only where they divide G and fit one channel block; the plan's tile
    then spans the run, and its chunks cover L (split: in whole tiles)."""
    from groupnorm.triton import heuristics as h

    cfg = h.choose_config(
        N, L, cg, G, True, 132, regime, even=True, elem_bytes=elem_bytes, unit_stride=False,
        direction=direction,
    )  # fmt: skip
    most = {
        ("bwd", 4, regime): h.EXACT_RUN_GROUPS,
        ("fwd", 4, "wave"): h.EXACT_WAVE_RUN_GROUPS,
    }.get((direction, elem_bytes, regime), G)
    gpp = cfg.groups_per_program
    row = cg * elem_bytes
    fewest = h.VECTOR_BYTES // np.gcd(row, h.VECTOR_BYTES)

    def fits(groups: int) -> bool:
        return G % groups == 0 and h.next_pow2(groups * cg) <= h.RUN_MAX_CHANNELS

    if fits(fewest):
        assert gpp % fewest == 0 and fits(gpp) and (gpp * row) % h.VECTOR_BYTES == 0
        assert gpp == fewest or (gpp // 2) * cg < h.RUN_CHANNELS, "no wider than needed"
        assert gpp <= max(most, fewest)
        assert gpp * cg >= h.RUN_CHANNELS or not fits(2 * gpp) or 2 * gpp > most, (
            "as wide as G allows"
        )
        assert gpp == 1 or cfg.block_c >= gpp * cg, "one channel block spans the run"
    else:
        assert gpp == 1
    assert cfg.block_c * cfg.block_l <= h.TILE
    assert cfg.regime == "fused" or cfg.chunk_l % cfg.block_l == 0, "chunks of whole tiles"
    assert (cfg.chunks - 1) * cfg.chunk_l < L <= cfg.chunks * cfg.chunk_l
    assert h.loop_run(cg, G, False, True, elem_bytes) == 1, "uneven plans have no runs"
    assert h.loop_run(cg, G, True, False, elem_bytes) == 1, "NCHW has no runs"


# channels-last even plans whose groups are not 16-byte multiples:
# (shape, G, dtype, runs of, activation). float32 without an activation: with SiLU, scale and
# shift, this input's dscale is ill-conditioned enough that torch's own float32 reaches 99 % of
# the static bound, and the per-group kernels 104 % (the run kernels give the same bits).
RUN_CASES = {
    "bf16-cg10-runs-of-4": ((2, 40, 9, 11), 4, torch.bfloat16, 4, "silu"),
    "fp16-cg30-runs-of-4": ((1, 240, 5, 6), 8, torch.float16, 4, "silu"),
    "fp32-cg6-runs-of-2": ((3, 12, 7, 5), 2, torch.float32, 2, None),
    "bf16-cg1-instancenorm-runs-of-32": ((2, 64, 3, 5), 64, torch.bfloat16, 32, "silu"),
}


@pytest.mark.parametrize("regime", ["fused", "split", "wave"])
@pytest.mark.parametrize("case", list(RUN_CASES))
def test_channels_last_runs_match_float64(case, regime, poisoned_outputs):
    """The fused, split and wave regimes read channels-last groups of 20, 60, 24 and 2 bytes as
    runs of groups (programs, or wave tickets' rows, of GPP groups): forward with every epilogue
    and the statistics, backward into every gradient, and a forward from given statistics, all
    into poisoned buffers, against float64. The split regime merges several chunks."""
    shape, G, dtype, gpp, activation = RUN_CASES[case]
    x = _rand(shape, 170, dtype=dtype).to(memory_format=torch.channels_last)
    plan = make_plan(shape[1], G)
    sizes, has = plan.sizes, (True, True, True, True)
    for direction in ("fwd", "bwd"):
        dy_strides = None if direction == "fwd" else x.stride()
        cfg = kernels._launch(
            direction, tuple(x.shape), x.stride(), dy_strides, x.dtype, x.device, sizes, regime,
            has, activation,
        ).cfg  # fmt: skip
        assert cfg.regime == regime and cfg.groups_per_program == gpp, cfg
        assert regime != "split" or cfg.chunks > 1
    with count_traffic() as launches:
        _backward_case(
            x, plan, regime=regime, dtype=dtype, param_dtype=torch.float32,
            activation=activation, has_scale=True, has_shift=True,
        )  # fmt: skip
    if INTERPRET:
        for t in launches:
            if "param" not in t.kernel:  # every other launch takes runs of gpp groups
                assert t.options.get("GPP") == gpp, t
                assert regime == "wave" or t.grid[0] == shape[0] * G // gpp, t
    w, b = _rand((shape[1],), 171), _rand((shape[1],), 172)
    y, stats = _run(x, plan, w, b, regime=regime, return_stats=True)
    expected, cache = _reference(x, plan, w, b)
    check(y, expected, dtype, what="y")
    check(stats.mean, cache.mean, torch.float32, what="mean")
    check(stats.var, cache.var, torch.float32, what="var")
    again, _ = _run(x, plan, w, b, regime=regime, stats=stats)
    check(again, expected, dtype, what="y from given statistics")
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_float32_wave_forward_takes_runs_of_sixteen_one_channel_groups(poisoned_outputs):
    """A float32 forward in the wave regime reads one-channel channels-last groups in runs of
    EXACT_WAVE_RUN_GROUPS (16; 32 spilled its float64 merges), the fused and split regimes in
    runs of 32: y and the statistics against float64, with each group's pivot (a zero of
    padding) far out in it."""
    x = _rand((2, 64, 6, 7), 173, loc=300.0, std=0.01)
    x[:, :, 0, 0] = 0.0
    x = x.to(memory_format=torch.channels_last)
    plan = make_plan(64, 64)
    w, b = _rand((64,), 174, loc=2.5, std=0.3), _rand((64,), 175)
    expected, cache = _reference(x, plan, w, b)
    for regime, gpp in (("wave", 16), ("fused", 32), ("split", 32)):
        cfg = kernels._launch(
            "fwd", tuple(x.shape), x.stride(), None, x.dtype, x.device, plan.sizes, regime,
            (True, True, False, False), None,
        ).cfg  # fmt: skip
        assert (cfg.regime, cfg.groups_per_program) == (regime, gpp), cfg
        y, stats = _run(x, plan, w, b, regime=regime, return_stats=True)
        check(y, expected, torch.float32, what=f"{regime} y")
        check(stats.mean, cache.mean, torch.float32, what=f"{regime} mean")
        check(stats.var, cache.var, torch.float32, reduction=42, what=f"{regime} var")


# ------------------------------------------------------------- traffic and launch counts


def _traffic_case(shape, G, *, channels_last, regime, affine=True):
    x = _rand(shape, 90, dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = _rand((shape[1],), 91).requires_grad_() if affine else None
    with count_traffic() as fwd:
        y, _ = group_norm_triton(x, make_plan(shape[1], G), w, None, regime=regime)
    dy = _rand(shape, 92, dtype=torch.bfloat16)
    with count_traffic() as bwd:
        (dx,) = torch.autograd.grad(y, x, dy)
    return x, y, dy, dx, fwd, bwd


@pytest.mark.skipif(not INTERPRET, reason="counts bytes in Triton's interpreter")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_onchip_moves_each_byte_once(channels_last):
    """On chip, forward reads x once and writes y once in one launch; backward reads x and dy
    once and writes dx once, plus one small parameter launch only when there are parameters."""
    for affine in (True, False):
        x, y, dy, dx, fwd, bwd = _traffic_case(
            (2, 40, 6, 5), 4, channels_last=channels_last, regime="onchip", affine=affine
        )
        assert [t.kernel for t in fwd] == ["_gn_fwd_onchip_kernel"]
        assert fwd[0].loaded(x) == x.numel() * 2, "forward reads x exactly once"
        assert fwd[0].stored(y) == y.numel() * 2, "forward writes y exactly once"
        expected = ["_gn_bwd_onchip_kernel"] + (["_gn_bwd_param_kernel"] if affine else [])
        assert [t.kernel for t in bwd] == expected
        main = bwd[0]
        assert main.loaded(x) == x.numel() * 2 and main.loaded(dy) == dy.numel() * 2
        assert main.stored(dx) == dx.numel() * 2
        for t in bwd[1:]:
            assert t.loaded(x) == t.loaded(dy) == t.stored(dx) == 0


@pytest.mark.skipif(not INTERPRET, reason="counts bytes in Triton's interpreter")
def test_split_and_fused_traffic_within_their_stated_passes():
    """The regimes that do not hold a group on chip read x (and dy) at most the passes the
    heuristics state (PASSES), plus one pivot element per group a program holds."""
    from groupnorm.triton import heuristics as h

    # NCHW; channels-last groups of 20 bytes, read as runs of 4 groups; NCHW rows of 35 bf16
    # elements (70 bytes), read flat (backward: at most 2 x 7 extra elements a row and chunk)
    for (shape, G, channels_last), regime in itertools.product(
        (((2, 8, 16, 16), 2, False), ((2, 40, 8, 8), 4, True), ((2, 8, 5, 7), 2, False)),
        ("fused", "split"),
    ):
        x, y, dy, dx, fwd, bwd = _traffic_case(shape, G, channels_last=channels_last, regime=regime)
        runs = {t.options.get("GPP", 1) for t in fwd + bwd if "param" not in t.kernel}
        assert runs == {4 if channels_last else 1}, [(t.kernel, t.options) for t in fwd + bwd]
        flat = {t.options.get("FLAT", False) for t in fwd + bwd if "param" not in t.kernel}
        assert flat == {shape[-1] == 7}
        elems = x.numel()
        pivots = 64  # at most one extra element per (program, group) on these shapes
        chunks = max(t.grid[-1] for t in bwd)
        windows = 14 * shape[0] * shape[1] * chunks if shape[-1] == 7 else 0
        passes = h.PASSES[regime]
        read_x = sum(t.loaded(x) for t in fwd) / 2
        assert elems * passes["fwd"]["x"] <= read_x <= elems * passes["fwd"]["x"] + pivots
        assert sum(t.stored(y) for t in fwd) == 2 * elems
        read_x = sum(t.loaded(x) for t in bwd) / 2
        read_dy = sum(t.loaded(dy) for t in bwd) / 2
        assert read_x <= elems * passes["bwd"]["x"] + windows
        assert read_dy <= elems * passes["bwd"]["dy"] + windows
        assert sum(t.stored(dx) for t in bwd) == 2 * elems
        assert len(fwd) == (1 if regime == "fused" else 2)


@pytest.fixture
def small_waves(monkeypatch):
    """An L2 budget of 10 KB (forward waves of 2 KB, backward of 1.25 KB) and tickets of 256 B:
    the tiny test tensors then take several waves of several chunks (the launch plans are
    cached, so the cache is cleared around)."""
    from groupnorm.triton import heuristics as h

    monkeypatch.setattr(h, "L2_BUDGET", 10240)
    monkeypatch.setattr(h, "WAVE_TICKET_BYTES", 256)
    kernels._launch.cache_clear()
    yield h
    kernels._launch.cache_clear()


# (shape, plan, channels-last, dtype, groups a ticket's row holds, flat backward)
WAVE_CASES = {
    "nchw-bf16-G2": ((2, 8, 16, 16), make_plan(8, 2), False, torch.bfloat16, 1, False),
    "nhwc-fp32-G4-runs-of-4": ((2, 8, 16, 16), make_plan(8, 4), True, torch.float32, 4, False),
    "nhwc-bf16-cg10-runs-of-4": ((2, 40, 8, 8), make_plan(40, 4), True, torch.bfloat16, 4, False),
    "nchw-bf16-rows-of-99-flat": ((3, 8, 9, 11), make_plan(8, 2), False, torch.bfloat16, 1, True),
    "uneven-fp16-odd-L": (
        (3, 11, 5, 7),
        make_plan(11, 3, uneven=True),
        False,
        torch.float16,
        1,
        False,
    ),
    "ndhwc-bf16-G1": ((3, 6, 4, 4, 5), make_plan(6, 1), True, torch.bfloat16, 1, False),
}


def _wave_cfg(x, plan, direction, has, activation):
    dy = x.stride() if direction == "bwd" else None
    return kernels._launch(
        direction, tuple(x.shape), x.stride(), dy, x.dtype, x.device, plan.sizes, "wave", has,
        activation,
    ).cfg  # fmt: skip


@pytest.mark.parametrize("case", list(WAVE_CASES))
def test_wave_schedule_over_several_waves_matches_float64(case, small_waves, poisoned_outputs):
    """The wave kernels' tickets (S0, S1 N0, ..., N(last)) over several waves of several chunks,
    with an epilogue, into NaN-poisoned buffers: y, the statistics and every gradient against
    float64. Rows of groups, of channels-last runs of groups, and a flat NCHW backward."""
    shape, plan, channels_last, dtype, gpp, flat = WAVE_CASES[case]
    x = _rand(shape, 150, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    C = shape[1]
    w, b = _rand((C,), 151, loc=1.0, std=0.5), _rand((C,), 152)
    shift = _rand((shape[0], C), 153, loc=0.0, std=0.5, dtype=dtype)
    with count_traffic() as launches:
        y, stats = _run(
            x, plan, w, b, regime="wave", activation="silu", shift=shift, return_stats=True
        )
    has = (True, True, False, True)
    for direction in ("fwd", "bwd"):
        cfg = _wave_cfg(x, plan, direction, has, "silu")
        assert cfg.regime == "wave" and cfg.waves > 1 and cfg.chunks > 1, (direction, cfg)
    if INTERPRET:
        assert [t.kernel for t in launches] == ["_gn_fwd_wave_kernel"]
    expected, cache = _reference(x, plan, w, b, activation="silu", shift=shift)
    check(y, expected, dtype, what=f"y ({case})")
    check(stats.mean, cache.mean, torch.float32, what="mean")
    check(stats.var, cache.var, torch.float32, what="var")
    assert y.stride() == torch.empty_like(x).stride()
    with count_traffic() as launches:
        _backward_case(
            x, plan, regime="wave", dtype=dtype, param_dtype=torch.float32, activation="silu",
            has_shift=True,
        )  # fmt: skip
    if INTERPRET:
        kinds = [t.kernel for t in launches]
        assert kinds == ["_gn_fwd_wave_kernel", "_gn_bwd_wave_kernel", "_gn_bwd_param_kernel"]
        fwd, bwd = launches[:2]
        assert fwd.options.get("GPP", 1) == bwd.options.get("GPP", 1) == gpp
        assert bwd.options.get("FLAT", False) == flat


@pytest.mark.skipif(not INTERPRET, reason="counts bytes in Triton's interpreter")
@pytest.mark.parametrize(
    "shape, G, channels_last, gpp",
    [
        ((2, 16, 16, 16), 2, False, 1),
        ((2, 64, 8, 8), 2, True, 1),
        ((4, 40, 8, 8), 4, True, 4),  # rows are runs of 4 groups of 20 bytes
    ],
    ids=["nchw", "nhwc", "nhwc-runs"],
)
def test_wave_traffic_and_reuse_distance_within_the_stated_budget(
    shape, G, channels_last, gpp, small_waves
):
    """Forward, one launch reads x twice and writes y once; backward, one launch reads x and dy
    twice and writes dx once (plus the parameter kernel). Between any two reads of an element
    of x (or dy) the schedule touches at most five waves of x's bytes forward, eight backward
    (heuristics.WAVE_STACK: what the waves are sized by), plus the partials and statistics."""
    x, y, dy, dx, fwd, bwd = _traffic_case(shape, G, channels_last=channels_last, regime="wave")
    assert [t.kernel for t in fwd] == ["_gn_fwd_wave_kernel"]
    assert [t.kernel for t in bwd] == ["_gn_bwd_wave_kernel", "_gn_bwd_param_kernel"]
    assert fwd[0].options.get("GPP", 1) == bwd[0].options.get("GPP", 1) == gpp
    rows, elems = shape[0] * G // gpp, x.numel()
    plan, has = make_plan(shape[1], G), (True, False, False, False)
    # at most one pivot element a group, chunk and ticket (S and N)
    pivots = 2 * shape[0] * G * _wave_cfg(x, plan, "fwd", has, None).chunks
    assert elems * 2 <= fwd[0].loaded(x) / 2 <= elems * 2 + pivots, "x read twice"
    assert fwd[0].stored(y) == 2 * elems, "y written once"
    assert bwd[0].loaded(x) == bwd[0].loaded(dy) == 2 * 2 * elems, "x and dy read twice"
    assert bwd[0].stored(dx) == 2 * elems, "dx written once"
    statistics = 1024  # pivots, counters, parameters: a few bytes
    # partials of the three waves a chunk's two reads span: forward (count, mean, m2) a group
    # and chunk, backward (A, B) a channel and chunk
    partial_bytes = {"fwd": 12 * gpp, "bwd": 8 * gpp * (shape[1] // G)}
    bound = {}
    for direction in ("fwd", "bwd"):
        cfg = _wave_cfg(x, plan, direction, has, None)
        assert cfg.waves >= 3, "the case needs waves before and after a middle one"
        wave = cfg.wave_rows * 2 * elems // rows
        assert wave <= small_waves.wave_bytes(direction) or cfg.wave_rows == 1
        partials = 3 * cfg.wave_rows * cfg.chunks * partial_bytes[direction]
        bound[direction] = small_waves.WAVE_STACK[direction] * wave + statistics + partials
    assert fwd[0].reuse_distance(x) <= bound["fwd"]
    assert bwd[0].reuse_distance(x) <= bound["bwd"]
    assert bwd[0].reuse_distance(dy) <= bound["bwd"]


def test_small_shapes_take_one_launch_forward_and_at_most_two_backward():
    """Every spec shape of at most 1 MiB is on chip on an H100: one forward launch, at most two in
    backward (from the launch plan the launchers record; nothing runs)."""
    from tests._triton_compile import launches_of

    small = [((2, 1280, 8, 8), 32), ((2, 320, 8, 8, 8), 32), ((8, 64, 32, 32), 32)]
    for shape, G in small:
        for channels_last in (False, True):
            assert 2 * np.prod(shape) <= 2**20
            kw = dict(channels_last=channels_last)
            assert len(launches_of(shape, G, **kw)) == 1, (shape, channels_last)
            assert len(launches_of(shape, G, backward=True, **kw)) <= 2, (shape, channels_last)


def test_eager_benchmark_times_ours_and_torch_on_every_case(monkeypatch):
    """benchmarks/eager_gpu.py: ours (Triton backend) and nn.GroupNorm on each shape, layout
    and case, a positive time each; here one small shape, one call a sample (interpreted on a
    machine without CUDA, where it only checks that the script runs)."""
    spec = importlib.util.spec_from_file_location(
        "_eager_gpu", Path(__file__).parents[1] / "benchmarks" / "eager_gpu.py"
    )
    assert spec is not None and spec.loader is not None
    eager = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eager)
    monkeypatch.setattr(eager, "SHAPES", [("tiny", (2, 8, 3, 3))])
    monkeypatch.setattr(eager, "G", 4)
    monkeypatch.setattr(eager, "DTYPE", torch.float32)
    monkeypatch.setattr(eager, "CALLS", 1)
    monkeypatch.setattr(eager, "SAMPLES", 1)
    rows = eager.run(torch.device(DEVICE))
    assert [(r["layout"], r["case"]) for r in rows] == [
        ("nchw", "forward"),
        ("nchw", "fwd+bwd"),
        ("channels_last", "forward"),
        ("channels_last", "fwd+bwd"),
    ]
    assert all(r["ours_us"] > 0 and r["nn_groupnorm_us"] > 0 for r in rows)
