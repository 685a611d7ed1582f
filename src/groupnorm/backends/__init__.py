"""Backends register themselves with ``groupnorm.dispatch`` on import."""

from groupnorm.backends import torch_ops  # noqa: F401
