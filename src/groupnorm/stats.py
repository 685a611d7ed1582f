"""Per-(sample, group) statistics as a value: compute on parts, merge exactly, normalize with them.

Statistics are kept relative to a per-group *pivot* (one element of the group): with ``x`` near
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

from dataclasses import dataclass

import torch

__all__ = ["GroupStats", "merge_stats"]


@dataclass(frozen=True)
class GroupStats:
    """Pivot-shifted group statistics, every field (N, G) in the accumulation dtype."""

    pivot: torch.Tensor
    shifted_mean: torch.Tensor
    m2: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Absolute mean ``pivot + shifted_mean`` (rounded to the accumulation dtype)."""
        return self.pivot + self.shifted_mean

    @property
    def var(self) -> torch.Tensor:
        """Biased variance ``m2 / count``."""
        return self.m2 / self.count

    def rstd(self, eps: float = 1e-5) -> torch.Tensor:
        """``1 / sqrt(var + eps)``."""
        return torch.rsqrt(self.var + eps)

    @property
    def shape(self) -> torch.Size:
        return self.pivot.shape

    def to(self, device: torch.device | str) -> GroupStats:
        return GroupStats(
            *(t.to(device) for t in (self.pivot, self.shifted_mean, self.m2, self.count))
        )


def merge_stats(a: GroupStats, b: GroupStats) -> GroupStats:
    """Exact merge of the statistics of two disjoint parts of the same groups (Chan et al.).

    Keeps ``a``'s pivot. With ``delta`` the difference of the two means::

        n = n_a + n_b;  shifted_mean = mean_a' + delta * n_b / n
        m2 = m2_a + m2_b + delta^2 * n_a * n_b / n

    computed in float64 (the tensors are (N, G): cheap) so that the pivots' difference is exact.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"cannot merge statistics of shape {tuple(a.shape)} with {tuple(b.shape)}: "
            "both must be (N, G) for the same batch and group plan"
        )
    if a.pivot.device != b.pivot.device:
        raise ValueError(f"statistics on {a.pivot.device} and {b.pivot.device}: move one first")
    dtype = a.pivot.dtype
    f64 = torch.float64
    na, nb = a.count.to(f64), b.count.to(f64)
    delta = (b.pivot.to(f64) - a.pivot.to(f64)) + (b.shifted_mean.to(f64) - a.shifted_mean.to(f64))
    n = na + nb
    shifted_mean = a.shifted_mean.to(f64) + delta * (nb / n)
    m2 = a.m2.to(f64) + b.m2.to(f64) + delta * delta * (na * nb / n)
    return GroupStats(a.pivot, shifted_mean.to(dtype), m2.to(dtype), n.to(dtype))
