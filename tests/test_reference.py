"""The float64 reference against the worked example of docs/spec.md, torch's float64 ops, and finite
differences (the reference must be checked by something other than itself)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groupnorm import reference as R
from groupnorm.groups import make_plan

ARTICLE_X = np.array([[1.2, 0.4, -0.8, 2.1, 0.9, -0.3, 1.5, -1.1]])


def test_worked_example_g2_matches_spec_digits() -> None:
    y, cache = R.group_norm_forward(ARTICLE_X, 2)
    np.testing.assert_allclose(cache.mean[0], [0.725, 0.25], atol=1e-15)
    np.testing.assert_allclose(cache.var[0], [1.136875, 1.0275], atol=1e-15)
    spec_y = [
        0.44548731,
        -0.30480711,
        -1.43024875,
        1.28956854,
        0.64123959,
        -0.54258735,
        1.23315306,
        -1.33180530,
    ]
    np.testing.assert_allclose(y[0], spec_y, atol=5e-9)


def test_worked_example_g1_is_layer_norm() -> None:
    y, cache = R.group_norm_forward(ARTICLE_X, 1)
    assert cache.mean[0, 0] == pytest.approx(0.4875, abs=1e-15)
    assert cache.var[0, 0] == pytest.approx(1.13859375, abs=1e-15)
    spec_y = [
        0.66772643,
        -0.08200149,
        -1.20659336,
        1.51117033,
        0.38657846,
        -0.73801342,
        0.94887439,
        -1.48774133,
    ]
    np.testing.assert_allclose(y[0], spec_y, atol=5e-9)
    np.testing.assert_allclose(R.layer_norm(ARTICLE_X)[0], y, atol=1e-15)


@pytest.mark.parametrize(
    "shape", [(3, 12, 5, 4), (2, 6, 7), (2, 4, 3, 2, 5)], ids=["4d", "3d", "5d"]
)
def test_zoo_against_torch(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * 3 + 1
    C = shape[1]
    g, b = rng.normal(size=C), rng.normal(size=C)
    xt, gt, bt = (torch.from_numpy(a) for a in (x, g, b))
    np.testing.assert_allclose(
        R.batch_norm(x, g, b)[0],
        F.batch_norm(xt, None, None, gt, bt, training=True).numpy(),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        R.instance_norm(x, g, b)[0], F.instance_norm(xt, weight=gt, bias=bt).numpy(), atol=1e-12
    )
    ln = F.layer_norm(xt, xt.shape[1:]).numpy() * g.reshape((1, C) + (1,) * (x.ndim - 2))
    np.testing.assert_allclose(
        R.layer_norm(x)[0] * g.reshape((1, C) + (1,) * (x.ndim - 2)), ln, atol=1e-12
    )
    for G in (1, 2, C):
        np.testing.assert_allclose(
            R.group_norm_forward(x, G, g, b)[0], F.group_norm(xt, G, gt, bt).numpy(), atol=1e-12
        )
    np.testing.assert_allclose(
        R.group_norm_forward(x, C, g, b)[0], R.instance_norm(x, g, b)[0], atol=1e-12
    )


def test_uneven_groups_equal_per_group_normalization() -> None:
    """An uneven plan is the concatenation of each group normalized on its own."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3, 3))
    y, cache = R.group_norm_forward(x, 3, uneven=True)
    assert cache.plan.sizes == (3, 2, 2)
    start = 0
    for s in cache.plan.sizes:
        part = x[:, start : start + s]
        np.testing.assert_allclose(y[:, start : start + s], R.layer_norm(part)[0], atol=1e-12)
        start += s


def _numeric_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:  # type: ignore[no-untyped-def]
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        hi = f()
        flat[i] = old - h
        lo = f()
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * h)
    return grad


@pytest.mark.parametrize("activation", [None, "silu", "gelu", "relu"])
@pytest.mark.parametrize(
    "plan_kw",
    [{"num_groups": 2}, {"num_groups": 3, "uneven": True}, {"group_sizes": [1, 4, 2]}],
    ids=["even", "uneven", "explicit"],
)
@pytest.mark.parametrize("modulated", [False, True], ids=["plain", "scale_shift"])
def test_backward_matches_finite_differences(
    activation: str | None, plan_kw: dict, modulated: bool
) -> None:
    rng = np.random.default_rng(2)
    C = 7 if "uneven" in plan_kw or "group_sizes" in plan_kw else 6
    x = rng.normal(size=(2, C, 3))
    gamma, beta = rng.normal(size=C), rng.normal(size=C)
    scale = rng.normal(size=(2, C)) if modulated else None
    shift = rng.normal(size=(2, C)) if modulated else None
    w = rng.normal(size=x.shape)

    def loss() -> float:
        y, _ = R.group_norm_forward(
            x, gamma=gamma, beta=beta, activation=activation, scale=scale, shift=shift, **plan_kw
        )
        return float((y * w).sum())

    _, cache = R.group_norm_forward(
        x, gamma=gamma, beta=beta, activation=activation, scale=scale, shift=shift, **plan_kw
    )
    grads = R.group_norm_backward(w, cache)
    np.testing.assert_allclose(grads.dx, _numeric_grad(loss, x), atol=1e-6)
    np.testing.assert_allclose(grads.dgamma, _numeric_grad(loss, gamma), atol=1e-6)
    np.testing.assert_allclose(grads.dbeta, _numeric_grad(loss, beta), atol=1e-6)
    if modulated:
        assert scale is not None and shift is not None
        assert grads.dscale is not None and grads.dshift is not None
        np.testing.assert_allclose(grads.dscale, _numeric_grad(loss, scale), atol=1e-6)
        np.testing.assert_allclose(grads.dshift, _numeric_grad(loss, shift), atol=1e-6)
    else:
        assert grads.dscale is None and grads.dshift is None


