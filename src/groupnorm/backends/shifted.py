"""Group norm as torch's kernel on pivot-shifted input: exact, branch-free and scriptable.

With ``first[c]`` the first channel of channel c's group::

    xs = x - mean(x[n, first[c]])            (accumulation dtype: float32, float64 for float64 x)
    y  = act((group_norm(xs) * weight + bias) * (1 + scale) + shift)   rounded once to x's dtype

the kernel running once per run of equal-size groups (once for an even plan). Each group's
pivot is the mean of its first channel, within sqrt(k) standard deviations of the group's mean
for k channels a group whatever the offset of x (:func:`_pivot`), so ``|mean(xs)| / std`` is
small: torch's float32 mean of xs is then accurate (docs/spec.md#numerics), and nothing depends
on tensor values. That is what the paths that cannot read values need: torch.compile, vmap,
meta and fake tensors, make_fx, ONNX export, TorchScript, and devices where reading a value
would stall the host. The pivot and the subtraction cost a read of x and an elementwise pass,
which is why eager CPU calls check torch's own mean instead. (The first element, the pivot
before, may lie any distance out: a zero of padding before data at an offset, 34 deviations
out, put y at 2.2x the float32 bound with torch's kernel and onnxruntime's at 1.7x 10 out.)

A graph holds a few ops more than ``F.group_norm``'s: the pivot's mean and gather (``first``
is a constant), its detach (only when x requires grad) and the subtraction; under
torch.compile the pivot is one op (``groupnorm::pivot``, whose ops AOTAutograd traces). An
export (torch.export, ONNX) records forms with fewer ops (:func:`_exported`): ONNX
then holds 8 nodes per even layer where ``nn.GroupNorm`` holds 5.

Torch's CPU kernel reads xs NCHW-contiguous (:func:`_nchw`): its channels-last kernel loses
float32 accuracy a few deviations from 0.

Written in the TorchScript subset (no ``from __future__ import annotations``: TorchScript reads
the annotations at runtime), so ``torch.jit.script`` compiles it from
:class:`groupnorm.GroupNorm`'s forward.
"""

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["shifted_group_norm"]


def _activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu":
        return F.relu(y)
    return y


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1), or (C,) -> (C, 1, ..., 1): ndim - 2 trailing ones, so v
    broadcasts over (N, C, *S)."""
    shape = list(v.shape)
    for _ in range(ndim - 2):
        shape.append(1)
    return v.reshape(shape)


def _pivot(x: torch.Tensor, first: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, 1, ..., 1): the mean of each channel's group's first channel (:func:`_means`);
    ``size`` is the group size of an even plan, 0 for an uneven one. It lies within sqrt(k)
    deviations of its group's mean for k channels a group, however the values fall (the first
    channel's squared deviations are part of its group's), where one element may lie any
    distance out: a zero of padding before data at an offset, as the first element, put y at
    2.2x the float32 bound 34 deviations out. Detached: the result is mathematically
    independent of it, and its gradient would be rounding noise."""
    if torch.jit.is_scripting():
        src = x.detach() if x.requires_grad else x
        return _means(src).index_select(1, first)
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return torch.ops.groupnorm.pivot(x, first, size)
    # Under torch.jit.trace always: its check traces again with inputs that need no gradient,
    # and a graph with a detach in one trace only "differed across invocations".
    src = x.detach() if x.requires_grad or torch._C._is_tracing() else x
    return _means(src).index_select(1, first)


def _means(x: torch.Tensor) -> torch.Tensor:
    """(N, C, 1, ..., 1): each channel's mean over its positions, summed in float32 for half
    precision (not rounded to, or overflowing, x's dtype); an (N, C) x as it is."""
    if x.dim() == 2:
        return x
    dims: list[int] = []
    for d in range(2, x.dim()):
        dims.append(d)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.mean(dims, keepdim=True, dtype=acc)


