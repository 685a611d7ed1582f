"""Float64 NumPy ground truth for GroupNorm and the normalization zoo. No torch import.

Shapes: ``x`` is ``(N, C, *S)`` with ``L = prod(S)`` positions per channel (``S`` may be empty).
For a plan of G groups (``groupnorm.groups``), group ``g`` holds ``C_g`` channels and
``count_g = C_g * L`` elements per sample.

Forward (``c`` a channel of group ``g``; every quantity float64)::

    mean[n,g] = sum_{c in g, l} x[n,c,l] / count_g
    var[n,g]  = sum_{c in g, l} (x[n,c,l] - mean[n,g])^2 / count_g        (biased)
    rstd[n,g] = 1 / sqrt(var[n,g] + eps)
    xhat      = (x - mean[n,g]) * rstd[n,g]
    z         = gamma[c] * xhat + beta[c]
    u         = z * (1 + scale[n,c]) + shift[n,c]          (AdaGroupNorm; identity if absent)
    y         = act(u)                                     (silu | gelu | relu | identity)

Backward, given dy (named intermediates match the code)::

    du        = dy * act'(u)
    dscale    = sum_l du * z          dshift = sum_l du                     (N, C)
    dz        = du * (1 + scale)
    dgamma    = sum_{n,l} dz * xhat   dbeta  = sum_{n,l} dz                 (C,)
    dxhat     = dz * gamma
    dx        = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from groupnorm.groups import GroupPlan, make_plan

__all__ = [
    "Cache",
    "Grads",
    "activation_forward",
    "activation_grad",
    "batch_norm",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm",
    "layer_norm",
    "merge_stats",
    "normalize_over",
]

# Phi(u) = erfc(-u / sqrt 2) / 2: 1 + erf(u / sqrt 2) cancels to nothing for u below -6.
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _unknown(activation: object) -> ValueError:
    return ValueError(f"activation must be one of None, 'silu', 'gelu', 'relu', got {activation!r}")


def activation_forward(u: np.ndarray, activation: str | None) -> np.ndarray:
    """act(u) for None (identity), "silu", "gelu" (the exact erf form, torch's default) and
    "relu": written out here independently of ``groupnorm.activations``, which it checks."""
    if activation is None:
        return u
    if activation == "silu":
        return u / (1.0 + np.exp(-u))
    if activation == "gelu":
        return 0.5 * u * _erfc(-u / math.sqrt(2.0))
    if activation == "relu":
        return np.maximum(u, 0.0)
    raise _unknown(activation)


def activation_grad(u: np.ndarray, activation: str | None) -> np.ndarray:
    """d act(u) / du, elementwise."""
    if activation is None:
        return np.ones_like(u)
    if activation == "silu":
        s = 1.0 / (1.0 + np.exp(-u))
        return s * (1.0 + u * (1.0 - s))
    if activation == "gelu":
        cdf = 0.5 * _erfc(-u / math.sqrt(2.0))
        pdf = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
        return cdf + u * pdf
    if activation == "relu":
        # 0 where u <= 0, else 1: NaN passes the gradient on, as torch's ReLU does
        return np.where(u <= 0, 0.0, 1.0)
    raise _unknown(activation)


@dataclass
class Cache:
    """What the backward needs; ``mean``/``var``/``rstd`` are (N, G), the article's outputs."""

    plan: GroupPlan
    mean: np.ndarray
    var: np.ndarray
    rstd: np.ndarray
    xhat: np.ndarray
    z: np.ndarray
    u: np.ndarray
    gamma: np.ndarray
    scale: np.ndarray | None
    activation: str | None


class Grads(NamedTuple):
    """Gradients of group_norm_forward's inputs; dscale/dshift are None without scale/shift."""

    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray
    dscale: np.ndarray | None
    dshift: np.ndarray | None


def _per_channel(v: np.ndarray, plan: GroupPlan, ndim: int) -> np.ndarray:
    """(N, G) -> (N, C, 1, ..., 1): repeat each group's value over its channels."""
    out = v[:, np.asarray(plan.channel_group)]
    return out.reshape(out.shape + (1,) * (ndim - 2))


def _group_sum(v: np.ndarray, plan: GroupPlan) -> np.ndarray:
    """(N, C, *S) -> (N, G): sum over each group's channels and all positions."""
    per_channel = v.reshape(v.shape[0], v.shape[1], math.prod(v.shape[2:])).sum(axis=2)
    return np.add.reduceat(per_channel, np.asarray(plan.offsets[:-1]), axis=1)


def _real(v: ArrayLike, name: str) -> np.ndarray:
    """v as a float64 array; complex values are refused rather than cast to their real part."""
    if np.iscomplexobj(v):
        raise TypeError(f"{name} must be real, got a complex array")
    return np.asarray(v, dtype=np.float64)


def _checked_x(x: np.ndarray) -> np.ndarray:
    """x (N, C, *S) as float64, with C and every spatial size at least 1 (N may be 0)."""
    x = _real(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial), got shape {x.shape}")
    if 0 in x.shape[1:]:
        raise ValueError(f"x must have at least one channel and position, got shape {x.shape}")
    return x


def _checked_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float | np.floating | np.integer):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


