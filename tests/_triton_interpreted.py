"""Triton and the kernels module, imported interpreted when there is no CUDA.

Triton decides when a function is decorated (its own ``tl.*`` helpers at ``import triton``,
ours at import of the kernels) whether it is interpreted, from TRITON_INTERPRET. This sets the
variable for those imports only and restores it, so that other test modules see this machine's
backends as they are; the kernel tests set it again while they run (the triton backend serves
CPU tensors only under TRITON_INTERPRET=1). Skips the importing test module without triton.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set: its functions "
        "are compiled, not interpreted; import tests._triton_interpreted first"
    )

_before = os.environ.get("TRITON_INTERPRET")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    kernels = importlib.import_module("groupnorm.triton.group_norm")
finally:
    if _before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _before
