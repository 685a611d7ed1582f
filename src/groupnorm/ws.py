"""Weight Standardization (Qiao et al., 2019): the convolution that pairs with GroupNorm.

GroupNorm removes the dependence on the batch; standardizing each filter of the preceding
convolution smooths the loss landscape further, and GN + WS is the standard recipe for training
with one or two images per device. For each output channel o, over its (in / groups, kh, kw)
weights::

    W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)      (biased variance)

and the layer computes ``conv2d(x, W_hat, bias)``. The stored ``weight`` stays the raw parameter
(so checkpoints and optimizers see an ordinary ``Conv2d``); standardization runs in every forward
and is differentiated through.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from groupnorm.functional import traced_quietly

__all__ = ["WSConv2d", "standardize_weight"]


def standardize_weight(weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per output channel: ``(w - mean) / sqrt(var + eps)`` over all other dimensions.

    ``weight``: (out, in / groups, kh, kw) (any rank >= 2). Computed in float64 for float32
    and float64 weights (float32 for half precision, and on MPS, which has no float64), then
    cast back to the weight's dtype: the
    backward, ``rstd * (dy - mean(dy) - w_hat * mean(dy * w_hat))``, cancels, and in float32
    small filters of small weights got gradients at 10x the float32 bound. A weight tensor is
    small beside the convolution's input, so the wider dtype costs little.
    ``weight`` a dense real floating tensor with elements; ``eps`` a real number > 0 and finite
    (WSConv2d's ``ws_eps`` is checked here, on every forward, so a changed attribute is checked
    too).

    torch.fx.symbolic_trace records a call of it as one node (its checks and dtype choices
    cannot read a Proxy), which runs it on the GraphModule's real weight.
    """
    # Nested: TorchScript skips a block under `if not torch.jit.is_scripting()`, not an `and`.
    if not torch.jit.is_scripting():
        # torch.jit.trace records the element count as a tensor: comparing it warned that the
        # trace "might not generalize", though the traced graph does not depend on it.
        traced_quietly(_check_types, weight, eps)
    if not (eps > 0 and eps < math.inf):
        raise ValueError(f"eps (ws_eps) must be > 0 and finite, got {eps}")
    if weight.dim() < 2:
        raise ValueError(
            f"weight must have an output-channel dimension and at least one more, "
            f"got shape {list(weight.shape)}"
        )
    half = weight.dtype == torch.float16 or weight.dtype == torch.bfloat16
    # MPS has no float64.
    acc = torch.float32 if half or weight.device.type == "mps" else torch.float64
    # One row per filter: TorchScript (WSConv2d in a scripted model) cannot size the tuple of
    # dimensions a reduction over dims 1.. would take.
    rows = weight.to(acc).reshape(weight.shape[0], -1)
    # Shifted by each filter's first weight, as GroupNorm by its pivot: rows - mean in float32 (the
    # half-precision case) rounds relative to |mean|, and a filter whose mean was 50 deviations
    # from 0 came out at 6x the float32 bound.
    rows = rows - rows[:, :1].detach()
    var, mean = torch.var_mean(rows, dim=1, keepdim=True, correction=0)
    return ((rows - mean) * torch.rsqrt(var + eps)).reshape(weight.shape).to(weight.dtype)


# A leaf for torch.fx, as a GroupNorm's call is (modules.fx_group_norm): WSConv2d is no torch.nn
# module, so fx traces its forward, and the weight reaches this function as a Proxy.
torch.fx.wrap("standardize_weight")


def _check_types(weight: object, eps: object) -> None:
    """What standardize_weight's arithmetic would take silently or fail inside: a weight that is
    no dense floating tensor (an int weight came back truncated, a complex one lost its
    imaginary part) or has no element, an eps that is no real number."""
    real = isinstance(eps, int | float | np.integer | np.floating) or (
        isinstance(eps, torch.Tensor) and eps.dim() == 0 and not eps.is_complex()
    )
    if isinstance(eps, bool) or not real or getattr(eps, "dtype", None) == torch.bool:
        raise TypeError(f"eps (ws_eps) must be a real number, got {eps!r}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.layout is not torch.strided or weight.is_nested:
        raise TypeError(f"weight must be a dense tensor, got layout {weight.layout}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor (a real dtype), got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight has no element (shape {list(weight.shape)})")


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose filters are standardized per output channel in every forward.

    Same constructor as ``nn.Conv2d`` plus keyword ``ws_eps`` (default 1e-6: it only guards a
    constant filter; standardized filters are scale-free, so a larger eps would just shrink
    small-variance filters). ``state_dict`` keys are those of ``nn.Conv2d``.
    """

    def __init__(self, *args: object, ws_eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if isinstance(ws_eps, bool) or not isinstance(
            ws_eps, int | float | np.integer | np.floating
        ):
            raise TypeError(f"ws_eps must be a real number, got {ws_eps!r}")
        if not 0 < ws_eps < math.inf:
            raise ValueError(f"ws_eps must be > 0 and finite, got {ws_eps!r}")
        self.ws_eps = float(ws_eps)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, ws_eps: float | None = None) -> WSConv2d:
        """A WSConv2d with ``conv``'s configuration, device, dtype, train/eval mode and a copy
        of its weight and bias. ``conv`` must be an ``nn.Conv2d`` (a WSConv2d keeps its own
        ``ws_eps`` unless one is given)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"WSConv2d.from_conv needs an nn.Conv2d, got {type(conv).__name__}: weight "
                "standardization here is for 2-D convolutions"
            )
        if isinstance(conv.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{type(conv).__name__} is not initialized yet (a lazy conv learns its input "
                "channels from its first forward): run one forward before WSConv2d.from_conv"
            )
        if isinstance(conv, WSConv2d) and ws_eps is None:
            ws_eps = conv.ws_eps
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            ws_eps=1e-6 if ws_eps is None else ws_eps,
        )
        for name in ("weight", "bias"):
            old_p, new_p = getattr(conv, name), getattr(new, name)
            if old_p is not None:
                with torch.no_grad():
                    new_p.copy_(old_p)
                new_p.requires_grad_(old_p.requires_grad)
        new.train(conv.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, standardize_weight(self.weight, self.ws_eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_eps={self.ws_eps}"
