"""An independent float64 masked GroupNorm: masked elements dropped by boolean indexing."""

from __future__ import annotations

import torch

from groupnorm.groups import GroupPlan


def dropped_reference(
    x: torch.Tensor,
    plan: GroupPlan,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """float64, one group at a time: the statistics of the elements whose weight is > 0 (the
    others are dropped by boolean indexing), weighted by the mask; an all-masked group's x_hat
    is 0. Differentiable by autograd (x must be float64 with requires_grad for gradients)."""
    w = mask.double().expand(x.shape)
    rows = []
    for n in range(x.shape[0]):
        parts = []
        for start, size in zip(plan.offsets, plan.sizes, strict=False):
            xg, wg = x[n, start : start + size], w[n, start : start + size]
            keep = wg > 0
            vals, ws = xg[keep], wg[keep]
            if vals.numel() == 0:
                parts.append(torch.zeros_like(xg))
                continue
            mean = (ws * vals).sum() / ws.sum()
            var = (ws * (vals - mean) ** 2).sum() / ws.sum()
            parts.append((xg - mean) / torch.sqrt(var + eps))
        rows.append(torch.cat(parts))
    y = torch.stack(rows)
    per_channel = (-1,) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(per_channel)
    if bias is not None:
        y = y + bias.double().reshape(per_channel)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y