def _sized(v: ArrayLike, shape: tuple[int, ...], name: str) -> np.ndarray:
    """v as float64 of exactly ``shape``: an array that merely has as many elements is refused
    (a (C, N) scale reshaped to (N, C) would be silently wrong)."""
    a = _real(v, name)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    return a


def _vector(v: np.ndarray | None, C: int, fill: float, name: str) -> np.ndarray:
    return np.full(C, fill) if v is None else _sized(v, (C,), name)


def group_norm_forward(
    x: np.ndarray,
    num_groups: int | None = None,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    *,
    group_size: int | None = None,
    group_sizes: Sequence[int] | None = None,
    uneven: bool = False,
    plan: GroupPlan | None = None,
    activation: str | None = None,
    scale: np.ndarray | None = None,
    shift: np.ndarray | None = None,
) -> tuple[np.ndarray, Cache]:
    """GroupNorm of ``x`` (N, C, *S) in float64; returns ``(y, cache)``.

    ``cache.mean`` and ``cache.var`` are the per-(sample, group) statistics, shape (N, G).
    ``gamma``/``beta`` are (C,) (None: 1 and 0); ``scale``/``shift`` are (N, C).
    """
    x = _checked_x(x)
    eps = _checked_eps(eps)
    N, C = x.shape[:2]
    if plan is None:
        plan = make_plan(
            C, num_groups, group_size=group_size, group_sizes=group_sizes, uneven=uneven
        )
    elif (num_groups, group_size, group_sizes, uneven) != (None, None, None, False):
        raise ValueError(
            "plan= takes the place of num_groups, group_size, group_sizes and uneven: "
            "give the plan or those, not both"
        )
    elif plan.num_channels != C:
        raise ValueError(f"plan is for {plan.num_channels} channels, x has {C}")
    count = np.asarray(plan.sizes, dtype=np.float64) * math.prod(x.shape[2:])  # (G,)
    rough = _group_sum(x, plan) / count  # (N, G)
    # One correction pass: a sum at an offset rounds relative to the offset (1e-12 at 1e3 over
    # 35 elements), the deviations from the first estimate relative to the spread. x is
    # centered by both parts in turn: the mean as one float64 number is off by up to half an
    # ulp of the offset, which in xhat is that much of a standard deviation.
    from_rough = x - _per_channel(rough, plan, x.ndim)
    correction = _group_sum(from_rough, plan) / count
    mean = rough + correction
    centered = from_rough - _per_channel(correction, plan, x.ndim)  # (N, C, *S)
    var = _group_sum(centered * centered, plan) / count  # (N, G), two-pass
    rstd = 1.0 / np.sqrt(var + eps)  # (N, G)
    xhat = centered * _per_channel(rstd, plan, x.ndim)  # (N, C, *S)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    g = _vector(gamma, C, 1.0, "gamma").reshape(bshape)
    z = g * xhat + _vector(beta, C, 0.0, "beta").reshape(bshape)  # (N, C, *S)
    u = z
    sc = None
    if scale is not None or shift is not None:
        nshape = (N, C) + (1,) * (x.ndim - 2)
        sc = np.zeros(nshape) if scale is None else _sized(scale, (N, C), "scale").reshape(nshape)
        sh = np.zeros(nshape) if shift is None else _sized(shift, (N, C), "shift").reshape(nshape)
        u = z * (1.0 + sc) + sh
    y = activation_forward(u, activation)
    return y, Cache(plan, mean, var, rstd, xhat, z, u, g, sc, activation)


