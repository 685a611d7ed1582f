"""The ONNX translation of ``groupnorm::uneven_onnx``, an uneven layer as one op in the graph
that ``torch.onnx.export(dynamo=True)`` records (:mod:`groupnorm.backends.shifted`).

Imported on the first ONNX export only (it imports onnxscript and a private torch module). The
ATen form of an uneven layer is about 17 ops that the exporter decomposes, translates and
optimizes one by one, 2.6x ``nn.GroupNorm``'s export time for the study's ResNet-20; this
function writes the final nodes directly: the pivot (ReduceMean over the positions, Gather of
each group's first channel, Sub), one Split into the runs of equal groups, per run a Reshape to
rows, an InstanceNormalization and a Reshape back (a run of one-channel groups of an x with
positions: the InstanceNormalization alone), a Concat, and weight and bias as one
BatchNormalization with mean 0, variance 1 and eps 0.

The registration goes through torch's private torchlib registry
(``torch.onnx._internal.exporter._torchlib._torchlib_registry.onnx_impl``): torch has no
public way to add a translation to every export. :func:`register` raises ImportError,
AttributeError or TypeError when that registry moved or changed, and the caller then keeps the
ATen form.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from groupnorm.backends.shifted import first_channels, runs_of


def uneven_onnx(x: Any, weight: Any, bias: Any, runs: list[int], eps: float) -> Any:
    """The ONNX nodes of ``groupnorm::uneven_onnx`` (x: (N, C, *S), ranks 2-5, float32 or
    float64; runs flattened as start, end, size triples). Sizes other than C may be dynamic:
    the rows' Reshape copies N (0) and infers the length (-1), the Reshape back takes the run's
    own shape."""
    import numpy as np
    from onnxscript import opset18 as op
    from torch.onnx._internal._lazy_import import onnx_ir as ir

    plan = runs_of(runs)
    rank = len(x.shape)
    dtype = x.dtype.numpy()

    def constant(values: list[float]) -> Any:
        # An IR tensor: what the exporter's builder takes (typed as a TensorProto).
        return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))  # type: ignore[arg-type]

    def ints(values: list[int]) -> Any:
        return op.Constant(value_ints=values)

    means = op.ReduceMean(x, ints(list(range(2, rank))), keepdims=1) if rank > 2 else x
    pivot = op.Gather(means, ints(first_channels(plan)), axis=1)
    xs = op.Sub(x, pivot)
    widths = [end - start for start, end, _ in plan]
    # The builder asks num_outputs of a Split to count its outputs; ONNX forbids it next to the
    # split sizes, so the attribute comes off the node once it is recorded.
    parts = op.Split(xs, ints(widths), axis=1, num_outputs=len(plan))
    split = parts[0].producer()
    assert split is not None
    split.attributes.pop("num_outputs")
    outs = []
    for xr, (start, end, size) in zip(parts, plan, strict=True):
        width = end - start
        if size == 1 and rank > 2:
            # One-channel groups: the run's instances are its channels.
            ones, zeros = constant([1.0] * width), constant([0.0] * width)
            outs.append(op.InstanceNormalization(xr, ones, zeros, epsilon=eps))
            continue
        G = width // size
        outs.append(_rows_normalized(op, ints, constant, x, xr, G, size, eps))
    y = op.Concat(*outs, axis=1)
    if weight is None and bias is None:
        return y
    C = runs[-2]
    zeros, ones = constant([0.0] * C), constant([1.0] * C)
    weight = ones if weight is None else weight
    bias = zeros if bias is None else bias
    return op.BatchNormalization(y, weight, bias, zeros, ones, epsilon=0.0)


def _rows_normalized(
    op: Any, ints: Any, constant: Any, x: Any, xr: Any, G: int, size: int, eps: float
) -> Any:
    """A run xr (N, G * size, *S) of x normalized as G rows of each sample: Reshape to (N, G,
    size * prod(S)), InstanceNormalization, Reshape back to xr's shape. The rows' length is
    given, not inferred (-1), and N inferred: a batch of 0 has nothing to infer a length from
    (onnxruntime refused [0, G, -1] on 0 elements). Dynamic positions: the length from x's
    shape (a Split's outputs carry none)."""
    S = list(x.shape)[2:]
    if all(isinstance(d, int) for d in S):
        length = size
        for d in S:
            length *= d
        target = ints([-1, G, length])
    else:
        positions = op.ReduceProd(op.Shape(x, start=2), keepdims=1)
        length = op.Mul(positions, ints([size]))
        target = op.Concat(op.Shape(x, start=0, end=1), ints([G]), length, axis=0)
    rows = op.Reshape(xr, target)
    ones, zeros = constant([1.0] * G), constant([0.0] * G)
    y = op.InstanceNormalization(rows, ones, zeros, epsilon=eps)
    return op.Reshape(y, op.Shape(xr))


def register() -> bool:
    """Whether this export may record ``groupnorm::uneven_onnx``: its translation registered in
    torch's private torchlib registry, which the registry of every later export copies, and in
    the registry of the export now tracing, which ``torch.onnx.export`` built from it before
    tracing (so the first export needs it too). False, for the ATen form, where this export's
    registry cannot be found (a caller other than ``torch.onnx.export``, or torch moved it)."""
    from torch.onnx._internal.exporter import _registration
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    target = torch.ops.groupnorm.uneven_onnx.default
    meta = _meta(_torchlib_registry._registry, target)
    if meta is None:
        _torchlib_registry.onnx_impl(target, no_compile=True)(uneven_onnx)
        meta = _meta(_torchlib_registry._registry, target)
        if meta is None:
            return False
    registry = _export_registry(_registration.ONNXRegistry)
    if registry is None:
        return False
    if registry is _BUILT_LATER:
        return True
    if not registry.is_registered(target):
        registry._register(target, meta)
    return bool(registry.is_registered(target))


_BUILT_LATER = object()


def _meta(metas: list[Any], target: Any) -> Any:
    for meta in metas:
        if meta.fx_target is target:
            return meta
    return None


def _export_registry(kind: type) -> Any:
    """The registry of the ONNX export now tracing: ``registry`` of the
    ``torch.onnx._internal.exporter._core.export`` call on the stack (``_BUILT_LATER`` where it
    is None: that export builds it from the torchlib registry after tracing), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "export" and frame.f_globals.get("__name__", "").endswith(
            "exporter._core"
        ):
            registry = frame.f_locals.get("registry")
            if registry is None:
                return _BUILT_LATER
            return registry if isinstance(registry, kind) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None
