"""What ``torch.load(path)`` (``weights_only=True``, torch's default) needs to load a whole
model saved with ``torch.save(model)`` that holds groupnorm's modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from groupnorm.convert.fusion import ActivationPreHook
from groupnorm.convert.layers import GroupNormDropAct
from groupnorm.groups import GroupPlan
from groupnorm.modules import GroupNorm, GroupNormAct
from groupnorm.stats import GroupStats
from groupnorm.ws import WSConv2d

__all__ = ["safe_globals"]


def safe_globals(model: nn.Module | None = None) -> list[Any]:
    """The classes to allow before loading a pickled model:
    ``torch.serialization.add_safe_globals(groupnorm.safe_globals(model))``.

    Always groupnorm's own (the modules, the group plan they hold, the pre-hook that
    :func:`groupnorm.swap_group_norm` may register, saved statistics) and ``nn.Identity``, which
    ``swap_group_norm`` puts where a fused activation was and ``GroupNormDropAct`` holds for an
    absent drop or act (a freshly built model has none); with ``model``, also the class of every
    module in it (torch's and other libraries' modules must be allowed too, and a model built
    the same way as the saved one names them all). Allow only classes you trust: the point of
    ``weights_only`` is that nothing else is constructed.
    """
    ours: list[Any] = [GroupNorm, GroupNormAct, GroupNormDropAct, WSConv2d, GroupPlan, GroupStats]
    ours += [ActivationPreHook, nn.Identity]
    if model is None:
        return ours
    found = {type(m) for m in model.modules()} - set(ours)
    return ours + sorted(found, key=lambda c: (c.__module__, c.__qualname__))
