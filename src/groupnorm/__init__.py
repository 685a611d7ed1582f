"""groupnorm: exact, fast Group Normalization for PyTorch, with a float64 NumPy reference.

Public API::

    group_norm(x, num_groups, weight, bias, eps, *, group_size, group_sizes, uneven,
               activation, scale, shift, stats, return_stats, backend, mask,
               process_group)
    GroupNorm, GroupNormAct                      drop-ins for torch.nn.GroupNorm
    group_stats, merge_stats, GroupStats         statistics as values (tiled normalization)
    make_plan, choose_num_groups, GroupPlan      how channels are split into groups
    available_backends                           which backends run on this machine
    convert_batchnorm, swap_group_norm,          move a model onto GroupNorm (with reports)
    restore_group_norm, WSConv2d                 and Weight Standardization
    groupnorm.tiled.tiled_decode                 exact tiled decoding of a diffusers VAE
    safe_globals                                 classes to allow for torch.load(weights_only)
"""

from groupnorm import backends as _backends  # noqa: F401  (registers the backends)
from groupnorm.convert import (
    ConversionReport,
    SwapReport,
    convert_batchnorm,
    restore_group_norm,
    swap_group_norm,
)
from groupnorm.dispatch import available_backends
from groupnorm.functional import SingleElementGroupWarning, group_norm, group_stats
from groupnorm.groups import GroupChoice, GroupPlan, choose_num_groups, make_plan
from groupnorm.modules import GroupNorm, GroupNormAct
from groupnorm.serialization import safe_globals
from groupnorm.stats import GroupStats, merge_stats
from groupnorm.ws import WSConv2d

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "GroupChoice",
    "GroupNorm",
    "GroupNormAct",
    "GroupPlan",
    "GroupStats",
    "SingleElementGroupWarning",
    "SwapReport",
    "WSConv2d",
    "__version__",
    "available_backends",
    "choose_num_groups",
    "convert_batchnorm",
    "group_norm",
    "group_stats",
    "make_plan",
    "merge_stats",
    "restore_group_norm",
    "safe_globals",
    "swap_group_norm",
]
