"""The "triton" dispatch backend, registered without importing triton.

It serves CUDA tensors whenever triton is importable, and CPU tensors only under
``TRITON_INTERPRET=1`` (Triton's interpreter, for tests) and only when asked for by name
(``backend="triton"``): ``backend="auto"`` keeps CPU tensors on the torch backend, which is
faster there.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable

import torch

from groupnorm.activations import ACTIVATIONS
from groupnorm.backends.torch_ops import params_wrapped
from groupnorm.dispatch import FLOAT_DTYPES, Backend, Request, register_backend
from groupnorm.groups import GroupPlan
from groupnorm.stats import GroupStats

__all__ = ["KERNEL_DTYPES", "PRIORITY", "available", "why_not"]

# Above the composite torch backend (0): on CUDA the kernels are the reason this package exists.
PRIORITY = 10
# x's dtypes the kernels take (float64 goes to the torch backend).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Computed once, kept in plain globals rather than lru_cache: torch.compile traces dispatch,
# and it warns on (and ignores) lru_cache wrappers.
_INSTALLED: bool | None = None
_IMPORT_ERROR: list[str | None] = []


def _installed() -> bool:
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = importlib.util.find_spec("triton") is not None
    return _INSTALLED


def _import_error() -> str | None:
    if not _IMPORT_ERROR:
        try:
            import groupnorm.triton.group_norm  # noqa: F401

            _IMPORT_ERROR.append(None)
        except Exception as e:  # a broken triton install: report it, do not fail dispatch
            _IMPORT_ERROR.append(
                f"triton is installed but the kernels do not import: {type(e).__name__}: {e}"
            )
    return _IMPORT_ERROR[0]


def available() -> str | None:
    """None when the kernels can run on this machine, else why not."""
    if not _installed():
        return "triton is not installed: pip install groupnorm[triton]"
    if not torch.cuda.is_available() and not _interpreting():
        return (
            "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the "
            "kernels slowly on CPU in Triton's interpreter)"
        )
    return _import_error()


def why_not(r: Request) -> str | None:
    """None when the kernels serve this request, else the reason."""
    device = r.x.device.type
    if device == "cpu" and not _interpreting():
        return "CPU tensors run in the Triton kernels only under TRITON_INTERPRET=1"
    if device not in ("cuda", "cpu"):
        return f"tensors on {device}; the Triton kernels take CUDA tensors"
    if torch.onnx.is_in_onnx_export():
        return (
            "an ONNX export is being traced: the torch backend's composite ops export, the "
            "Triton custom op has no ONNX form"
        )
    if params_wrapped(r.weight, r.bias, r.scale, r.shift) and not params_wrapped(r.x):
        return (
            "torch.func transforms the parameters of a captured x: the torch backend's ops serve it"
        )
    if r.x.dtype not in KERNEL_DTYPES:
        return (
            f"x has dtype {r.x.dtype}; the Triton kernels take float32, float16 and bfloat16 "
            "(the torch backend serves float64)"
        )
    return None


def _auto(r: Request) -> bool:
    """backend="auto" picks the kernels for CUDA tensors only (interpreted CPU runs are slow)."""
    return r.x.device.type == "cuda"


def run(r: Request) -> tuple[torch.Tensor, GroupStats | None]:
    from groupnorm.triton.group_norm import group_norm_triton

    return group_norm_triton(
        r.x,
        r.plan,
        r.weight,
        r.bias,
        r.eps,
        activation=r.activation,
        scale=r.scale,
        shift=r.shift,
        stats=r.stats,
        return_stats=r.return_stats,
    )


_PARAM_DTYPES = frozenset(FLOAT_DTYPES)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# groupnorm.triton.group_norm.plain_forward, once the kernels imported.
_PLAIN_FORWARD: list[Callable[..., torch.Tensor | None]] = []


def _fast_param(t: object, C: int, device: torch.device) -> bool:
    """A (C,) floating tensor or Parameter on ``device`` (``type() in``: isinstance on a
    Parameter costs more than the rest together)."""
    if type(t) not in _PLAIN_TENSORS:
        return False
    p: torch.Tensor = t  # type: ignore[assignment]
    return p.dtype in _PARAM_DTYPES and p.shape == (C,) and p.device == device


def fast(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> torch.Tensor | None:
    """The plain call on the kernels with only the checks it needs, or None for the validated
    path: what that path would reject, warn about (one-element groups) or give the torch
    backend (float64) is declined here, and so is every traced call (an ONNX export traces) in
    ``plain_forward``. x is a plain tensor (dispatch checked)."""
    if not x.is_cuda and not (x.is_cpu and _interpreting()):
        return None
    shape = x.shape
    if (
        len(shape) < 2
        or shape[1] != plan.num_channels
        or x.dtype not in KERNEL_DTYPES
        or type(eps) is not float
        or not 0.0 <= eps < math.inf
        or not (activation is None or (type(activation) is str and activation in ACTIVATIONS))
        or not x.numel()  # the validated path serves empty tensors
        or (plan.min_size == 1 and math.prod(shape[2:]) == 1)
    ):
        return None
    device = x.device
    if (weight is not None and not _fast_param(weight, shape[1], device)) or (
        bias is not None and not _fast_param(bias, shape[1], device)
    ):
        return None
    if not _PLAIN_FORWARD:
        if not _installed() or _import_error() is not None:
            return None
        from groupnorm.triton.group_norm import plain_forward

        _PLAIN_FORWARD.append(plain_forward)
    return _PLAIN_FORWARD[0](x, plan, weight, bias, eps, activation)


register_backend(
    Backend(
        name="triton",
        priority=PRIORITY,
        why_not=why_not,
        run=run,
        available=available,
        auto=_auto,
        auto_on_cpu=False,
        fast=fast,
    )
)
