"""The module that conversion puts where a library had a norm with its own activation."""

# No `from __future__ import annotations`: torch.fx keeps forward's annotations as its graph's
# input types, and string ones made traced graphs fail to pickle and to script.
from typing import Any

import torch
from torch import nn

from groupnorm.modules import GroupNorm

__all__ = ["GroupNormDropAct", "act_and_drop", "fusible_activation", "why_not_fused"]


def fusible_activation(m: nn.Module) -> str | None:
    """The name our kernels compute ``m`` under ("silu", "relu", "gelu"), or None.

    Exact classes only: a subclass may compute something else. ``inplace=True`` does not
    matter where the activation takes only fused norms' outputs, which nothing else reads; an
    in-place one also applied elsewhere is not moved into a pre-hook (:mod:`.fusion`)."""
    if type(m) is nn.SiLU:
        return "silu"
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.GELU and m.approximate == "none":
        return "gelu"
    return None


def act_and_drop(m: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A timm norm's ``act`` and ``drop`` submodules (nn.Identity where it has none)."""
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    return (
        act if isinstance(act, nn.Module) else nn.Identity(),
        drop if isinstance(drop, nn.Module) else nn.Identity(),
    )


def why_not_fused(act: nn.Module, drop: nn.Module) -> str | None:
    """Why ``act(drop(.))`` after a norm does not run fused in it, or None when it does."""
    if type(drop) is not nn.Identity:
        return f"{drop!r} comes before the activation {act!r}; both kept as modules"
    if type(act) is nn.Identity:
        return "it has no activation (act is nn.Identity)"
    if fusible_activation(act) is None:
        return f"the activation {act!r} is not one the kernels compute; kept as a module"
    return None


class GroupNormDropAct(GroupNorm):
    """``act(drop(group_norm(x)))``: :class:`GroupNorm` with the ``drop`` and ``act``
    submodules of timm's ``BatchNormAct2d`` / ``GroupNormAct``, kept as they were (same objects,
    arguments and state_dict keys).

    Shapes: (N, C, *S) -> (N, C, *S). When ``drop`` is ``nn.Identity`` and ``act`` is one the
    kernels compute (:func:`fusible_activation`), the activation runs fused in the norm; this is
    decided at every call, so replacing ``act`` or ``drop`` later is honoured.
    """

    def __init__(
        self,
        *args: Any,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.activation is not None:
            raise ValueError("GroupNormDropAct takes its activation as the act= module")
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot ask which activation act is: act runs as a module after.
            return self.act(self.drop(self._scripted(input, None)))
        return self._drop_act(input)

    @torch.jit.unused
    def _drop_act(self, input: torch.Tensor) -> torch.Tensor:
        """The eager call: :class:`GroupNorm`'s (its plan, attributes, process group and
        tracing), with the activation fused where it can be."""
        fused = fusible_activation(self.act) if type(self.drop) is nn.Identity else None
        if fused is not None:
            return self._forward(input, fused)
        return self.act(self.drop(self._forward(input, None)))
