"""Fused activations inside the Triton kernels: the jit helpers.

``ACT`` is the code from ``groupnorm.activations.triton_code``, a ``tl.constexpr``, so each
activation compiles to its own kernel with no branch.
"""

import triton
import triton.language as tl

__all__: list[str] = []


@triton.jit
def _act(u, ACT: tl.constexpr):
    """act(u): 0 identity, 1 silu, 2 gelu (exact erf), 3 relu (NaN propagates)."""
    if ACT == 1:
        return u * tl.sigmoid(u)
    elif ACT == 2:
        return 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
    elif ACT == 3:
        return tl.where(u < 0.0, 0.0, u)
    else:
        return u


@triton.jit
def _act_grad(u, ACT: tl.constexpr):
    """d act(u) / du (the first of :func:`_act_grads`)."""
    g1, _ = _act_grads(u, ACT)
    return g1


@triton.jit
def _act_grads(u, ACT: tl.constexpr):
    """(d act / du, d^2 act / du^2), the two sharing their exponential."""
    if ACT == 1:
        s = tl.sigmoid(u)
        return s * (1.0 + u * (1.0 - s)), s * (1.0 - s) * (2.0 + u * (1.0 - 2.0 * s))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        e = tl.exp(-0.5 * u * u)
        return cdf + u * e * 0.3989422804014327, e * 0.3989422804014327 * (2.0 - u * u)
    elif ACT == 3:
        # 1 at NaN, as torch's relu backward (it zeroes where u <= 0 only)
        return tl.where(u <= 0.0, 0.0, 1.0), tl.zeros(u.shape, u.dtype)
    else:
        return tl.full(u.shape, 1.0, tl.float32), tl.zeros(u.shape, u.dtype)
