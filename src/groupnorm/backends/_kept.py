"""Building the tensors a :class:`groupnorm.GroupPlan` keeps in its ``index_cache``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def plain_tensors() -> Iterator[None]:
    """Factory calls inside make plain tensors, whatever the caller runs under. Plans are
    shared by every module and call, so what one keeps must serve them all: outside inference
    mode (an index built under ``torch.inference_mode()`` is an inference tensor that a later
    training call cannot save for backward) and outside torch.func's transforms (a factory
    call under ``grad`` returns a tensor wrapped at that transform's level, and a later
    transform that meets it fails an internal assert: the level "escaped")."""
    with torch.inference_mode(False), torch._C._DisableFuncTorch():
        yield
