"""Model surgery: BatchNorm -> GroupNorm, and torch's (or timm's) GroupNorm -> ours with the
activation fused where a trace proves it safe.

Both functions walk the module tree (:mod:`._walk`), decide everything first (so a bad request
raises before any module is touched), then replace modules, keeping device, dtype, train/eval
mode and shared submodules (one object used at several paths stays one object). Each returns
the model and a report of every decision; by default the model is a deep copy and the argument
is left as it was.

A model wrapped in DistributedDataParallel is refused: DDP has already registered the
parameters it all-reduces, so surgery underneath it would leave it syncing modules that are no
longer in the forward. Convert first, then wrap.
"""

from groupnorm.convert.batchnorm import ConversionReport, Replacement, convert_batchnorm
from groupnorm.convert.fusion import FusedPair
from groupnorm.convert.layers import GroupNormDropAct
from groupnorm.convert.swap import SwapReport, restore_group_norm, swap_group_norm

__all__ = [
    "ConversionReport",
    "FusedPair",
    "GroupNormDropAct",
    "Replacement",
    "SwapReport",
    "convert_batchnorm",
    "restore_group_norm",
    "swap_group_norm",
]
