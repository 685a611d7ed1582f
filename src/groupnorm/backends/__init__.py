"""Backends register themselves with ``groupnorm.dispatch`` on import."""

from groupnorm.backends import compiled, torch_ops  # noqa: F401  (compiled: ops for torch.compile)
from groupnorm.triton import backend as _triton  # noqa: F401  (imports triton only when used)