def group_norm_backward(dy: np.ndarray, cache: Cache) -> Grads:
    """Hand-derived backward of :func:`group_norm_forward` (formulas in the module docstring)."""
    dy = _sized(dy, cache.xhat.shape, "dy")
    plan, ndim = cache.plan, dy.ndim
    spatial = tuple(range(2, ndim))
    du = dy * activation_grad(cache.u, cache.activation)  # (N, C, *S)
    dscale = dshift = None
    dz = du
    if cache.scale is not None:
        dscale = (du * cache.z).sum(axis=spatial)  # (N, C)
        dshift = du.sum(axis=spatial)  # (N, C)
        dz = du * (1.0 + cache.scale)
    dgamma = (dz * cache.xhat).sum(axis=(0,) + spatial)  # (C,)
    dbeta = dz.sum(axis=(0,) + spatial)  # (C,)
    dxhat = dz * cache.gamma  # (N, C, *S)
    count = np.asarray(plan.sizes, dtype=np.float64) * math.prod(dy.shape[2:])
    mean_dxhat = _group_sum(dxhat, plan) / count  # (N, G)
    mean_dxhat_xhat = _group_sum(dxhat * cache.xhat, plan) / count  # (N, G)
    dx = _per_channel(cache.rstd, plan, ndim) * (
        dxhat
        - _per_channel(mean_dxhat, plan, ndim)
        - cache.xhat * _per_channel(mean_dxhat_xhat, plan, ndim)
    )
    return Grads(dx, dgamma, dbeta, dscale, dshift)


def normalize_over(
    x: np.ndarray,
    axes: tuple[int, ...],
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The zoo in one function: statistics over ``axes``, per-channel affine (axis 1).

    Returns ``(y, mean, var)`` with mean/var keeping the reduced axes as size 1.
    """
    x = _checked_x(x)
    eps = _checked_eps(eps)
    rough = x.mean(axis=axes, keepdims=True)
    from_rough = x - rough
    correction = from_rough.mean(axis=axes, keepdims=True)  # as in group_norm_forward
    mean = rough + correction
    centered = from_rough - correction
    var = (centered**2).mean(axis=axes, keepdims=True)
    C = x.shape[1]
    bshape = (1, C) + (1,) * (x.ndim - 2)
    y = centered / np.sqrt(var + eps)
    y = _vector(gamma, C, 1.0, "gamma").reshape(bshape) * y + _vector(beta, C, 0.0, "beta").reshape(
        bshape
    )
    return y, mean, var


def batch_norm(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BatchNorm in training mode: per channel, over N and all positions."""
    return normalize_over(x, (0,) + tuple(range(2, np.ndim(x))), gamma, beta, eps)


def layer_norm(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LayerNorm as in the paper: per sample, over C and all positions (GroupNorm with G = 1)."""
    return normalize_over(x, tuple(range(1, np.ndim(x))), gamma, beta, eps)


def instance_norm(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """InstanceNorm: per sample and channel, over all positions (GroupNorm with G = C)."""
    return normalize_over(x, tuple(range(2, np.ndim(x))), gamma, beta, eps)


def merge_stats(
    mean_a: ArrayLike,
    m2_a: ArrayLike,
    count_a: ArrayLike,
    mean_b: ArrayLike,
    m2_b: ArrayLike,
    count_b: ArrayLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al.'s exact merge of two sets of (mean, M2 = sum of squared deviations, count).

    ``delta = mean_b - mean_a``, ``n = n_a + n_b``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``. Any broadcastable shapes. An empty part
    (count 0) adds nothing, whatever its mean holds: the merge is the other part, and two empty
    parts merge to mean 0, M2 0, count 0.
    """
    ma, mb = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    qa, qb = np.asarray(m2_a, np.float64), np.asarray(m2_b, np.float64)
    na, nb = np.asarray(count_a, np.float64), np.asarray(count_b, np.float64)
    for n_, q_ in ((na, qa), (nb, qb)):
        if not np.all((n_ >= 0) & np.isfinite(n_)):
            raise ValueError("counts must be finite and >= 0")
        if np.any(q_ < 0):
            raise ValueError("m2 must be >= 0 (a sum of squared deviations; NaN passes through)")
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty part: the wheres below
        delta = mb - ma
        mean = ma + delta * nb / n
        m2 = qa + qb + delta * delta * na * nb / n
    mean = np.where(nb == 0, np.where(na == 0, 0.0, ma), np.where(na == 0, mb, mean))
    m2 = np.where(nb == 0, np.where(na == 0, 0.0, qa), np.where(na == 0, qb, m2))
    return mean, m2, n