def _compiled_pivot(x: torch.Tensor, first: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`_pivot` under torch.compile, as the op ``groupnorm::pivot``: one node in Dynamo's
    graph instead of several. Its implementation is CompositeImplicitAutograd, so AOTAutograd
    traces through it and inductor sees the ops inside. An even plan's pivot is the mean of
    every size-th channel (a 1 / size of x read), repeated: inductor reads it at an affine
    index, where a gather through ``first`` it inlined into each reduction as an indirect load
    per vector iteration (a compiled ResNet-20 training step: 84 against 58 ms)."""
    src = x.detach()
    if size:
        return _means(src[:, ::size]).repeat_interleave(size, dim=1)
    return _means(src).index_select(1, first)


# A torch.library op, not torch.compiler.allow_in_graph: that imports Dynamo (and with it
# Triton), 1.3 s on `import groupnorm`.
_LIB = torch.library.Library("groupnorm", "FRAGMENT")
_LIB.define("pivot(Tensor x, Tensor first, int size) -> Tensor")
_LIB.impl("pivot", _compiled_pivot, "CompositeImplicitAutograd")


def runs_of(flat: list[int]) -> list[tuple[int, int, int]]:
    """The (start, end, size) runs that ``groupnorm::uneven_onnx`` takes flattened."""
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def first_channels(runs: list[tuple[int, int, int]]) -> list[int]:
    """Each channel's group's first channel, for runs of (start, end, size)."""
    first: list[int] = []
    for start, end, size in runs:
        for c in range(start, end):
            first.append(start + (c - start) // size * size)
    return first


def _uneven_onnx(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    runs: list[int],
    eps: float,
) -> torch.Tensor:
    """``groupnorm::uneven_onnx`` run: the ATen form of an uneven layer (:func:`_exported`
    without the epilogue), x and weight and bias in the accumulation dtype; ``runs`` flattened
    as (start, end, size) triples. An ONNX export records the op, translated by
    :mod:`groupnorm.backends._onnx`; this runs where the exported program itself does
    (``ExportedProgram.module()``)."""
    plan = runs_of(runs)
    index = torch.tensor(first_channels(plan), dtype=torch.int64, device=x.device)
    return _affine(_normalized_runs(x - _mean_pivot(x, index), plan, eps), weight, bias)


# An uneven layer as one op in an ONNX export's graph: the exporter translates it to its final
# nodes in one call (:mod:`groupnorm.backends._onnx`) instead of decomposing, translating and
# optimizing about 17 ATen ops (export of the study's ResNet-20 2.6x nn.GroupNorm's time, about
# 1.1x with the op). Recorded only while an ONNX export traces and its translation registered.
_LIB.define("uneven_onnx(Tensor x, Tensor? weight, Tensor? bias, int[] runs, float eps) -> Tensor")
_LIB.impl("uneven_onnx", _uneven_onnx, "CompositeExplicitAutograd")


@torch.library.register_fake("groupnorm::uneven_onnx", lib=_LIB)
def _uneven_onnx_fake(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    runs: list[int],
    eps: float,
) -> torch.Tensor:
    return torch.empty_like(x)


@torch.jit.unused
def _onnx_translated() -> bool:
    """Whether this ONNX export may record ``groupnorm::uneven_onnx``: its translation
    registered, on the first ONNX export, in torch's private torchlib registry and in the
    export's own (:func:`groupnorm.backends._onnx.register`). Where that fails (ImportError,
    AttributeError, TypeError: the private registry moved or changed) or the export's registry
    does not hold the translation after, an uneven layer exports in its ATen form, as before
    the op; ``GROUPNORM_ONNX_OP=0`` asks for that form (a torch or onnxscript whose internals
    keep their names but fail the translation)."""
    if os.environ.get("GROUPNORM_ONNX_OP", "1") == "0":
        return False
    try:
        from groupnorm.backends import _onnx

        return _onnx.register()
    except (ImportError, AttributeError, TypeError):
        return False


@torch.jit.unused
def _batched(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_batchedtensor(t)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype; no op when it is already (a graph records every .to call)."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def shifted_group_norm(
    x: torch.Tensor,
    runs: list[tuple[int, int, int]],
    first: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """Group norm of x (N, C, *S) over the plan given as its runs of equal-size groups.

    first: (C,) int64, the first channel of each channel's group, on x's device; weight, bias:
    (C,) or None; scale, shift: (N, C) or None. Returns x's dtype and layout.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _cast(weight, acc)
    b = _cast(bias, acc)
    # Nested: TorchScript skips a block under `if not torch.jit.is_scripting()`, not an `and`.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if torch.compiler.is_exporting():
            return _exported(x, runs, first, w, b, eps, acc, activation, scale, shift)
    pivot = _pivot(x, first, runs[0][2] if len(runs) == 1 else 0)
    if pivot.dtype != acc:
        pivot = pivot.to(acc)
    # A half x minus a float32 pivot is promoted: xs is float32, formed in one op.
    if len(runs) == 1:
        y = torch.group_norm(_nchw(x - pivot), x.shape[1] // runs[0][2], w, b, eps)
    else:
        parts: list[torch.Tensor] = []
        for start, end, size in runs:
            # Shifted per run: a slice of one shifted x is not dense, which vmap's kernel refuses.
            xs = x[:, start:end] - pivot[:, start:end]
            wr = None if w is None else w[start:end]
            br = None if b is None else b[start:end]
            parts.append(torch.group_norm(_nchw(xs), (end - start) // size, wr, br, eps))
        y = torch.cat(parts, dim=1)
    return _epilogue(y, x, activation, scale, shift)


def _nchw(xs: torch.Tensor) -> torch.Tensor:
    """The pivot-shifted xs as torch's CPU group_norm must read it: NCHW-contiguous. Its
    channels-last CPU kernel loses float32 accuracy once a group's mean sits a few deviations
    from 0, where the shift by one element puts it (TorchScript of a channels-last 3-D G = C
    layer: 4.4x the float32 bound on plain randn input); its NCHW kernel holds. Under
    torch.compile inductor computes the statistics itself, in any layout, and other devices'
    kernels read channels-last accurately."""
    if xs.device.type != "cpu":
        return xs
    # Nested: TorchScript skips a block under `if not torch.jit.is_scripting()`, not an `and`.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return xs
    return xs.contiguous()


def _exported(
    x: torch.Tensor,
    runs: list[tuple[int, int, int]],
    first: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    acc: torch.dtype,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`shifted_group_norm` as an export records it (torch.export, ONNX); weight and bias
    in ``acc``. An even plan is torch's group_norm of rows minus their pivot
    (:func:`_rows_shifted`): in ONNX 8 nodes where ``nn.GroupNorm`` has 5. An uneven plan
    subtracts every group's pivot at once (:func:`_mean_pivot`), normalizes each run of
    groups as one ``instance_norm`` (:func:`_normalized_runs`) and applies weight and bias to
    the whole tensor (:func:`_affine`): 10-12 nodes for two runs. Export time goes with the
    ops recorded, shape ops (Reshape, Slice, Gather) costing about three times an elementwise
    op (benchmarks/onnx_export.py), so both forms keep them few. An ONNX export records the
    uneven form as one op, ``groupnorm::uneven_onnx``, translated to the same nodes at once
    (:mod:`groupnorm.backends._onnx`), where its translation could be registered.

    Half precision is cast to ``acc`` once, first: the subtraction needs it there anyway, and
    a mean asked in float32 of half-precision input exports as a half-precision ReduceMean and
    a Cast, which onnxruntime has no bfloat16 kernel for."""
    xa = x if x.dtype == acc else x.to(acc)
    if len(runs) == 1:
        G = x.shape[1] // runs[0][2]
        y = torch.group_norm(_nchw(_rows_shifted(xa, G).reshape(x.shape)), G, weight, bias, eps)
        return _epilogue(y, x, activation, scale, shift)
    if torch.onnx.is_in_onnx_export() and _onnx_translated():
        flat = [n for run in runs for n in run]
        y = torch.ops.groupnorm.uneven_onnx(xa, weight, bias, flat, eps)
        return _epilogue(y, x, activation, scale, shift)
    y = _normalized_runs(xa - _mean_pivot(xa, first), runs, eps)
    return _epilogue(_affine(y, weight, bias), x, activation, scale, shift)


def _rows_shifted(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x (N, C, *S) as rows (N, groups, C / groups * prod(S)) minus each row's pivot, the mean
    of its group's first channel: in an export graph one Reshape, one Slice, one
    ReduceMean and one Sub. The mean, not the first element: onnxruntime's
    InstanceNormalization loses float32 accuracy faster than torch's kernel as a group's mean
    moves from 0 (2.2x the float32 bound with a first element 17 deviations out), and the
    first channel's mean lies within sqrt(C / groups) deviations of its group's, however the
    values fall. (A Split would enter the graph with fewer nodes to fold, but onnxruntime then
    copies the whole row.)"""
    rows = _rows(x, groups)
    src = rows.detach() if rows.requires_grad else rows
    return rows - src[:, :, : _product(x.shape[2:])].mean(-1, keepdim=True)


def _rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x (N, C, *S) as (N, groups, C / groups * prod(S)); the length from the traced sizes, so
    that it stays symbolic under dynamic shapes (and N = 0 reshapes, which -1 would not)."""
    return x.reshape(x.shape[0], groups, _product(x.shape[1:]) // groups)


def _product(sizes: Sequence[int]) -> int:
    """The product of ``sizes`` (traced sizes stay symbolic)."""
    n = 1
    for d in sizes:
        n = n * d
    return n


def _mean_pivot(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """:func:`_pivot` as an export records it: in an export graph a ReduceMean and a Gather,
    no Reshape (gathering each group's first element instead took two Reshapes around the
    Gather, and a Reshape costs torch.onnx.export about three times what an elementwise op
    does: benchmarks/onnx_export.py). Detached for torch.export; an ONNX graph has no gradient
    to spare it."""
    detach = x.requires_grad and not torch.onnx.is_in_onnx_export()
    return _means(x.detach() if detach else x).index_select(1, first)


def _normalized_runs(
    xs: torch.Tensor, runs: list[tuple[int, int, int]], eps: float
) -> torch.Tensor:
    """The pivot-shifted x of an uneven plan normalized without weight and bias: xs split into
    its runs of equal groups (one Split), each run through ``instance_norm`` as rows of its
    groups (a run of one-channel groups as it is: its instances are its channels, no Reshape),
    concatenated."""
    widths = [end - start for start, end, _ in runs]
    parts = []
    for xr, (start, end, size) in zip(xs.split(widths, dim=1), runs, strict=True):
        # torch.instance_norm, not F.instance_norm, which refuses one position per instance
        # (groups of one element, as torch's group_norm and ours normalize to 0)
        if size == 1 and xr.dim() > 2:
            parts.append(torch.instance_norm(xr, None, None, None, None, True, 0.0, eps, False))
        else:
            rows = _rows(xr, (end - start) // size)
            y = torch.instance_norm(rows, None, None, None, None, True, 0.0, eps, False)
            parts.append(y.reshape(xr.shape))
    return torch.cat(parts, dim=1)


def _affine(
    y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y * weight + bias`` per channel as an inference-mode batch norm with mean 0, variance
    1 and eps 0: the same one multiply and one add (1 / sqrt(1 + 0) is exactly 1), but one
    ONNX node (BatchNormalization) where a multiply and an add need two and their Reshapes."""
    if weight is None and bias is None:
        return y
    C = y.shape[1]
    zeros = torch.zeros(C, dtype=y.dtype, device=y.device)
    ones = torch.ones(C, dtype=y.dtype, device=y.device)
    return F.batch_norm(y, zeros, ones, weight, bias, False, 0.0, 0.0)


def _epilogue(
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """``act(y * (1 + scale) + shift)`` on y (accumulation dtype), rounded once to x's dtype,
    in x's layout."""
    if scale is not None:
        y = y * _per_channel(1 + scale.to(y.dtype), x.dim())
    if shift is not None:
        y = y + _per_channel(shift.to(y.dtype), x.dim())
    y = _activation(y, activation)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if y.stride() != x.stride():
        # The kernel returns contiguous output off the CPU and for layouts without a memory
        # format (NLC), and cat may pick NCHW for one-channel runs: hand back x's layout.
        if not torch.jit.is_scripting():  # noqa: SIM102
            # y batched by vmap through the parameters, x not: y cannot be copied into a
            # tensor like x, and a batched tensor's layout is vmap's own.
            if _batched(y) and not _batched(x):
                return y
        like = torch.empty_like(x)
        if like.stride() != y.stride():
            y = like.copy_(y)
    return y