def test_merge_stats_equals_whole() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(5, 2, size=(4, 37)), rng.normal(-1, 0.5, size=(4, 11))

    def m(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mu = v.mean(1)
        return mu, ((v - mu[:, None]) ** 2).sum(1), np.full(v.shape[0], v.shape[1], float)

    mean, m2, n = R.merge_stats(*m(a), *m(b))
    whole = np.concatenate([a, b], axis=1)
    np.testing.assert_allclose(mean, whole.mean(1), atol=1e-13)
    np.testing.assert_allclose(m2 / n, whole.var(1), atol=1e-13)
    np.testing.assert_array_equal(n, 48)


def test_empty_batch() -> None:
    y, cache = R.group_norm_forward(np.zeros((0, 6, 3, 3)), 3)
    assert y.shape == (0, 6, 3, 3) and cache.mean.shape == (0, 3)
    grads = R.group_norm_backward(np.zeros((0, 6, 3, 3)), cache)
    assert grads.dx.shape == (0, 6, 3, 3)
    np.testing.assert_array_equal(grads.dgamma, np.zeros(6))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        R.group_norm_forward(np.zeros(8), 2)
    with pytest.raises(ValueError, match="activation"):
        R.activation_forward(np.zeros(2), "tanh")


def test_regression_reference_refuses_arguments_it_would_reinterpret() -> None:
    """Arrays with the right number of elements but the wrong shape were reshaped (a (C, N)
    scale read as (N, C)), a dy of the wrong shape broadcast, plan= overrode num_groups, and a
    bad eps gave NaN or beta: each is now an error that names the argument."""
    x = np.random.default_rng(0).normal(size=(2, 6, 3))
    _, cache = R.group_norm_forward(x, 2)
    for dy in (np.ones((1, 6, 3)), np.ones((2, 6, 1))):
        with pytest.raises(ValueError, match=r"dy has shape .*expected \(2, 6, 3\)"):
            R.group_norm_backward(dy, cache)
    bad: dict[str, Any] = {
        "gamma": np.ones((2, 3)),
        "beta": np.ones(5),
        "scale": np.arange(12.0).reshape(6, 2),
        "shift": np.ones(12),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"{name} has shape"):
            R.group_norm_forward(x, 2, **{name: value})
    for name in ("gamma", "beta"):
        with pytest.raises(ValueError, match=f"{name} has shape"):
            R.layer_norm(x, **{name: np.ones((2, 3))})  # type: ignore[arg-type]
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            R.group_norm_forward(x, 2, eps=eps)
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            R.instance_norm(x, eps=eps)
    for bad_eps in (None, "a", True):
        with pytest.raises(TypeError, match="eps must be a number"):
            R.group_norm_forward(x, 2, eps=bad_eps)  # type: ignore[arg-type]
    plan = make_plan(6, 2)
    for kwargs in ({"num_groups": 3}, {"group_size": 2}, {"uneven": True}):
        with pytest.raises(ValueError, match="plan= takes the place of"):
            R.group_norm_forward(x, plan=plan, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one channel and position"):
        R.group_norm_forward(np.zeros((2, 6, 0)), 2)
    with pytest.raises(TypeError, match="x must be real"):
        R.group_norm_forward(x + 1j, 2)
    for norm in (R.batch_norm, R.layer_norm, R.instance_norm):
        with pytest.raises(ValueError, match="shape"):
            norm(np.zeros(4))


def test_regression_reference_merge_of_empty_parts_adds_nothing() -> None:
    """Two empty parts merged to NaN, and an empty part's NaN mean reached the merge."""
    mean, m2, n = R.merge_stats(0.0, 0.0, 0, 0.0, 0.0, 0)
    assert (float(mean), float(m2), float(n)) == (0.0, 0.0, 0.0)
    mean, m2, n = R.merge_stats(np.nan, np.nan, 0, 2.0, 3.0, 4)
    assert (float(mean), float(m2), float(n)) == (2.0, 3.0, 4.0)
    mean, m2, n = R.merge_stats(2.0, 3.0, 4, np.nan, np.nan, 0)
    assert (float(mean), float(m2), float(n)) == (2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    ("count", "m2", "match"),
    [
        (np.nan, 1.0, "counts must be finite"),
        (np.inf, 1.0, "counts must be finite"),
        (3.0, -5.0, "m2 must be >= 0"),
    ],
)
def test_regression_reference_merge_refuses_impossible_statistics(
    count: float, m2: float, match: str
) -> None:
    """Only negative counts were refused: a NaN count merged to NaN, an infinite one to mean 0
    and m2 NaN, and a negative m2 to a negative one."""
    for a, b in (((1.0, m2, count), (2.0, 1.0, 2.0)), ((2.0, 1.0, 2.0), (1.0, m2, count))):
        with pytest.raises(ValueError, match=match):
            R.merge_stats(*a, *b)


@pytest.mark.parametrize("offset", [1e3, 1e6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_reference_mean_is_exact_at_an_offset(offset: float, seed: int) -> None:
    """The mean was one float64 sum divided by the count: at an offset of 1e3 over groups of
    35 elements it was up to 2 ulp of the offset off (1e-12 in y, where our fused kernel's
    output was 1e-15 from the exact one and failed the float64 bound against the reference).
    Against exact rational arithmetic, the group means and the zoo's are correctly rounded."""
    from fractions import Fraction

    def exact_mean(values: np.ndarray) -> Fraction:
        return sum((Fraction(float(v)) for v in values.ravel()), Fraction(0)) / values.size

    x = np.random.default_rng(seed).normal(offset, 2.0, size=(2, 4, 5, 7))
    _, cache = R.group_norm_forward(x, 2)
    _, mean, _ = R.normalize_over(x, (1, 2, 3))
    half_ulp = Fraction(float(np.spacing(offset))) / 2
    for n in range(2):
        for g in range(2):
            got = Fraction(float(cache.mean[n, g]))
            assert abs(got - exact_mean(x[n, 2 * g : 2 * g + 2])) <= half_ulp
        assert abs(Fraction(float(mean[n, 0, 0, 0])) - exact_mean(x[n])) <= half_ulp


@pytest.mark.parametrize("u", [-9.0, -13.0, -25.0, -0.5, 2.0])
def test_regression_reference_gelu_keeps_the_lower_tail(u: float) -> None:
    """The reference formed Phi(u) as (1 + erf(u / sqrt 2)) / 2, which cancels to nothing
    below u = -6: gelu'(-9) came out as u phi(u) alone, 1.2 % off (found when the CPU kernel's
    GELU derivative, right to 1e-13 there, disagreed with it). Against mpmath at 40 digits."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    x = mp.mpf(u)
    cdf = mp.erfc(-x / mp.sqrt(2)) / 2
    pdf = mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)
    for got, want in (
        (R.activation_forward(np.array([u]), "gelu")[0], x * cdf),
        (R.activation_grad(np.array([u]), "gelu")[0], cdf + x * pdf),
    ):
        assert abs(got - float(want)) <= 1e-12 * abs(float(want))  # u^2 eps of sqrt 2


def test_regression_reference_output_is_exact_far_from_zero() -> None:
    """x was centered by its mean as one float64 number, which is off by up to half an ulp of
    the offset: at a mean of 1e4 and a std of 1e-2 (float64) y was 1.2e-10 from the exact
    result, beyond the float64 bound, and the fused kernel's float64 output matched it.
    Against exact rational arithmetic, group_norm_forward and the zoo now hold 1e-14."""
    from fractions import Fraction

    x = np.random.default_rng(3).normal(1e4, 1e-2, size=(2, 4, 3, 5))
    y, _ = R.group_norm_forward(x, 2)
    y_zoo, _, _ = R.normalize_over(x, (1, 2, 3))

    def exact(values: np.ndarray) -> np.ndarray:
        q = [Fraction(float(v)) for v in values.ravel()]
        mean = sum(q, Fraction(0)) / len(q)
        var = sum(((v - mean) ** 2 for v in q), Fraction(0)) / len(q)
        rstd = 1 / np.sqrt(float(var) + 1e-5)
        return np.array([float(v - mean) * rstd for v in q]).reshape(values.shape)

    for n in range(2):
        for g in range(2):
            want = exact(x[n, 2 * g : 2 * g + 2])
            np.testing.assert_allclose(y[n, 2 * g : 2 * g + 2], want, rtol=0, atol=1e-14)
        np.testing.assert_allclose(y_zoo[n], exact(x[n]), rtol=0, atol=1e-14)


def test_regression_relu_derivative_at_nan_is_torchs() -> None:
    """The reference took relu'(NaN) as 0, torch's ReLU passes the gradient on at NaN (it
    zeroes it only where u <= 0): a NaN group's dbias differed from a drop-in's by the sum of
    its dy. The reference follows torch."""
    u = torch.tensor([float("nan"), 1.0, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    F.relu(u).backward(torch.ones(4, dtype=torch.float64))
    assert u.grad is not None
    np.testing.assert_array_equal(R.activation_grad(u.detach().numpy(), "relu"), u.grad.numpy())
