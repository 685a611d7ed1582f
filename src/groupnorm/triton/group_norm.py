"""Triton GroupNorm: forward and backward kernels, launchers, the torch.library op, autograd.

Layout. ``x`` (N, C, *S) is addressed as (N, C, L) through three strides ``(sN, sC, sL)``
whenever its spatial dims collapse into one index (NCHW-contiguous: sC = L, sL = 1; channels-last
NHWC/NDHWC and (N, C, L) with channel stride 1: sC = 1, sL = C; (N, C): L = 1; batch slices and
expanded views too). Such inputs are read in place, never copied. Any other view (e.g. H and W
transposed) is copied ONCE with ``.contiguous()`` (documented in :func:`_flat_view`). ``y`` and
``dx`` take x's memory format (``torch.empty_like``).

Vector width. Loads and stores are 128-bit where each program's row segments are 16-byte
aligned: even plans pass the channels per group as a constexpr (``CG``); channels-last groups
that are not 16-byte multiples are read as runs of ``GPP`` groups that are (``GPP`` > 1,
heuristics.loop_run); NCHW groups whose rows are not 16-byte multiples are read ``FLAT`` (the
forward in 1-D tiles over the group's elements, the backward's sums through aligned windows and
its dx in 1-D tiles). tests/_triton_compile.py asserts the widths on sm_90 code.

Forward, per sample n and group g (channels c0 .. c0 + Cg, positions 0 .. L)::

    p        = x[n, c0, 0]                   pivot: x - p is exact in fp32 (docs/spec.md#numerics)
    per register tile (BLOCK_C x BLOCK_L):   n_t, mean_t = mean(x - p), m2_t = sum((x-p-mean_t)^2)
    tiles and chunks merged by Chan's formula: delta = mean_b - mean_a, n = n_a + n_b,
        mean = mean_a + delta * n_b / n,   m2 = m2_a + m2_b + delta^2 * n_a * n_b / n
    rstd     = 1 / sqrt(m2 / count + eps)
    a[c]     = rstd * w[c] * (1 + scale[n,c])
    b[c]     = (bias[c] - shifted_mean * rstd * w[c]) * (1 + scale[n,c]) + shift[n,c]
    y        = act((x - p) * a[c] + b[c])        == act((x_hat * w + bias) * (1 + scale) + shift)

Float32 x: each tile's mean_t is taken with its residual sum(x - p - mean_t) / n_t and merged in
float64 (partial means in float64 buffers), and y is formed around the group's mean rounded to
float32, p' = p + shifted_mean, with b from what that rounding leaves (:func:`_centred`); the
on-chip kernel forms ((x - p) - mean) * a[c] + b[c] with b from the residual mean instead
(onchip.py). Either way y no longer cancels where p lies far out in its group.

Backward, recomputing x_hat and u from x and the saved fp32 (pivot, shifted_mean, rstd)::

    x_hat = ((x - p) - shifted_mean) * rstd,  z = x_hat * w + bias,  u = z * (1 + scale) + shift
    du    = dy * act'(u)
    A[n,c] = sum_l du * x_hat       B[n,c] = sum_l du              (per channel)
    dshift = B,  dscale = w * A + bias * B
    dweight[c] = sum_n (1 + scale) * A,  dbias[c] = sum_n (1 + scale) * B   (fixed order over n)
    wc    = w * (1 + scale);  dx_hat = du * wc
    mean_dxhat = sum_c wc * B / count,  mean_dxhat_xhat = sum_c wc * A / count
    dx    = rstd * (dx_hat - mean_dxhat - x_hat * mean_dxhat_xhat)
    (with statistics given by the caller: dx = rstd * dx_hat, and the statistics get their own
    gradients, see the autograd section)

Backward sums: A and B per (n, c), side by side in one (N, C, 2) buffer SUMS: float64 for
float32 x (the parameter gradients cancel where dy has a large mean: float32 A and B combined in
float32 put dweight at 8.7x and dscale at 4x the float32 bound), float32 for half precision.

Statistics: (N, G) float32 fields pivot, shifted_mean, m2, count, rstd (numbered 0-4); the
kernels address field k of row r as ``FIELD + k * SS + r``. The op passes five tensors and
SS = 0; an eager call passes one flat buffer of 5 * N * G as every field and SS = N * G (one
allocation instead of five: on a small tensor each costs as much as a kernel launch's Python).

Reductions: every sum is a fixed-shape tile reduction (tl.sum) or a sequential loop; partials
live in buffers (float32; float64 for a float32 x's forward means and backward) and are
reduced in a fixed order: bitwise deterministic. Atomics only schedule work (the wave regime's
tickets and counters), they never sum values.
"""

import dataclasses
import math
from functools import lru_cache
from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from groupnorm.activations import triton_code
from groupnorm.groups import GroupPlan
from groupnorm.stats import GroupStats
from groupnorm.triton.activation import _act, _act_grads
from groupnorm.triton.backend import KERNEL_DTYPES
from groupnorm.triton.heuristics import (
    CPU_SM_COUNT,
    EXACT_ACT_SHRINK,
    EXACT_ACT_SHRINK_DX,
    FLAT_DX_BLOCK,
    TILE,
    VECTOR_BYTES,
    LaunchConfig,
    choose_config,
    next_pow2,
)
from groupnorm.triton.onchip import (
    _coefficients,
    _gn_bwd_onchip_kernel,
    _gn_fwd_onchip_kernel,
    _group_sum,
    _run,
)

__all__ = ["group_norm_triton"]

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(c, pos, sC, sL, IDX64: tl.constexpr):
    """(BLOCK_C, BLOCK_L) element offsets; int64 when the tensor can exceed 2^31 elements."""
    if IDX64:
        return c.to(tl.int64)[:, None] * sC + pos.to(tl.int64)[None, :] * sL
    else:
        return c[:, None] * sC + pos[None, :] * sL


@triton.jit
def _group_channels(OFFS, g, CG: tl.constexpr):
    """Group g's first channel and channel count: from the offsets, or for an even plan
    (``CG`` > 0 channels a group) g * CG and CG, known to the compiler: channels-last tiles of
    a 16-byte multiple of channels are then 128-bit loads and stores."""
    if CG > 0:
        return g * CG, CG
    else:
        c0 = tl.load(OFFS + g)
        return c0, tl.load(OFFS + g + 1) - c0


@triton.jit
def _program_group(OFFS, G, sN, sC, CG: tl.constexpr):
    """This program's row = n * G + g (axis 0), its sample n, first channel c0, channel count
    Cg (see :func:`_group_channels`) and the int64 element offset of (n, c0, 0) for strides
    sN, sC."""
    row = tl.program_id(0)
    n = row // G
    g = row % G
    c0, Cg = _group_channels(OFFS, g, CG)
    return row, n, c0, Cg, n.to(tl.int64) * sN + c0.to(tl.int64) * sC


@triton.jit
def _reversed_chunk():
    """Chunk of this program in a second pass over x: the last chunks first. Programs start
    in grid order (axis 0 fastest), so the first pass read chunk K - 1 of every group last;
    that part of x is the likeliest still to be in L2 when the second pass starts (a choice
    from L2's recency, not yet measured)."""
    return tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _stats_start(zero, WIDE: tl.constexpr):
    """Zeroed (count, mean, m2) accumulators of a Chan merge, mean and m2 shaped like ``zero``,
    the count a scalar; float64 where ``WIDE`` (float32 x: :func:`_merge_tile`)."""
    if WIDE:
        zero = zero.to(tl.float64)
    return tl.zeros((), zero.dtype), zero, zero


@triton.jit
def _merge_tile(cnt, mean, m2, n_t, mean_t, m2_t, r_t):
    """Chan's merge of a tile's (n_t, mean_t, m2_t), taken around its float32 mean mean_t, into
    the accumulators (cnt, mean, m2). Float64 accumulators (float32 x) take the tile's mean with
    what its float32 mean left, r_t / n_t, r_t = sum(v - mean_t) (:func:`_centred` says why);
    float32 ones leave r_t unused (compiled away)."""
    if mean.dtype == tl.float64:
        mean_t = mean_t.to(tl.float64) + r_t.to(tl.float64) / n_t
    n_new = cnt + n_t
    delta = mean_t - mean
    mean = mean + delta * (n_t / n_new)
    m2 = m2 + m2_t + delta * delta * (cnt * (n_t / n_new))
    return n_new, mean, m2


@triton.jit
def _chunk_stats(
    X,
    x_base,
    pivot,
    Cg,
    l_lo,
    l_hi,
    sC,
    sL,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
):
    """(count, mean, m2) of ``x - pivot`` over channels [0, Cg) x positions [l_lo, l_hi) of the
    group at ``X + x_base``: two-pass within each register tile, Chan-merged across tiles.
    Float32 x: in float64, each tile's mean with what its float32 mean left (:func:`_centred`
    says why)."""
    cnt, mean, m2 = _stats_start(tl.zeros((), tl.float32), X.dtype.element_ty == tl.float32)
    for cb in range(0, Cg, BLOCK_C):
        c = cb + tl.arange(0, BLOCK_C)
        cmask = c < Cg
        n_c = tl.minimum(Cg - cb, BLOCK_C).to(tl.float32)
        for lb in range(l_lo, l_hi, BLOCK_L):
            pos = lb + tl.arange(0, BLOCK_L)
            mask = cmask[:, None] & (pos < l_hi)[None, :]
            v = tl.load(X + x_base + _tile_offsets(c, pos, sC, sL, IDX64), mask=mask, other=0.0)
            v = tl.where(mask, v.to(tl.float32) - pivot, 0.0)
            n_t = n_c * tl.minimum(l_hi - lb, BLOCK_L).to(tl.float32)
            mean_t = tl.sum(tl.sum(v, axis=1), axis=0) / n_t
            d = tl.where(mask, v - mean_t, 0.0)
            m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
            r_t = tl.sum(tl.sum(d, axis=1), axis=0)
            cnt, mean, m2 = _merge_tile(cnt, mean, m2, n_t, mean_t, m2_t, r_t)
    return cnt, mean, m2


@triton.jit
def _normalize_chunk(
    X,
    Y,
    x_base,
    y_base,
    n,
    c0,
    Cg,
    l_lo,
    l_hi,
    sxC,
    sxL,
    syC,
    syL,
    pivot,
    shifted_mean,
    rstd,
    W,
    B,
    SCALE,
    SHIFT,
    C,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    L,
    LINV,
    FLAT: tl.constexpr,
):
    """y = act((x - pivot) * a[c] + b[c]) over channels [0, Cg) x positions [l_lo, l_hi), or
    with ``FLAT`` over the contiguous group's elements [l_lo, l_hi) (:func:`_normalize_flat`)."""
    if FLAT:
        _normalize_flat(
            X, Y, x_base, y_base, n, c0, l_lo, l_hi, L, LINV, pivot, shifted_mean, rstd, W, B,
            SCALE, SHIFT, C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT, BLOCK_L, IDX64,
        )  # fmt: skip
        return
    for cb in range(0, Cg, BLOCK_C):
        c = cb + tl.arange(0, BLOCK_C)
        cmask = c < Cg
        a = tl.full((BLOCK_C,), 1.0, tl.float32) * rstd
        if HAS_W:
            a = a * tl.load(W + c0 + c, mask=cmask, other=1.0).to(tl.float32)
        b = -shifted_mean * a
        if HAS_B:
            b = b + tl.load(B + c0 + c, mask=cmask, other=0.0).to(tl.float32)
        nc = n.to(tl.int64) * C + c0 + c
        if HAS_SCALE:
            s1 = 1.0 + tl.load(SCALE + nc, mask=cmask, other=0.0).to(tl.float32)
            a = a * s1
            b = b * s1
        if HAS_SHIFT:
            b = b + tl.load(SHIFT + nc, mask=cmask, other=0.0).to(tl.float32)
        for lb in range(l_lo, l_hi, BLOCK_L):
            pos = lb + tl.arange(0, BLOCK_L)
            mask = cmask[:, None] & (pos < l_hi)[None, :]
            v = tl.load(X + x_base + _tile_offsets(c, pos, sxC, sxL, IDX64), mask=mask, other=0.0)
            u = (v.to(tl.float32) - pivot) * a[:, None] + b[:, None]
            y = _act(u, ACT)
            tl.store(
                Y + y_base + _tile_offsets(c, pos, syC, syL, IDX64),
                y.to(Y.dtype.element_ty),
                mask=mask,
            )


@triton.jit
def _normalize_flat(
    X,
    Y,
    x_base,
    y_base,
    n,
    c0,
    f_lo,
    f_hi,
    L,
    LINV,
    pivot,
    shifted_mean,
    rstd,
    W,
    B,
    SCALE,
    SHIFT,
    C,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
    IDX64: tl.constexpr,
):
    """:func:`_normalize_chunk` over elements [f_lo, f_hi) of a contiguous NCHW group, in 1-D
    tiles whose loads and stores are 128-bit wherever the group is 16-byte aligned, whatever L
    (rows of L elements need not be). Element f is channel f // L, found per tile without a
    division per element: t + ((f - t L) * LINV) >> 32 with t = (tile start) // L and
    LINV = ceil(2^32 / L), exact while (f - t L) L < 2^32 (the host checks (BLOCK + L) L < 2^32);
    the per-channel coefficients are gathered per element (from L1: a tile spans few channels)."""
    for fb in range(f_lo, f_hi, BLOCK):
        f = fb + tl.arange(0, BLOCK)
        mask = f < f_hi
        t = fb // L
        ch = t + (((f - t * L).to(tl.int64) * LINV) >> 32).to(tl.int32)
        a = tl.full((BLOCK,), 1.0, tl.float32) * rstd
        if HAS_W:
            a = a * tl.load(W + c0 + ch, mask=mask, other=1.0).to(tl.float32)
        b = -shifted_mean * a
        if HAS_B:
            b = b + tl.load(B + c0 + ch, mask=mask, other=0.0).to(tl.float32)
        nc = n.to(tl.int64) * C + c0 + ch
        if HAS_SCALE:
            s1 = 1.0 + tl.load(SCALE + nc, mask=mask, other=0.0).to(tl.float32)
            a = a * s1
            b = b * s1
        if HAS_SHIFT:
            b = b + tl.load(SHIFT + nc, mask=mask, other=0.0).to(tl.float32)
        if IDX64:
            f = f.to(tl.int64)
        v = tl.load(X + x_base + f, mask=mask, other=0.0)
        # masked lanes as 0: their u from x = 0 could overflow the activation's exp
        y = _act(tl.where(mask, (v.to(tl.float32) - pivot) * a + b, 0.0), ACT)
        tl.store(Y + y_base + f, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _stats_range(
    X,
    x_base,
    pivot,
    Cg,
    lo,
    hi,
    sC,
    sL,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
):
    """:func:`_chunk_stats` over positions [lo, hi), or with ``FLAT`` over elements [lo, hi)
    of a contiguous group (as one channel of unit stride: 1-D tiles, BLOCK_C = 1)."""
    if FLAT:
        return _chunk_stats(X, x_base, pivot, 1, lo, hi, 0, 1, BLOCK_C, BLOCK_L, IDX64)
    else:
        return _chunk_stats(X, x_base, pivot, Cg, lo, hi, sC, sL, BLOCK_C, BLOCK_L, IDX64)


@triton.jit
def _group_bases(row, n, c0, Cg, G, L, sxN, sxC, syN, syC, GSTRIDE, FLAT: tl.constexpr):
    """(x offset, y offset, extent) of row n * G + g: the extent is L positions, or with
    ``FLAT`` GSTRIDE = Cg * L elements, the offsets then g * GSTRIDE past the sample's. GSTRIDE
    is an argument so that the launch specializes its divisibility: the offsets and the masks'
    bounds are then known multiples of 16, which 128-bit accesses need."""
    if FLAT:
        g = (row % G).to(tl.int64)
        return n.to(tl.int64) * sxN + g * GSTRIDE, n.to(tl.int64) * syN + g * GSTRIDE, GSTRIDE
    else:
        x_base = n.to(tl.int64) * sxN + c0.to(tl.int64) * sxC
        return x_base, n.to(tl.int64) * syN + c0.to(tl.int64) * syC, L


@triton.jit
def _gn_fwd_fused_kernel(
    X,
    Y,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    PIVOT,
    SMEAN,
    M2,
    COUNT,
    RSTD,
    SS,
    C,
    G,
    L,
    sxN,
    sxC,
    sxL,
    syN,
    syC,
    syL,
    eps,
    GSTRIDE,
    LINV,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    FLAT: tl.constexpr,
    GPP: tl.constexpr = 1,
):
    """Fused regime: program (n * G + g) computes its group's statistics, writes them, then
    normalizes the group (second read of x, from L1/L2 for small groups). ``GPP`` > 1: program
    (n * G / GPP + r) does so for channels-last run r (:func:`_run_normalize`)."""
    if GPP > 1:
        _run_normalize(
            X, Y, W, B, SCALE, SHIFT, OFFS, PIVOT, PIVOT, PIVOT, PIVOT, SMEAN, M2, COUNT, RSTD,
            SS, C, G, L, sxN, sxC, sxL, syN, syC, syL, eps, L, 1, tl.program_id(0), 0, HAS_W,
            HAS_B, HAS_SCALE, HAS_SHIFT, ACT, 1, BLOCK_C, BLOCK_L, IDX64, CG, GPP, True, False,
        )  # fmt: skip
        return
    row, n, c0, Cg, _ = _program_group(OFFS, G, sxN, sxC, CG)
    x_base, y_base, extent = _group_bases(row, n, c0, Cg, G, L, sxN, sxC, syN, syC, GSTRIDE, FLAT)
    pivot = tl.load(X + x_base).to(tl.float32)
    cnt, mean, m2 = _stats_range(
        X, x_base, pivot, Cg, 0, extent, sxC, sxL, BLOCK_C, BLOCK_L, IDX64, FLAT
    )
    rstd = (1.0 / tl.sqrt(m2 / cnt + eps)).to(tl.float32)
    tl.store(PIVOT + row, pivot)
    _store_statistics(SMEAN, M2, COUNT, RSTD, SS, row, mean, m2, cnt, rstd, None)
    pivot, mean = _centred(X, pivot, mean)
    _normalize_chunk(
        X,
        Y,
        x_base,
        y_base,
        n,
        c0,
        Cg,
        0,
        extent,
        sxC,
        sxL,
        syC,
        syL,
        pivot,
        mean,
        rstd,
        W,
        B,
        SCALE,
        SHIFT,
        C,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        ACT,
        BLOCK_C,
        BLOCK_L,
        IDX64,
        L,
        LINV,
        FLAT,
    )


@triton.jit
def _gn_fwd_partial_kernel(
    X,
    OFFS,
    PIVOT,
    P_CNT,
    P_MEAN,
    P_M2,
    G,
    L,
    sxN,
    sxC,
    sxL,
    CHUNK_L,
    K,
    GSTRIDE,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    FLAT: tl.constexpr,
    GPP: tl.constexpr = 1,
):
    """Split regime, pass 1: program (n * G + g, k) writes (count, mean, m2) of ``x - pivot``
    over its chunk of positions [k * CHUNK_L, (k + 1) * CHUNK_L) (``FLAT``: of the group's
    elements) to partials[n, g, k]. ``GPP`` > 1, a channels-last even plan whose groups are not
    16-byte multiples (SD's 10 bf16 channels are 20 bytes): program (n * G / GPP + r, k) does so
    for each group of run r of GPP groups (4: 80 bytes), read as one tile of 16-byte row
    segments (:func:`_run_stats`); a group's first channel stores its partial."""
    if GPP > 1:
        _run_partial(
            X, OFFS, PIVOT, P_CNT, P_MEAN, P_M2, G, L, sxN, sxC, sxL, CHUNK_L, K,
            tl.program_id(0), tl.program_id(1), BLOCK_C, BLOCK_L, IDX64, CG, GPP,
        )  # fmt: skip
        return
    row, n, c0, Cg, _ = _program_group(OFFS, G, sxN, sxC, CG)
    x_base, _, extent = _group_bases(row, n, c0, Cg, G, L, sxN, sxC, 0, 0, GSTRIDE, FLAT)
    k = tl.program_id(1)
    pivot = tl.load(X + x_base).to(tl.float32)
    l_lo = k * CHUNK_L
    l_hi = tl.minimum(l_lo + CHUNK_L, extent)
    cnt, mean, m2 = _stats_range(
        X, x_base, pivot, Cg, l_lo, l_hi, sxC, sxL, BLOCK_C, BLOCK_L, IDX64, FLAT
    )
    if k == 0:
        tl.store(PIVOT + row, pivot)
    tl.store(P_CNT + row * K + k, cnt)
    tl.store(P_MEAN + row * K + k, mean)
    tl.store(P_M2 + row * K + k, m2)


@triton.jit
def _gn_fwd_normalize_kernel(
    X,
    Y,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    PIVOT,
    P_CNT,
    P_MEAN,
    P_M2,
    SMEAN,
    M2,
    COUNT,
    RSTD,
    SS,
    C,
    G,
    L,
    sxN,
    sxC,
    sxL,
    syN,
    syC,
    syL,
    eps,
    CHUNK_L,
    KP,
    GSTRIDE,
    LINV,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    FLAT: tl.constexpr,
    GPP: tl.constexpr = 1,
):
    """Split regime, pass 2 (also: normalize with given statistics, KP = 1): program
    (n * G + g, k) merges its group's KP partials and normalizes its chunk
    (:func:`_merge_and_normalize`); ``GPP`` > 1: program (n * G / GPP + r, k), for each group of
    channels-last run r (:func:`_run_normalize`)."""
    if GPP > 1:
        _run_normalize(
            X, Y, W, B, SCALE, SHIFT, OFFS, PIVOT, P_CNT, P_MEAN, P_M2, SMEAN, M2, COUNT, RSTD,
            SS, C, G, L, sxN, sxC, sxL, syN, syC, syL, eps, CHUNK_L, KP, tl.program_id(0),
            _reversed_chunk(), HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT, BLOCK_KP, BLOCK_C, BLOCK_L,
            IDX64, CG, GPP, False, False,
        )  # fmt: skip
        return
    row, n, c0, Cg, _ = _program_group(OFFS, G, sxN, sxC, CG)
    x_base, y_base, extent = _group_bases(row, n, c0, Cg, G, L, sxN, sxC, syN, syC, GSTRIDE, FLAT)
    _merge_and_normalize(
        X, Y, W, B, SCALE, SHIFT, P_CNT, P_MEAN, P_M2, SMEAN, M2, COUNT, RSTD, SS, C, L, LINV,
        extent, sxC, sxL, syC, syL, eps, CHUNK_L, KP, row, n, c0, Cg, x_base, y_base,
        tl.load(PIVOT + row), _reversed_chunk(), HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT,
        BLOCK_KP, BLOCK_C, BLOCK_L, IDX64, FLAT, False,
    )  # fmt: skip


@triton.jit
def _merge_partials(P_CNT, P_MEAN, P_M2, at, mask, VOLATILE: tl.constexpr):
    """Partials (count, mean, m2) at offsets ``at`` (where ``mask``) merged along the last axis
    by Chan's formula in vector form, in a fixed order: cnt = sum n_i, mean = sum n_i mean_i /
    cnt, m2 = sum m2_i + sum n_i (mean_i - mean)^2. ``VOLATILE``: the partials were written by
    programs still running (the wave regime), so they are read past the L1 cache."""
    p_cnt = tl.load(P_CNT + at, mask=mask, other=0.0, volatile=VOLATILE)
    p_mean = tl.load(P_MEAN + at, mask=mask, other=0.0, volatile=VOLATILE)
    p_m2 = tl.load(P_M2 + at, mask=mask, other=0.0, volatile=VOLATILE)
    cnt = tl.sum(p_cnt, axis=-1)
    mean = tl.sum(p_cnt * p_mean, axis=-1) / cnt
    # float32 deviations: the means may be float64 (float32 x), the rest need not be
    dev = tl.where(mask, (p_mean - tl.expand_dims(mean, -1)).to(tl.float32), 0.0)
    m2 = tl.sum(p_m2, axis=-1) + tl.sum(p_cnt * dev * dev, axis=-1)
    return cnt, mean, m2


@triton.jit
def _merged_statistics(
    X, P_CNT, P_MEAN, P_M2, SMEAN, M2, COUNT, RSTD, SS, at, mask, rows, pivot, eps, k,
    VOLATILE: tl.constexpr,
):  # fmt: skip
    """The partials at ``at`` merged (:func:`_merge_partials`) for ``rows`` (one row, or a
    vector of a run's rows), their statistics stored from chunk k = 0; returns the pivot and
    shifted mean to normalize with (:func:`_centred`) and rstd."""
    cnt, mean, m2 = _merge_partials(P_CNT, P_MEAN, P_M2, at, mask, VOLATILE)
    rstd = (1.0 / tl.sqrt(m2 / cnt + eps)).to(tl.float32)
    if k == 0:
        _store_statistics(SMEAN, M2, COUNT, RSTD, SS, rows, mean, m2, cnt, rstd, None)
    pivot, mean = _centred(X, pivot, mean)
    return pivot, mean, rstd


@triton.jit
def _store_statistics(SMEAN, M2, COUNT, RSTD, SS, rows, mean, m2, cnt, rstd, mask):
    """The statistics of ``rows`` (one row or a vector) into their planes of the statistics
    buffer, SS apart; only where ``mask`` (None: every row)."""
    tl.store(SMEAN + SS + rows, mean, mask=mask)
    tl.store(M2 + 2 * SS + rows, m2, mask=mask)
    tl.store(COUNT + 3 * SS + rows, cnt, mask=mask)
    tl.store(RSTD + 4 * SS + rows, rstd, mask=mask)


@triton.jit
def _centred(X, pivot, mean):
    """The pivot and shifted mean that the loop regimes normalize float32 x with: the group's
    mean rounded to float32 and what that leaves (from ``mean``, float64 for float32 x). From
    the first element as pivot, y = (x - pivot) a + (bias - mean a) cancels between its halves
    where that element lies far out in its group (a zero of padding before data at 30-1000),
    and the float32 mean's rounding carried through: y reached 3.3x the float32 bound. Half
    precision keeps its pivot, its rounding far above that error."""
    if X.dtype.element_ty == tl.float32:
        m = pivot.to(tl.float64) + mean.to(tl.float64)
        pivot = m.to(tl.float32)
        mean = (m - pivot.to(tl.float64)).to(tl.float32)
    return pivot, mean


@triton.jit
def _merge_and_normalize(
    X,
    Y,
    W,
    B,
    SCALE,
    SHIFT,
    P_CNT,
    P_MEAN,
    P_M2,
    SMEAN,
    M2,
    COUNT,
    RSTD,
    SS,
    C,
    L,
    LINV,
    extent,
    sxC,
    sxL,
    syC,
    syL,
    eps,
    CHUNK_L,
    KP,
    row,
    n,
    c0,
    Cg,
    x_base,
    y_base,
    pivot,
    k,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    FLAT: tl.constexpr,
    VOLATILE: tl.constexpr,
):
    """Merge row's KP partials (:func:`_merge_partials`), write the merged statistics from
    chunk 0, and normalize chunk k of the row's ``extent`` (positions, or ``FLAT`` elements).
    ``VOLATILE``: see :func:`_merge_partials`."""
    i = tl.arange(0, BLOCK_KP)
    pivot, mean, rstd = _merged_statistics(
        X, P_CNT, P_MEAN, P_M2, SMEAN, M2, COUNT, RSTD, SS, row * KP + i, i < KP, row, pivot,
        eps, k, VOLATILE,
    )  # fmt: skip
    l_lo = k * CHUNK_L
    l_hi = tl.minimum(l_lo + CHUNK_L, extent)
    _normalize_chunk(
        X, Y, x_base, y_base, n, c0, Cg, l_lo, l_hi, sxC, sxL, syC, syL, pivot, mean, rstd,
        W, B, SCALE, SHIFT, C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT, BLOCK_C, BLOCK_L, IDX64,
        L, LINV, FLAT,
    )  # fmt: skip


@triton.jit
def _spread(v, gl, GPP: tl.constexpr):
    """Per channel of a run, the value v[gl] (v: one per group, (GPP,)) of its group: selected,
    never summed across groups (a NaN stays in its group)."""
    own = gl[:, None] == tl.arange(0, GPP)[None, :]
    return tl.sum(tl.where(own, v[None, :], 0.0), axis=1)


@triton.jit
def _run_pivot(X, x_base, gl, CG: tl.constexpr, GPP: tl.constexpr):
    """Per channel of a channels-last run: its group's pivot x[n, first channel, 0], one load
    per group."""
    p = tl.load(X + x_base + tl.arange(0, GPP) * CG).to(tl.float32)
    return _spread(p, gl, GPP)


@triton.jit
def _run_stats(
    X,
    x_base,
    pivot,
    c,
    cmask,
    gl,
    l_lo,
    l_hi,
    sC,
    sL,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
):
    """:func:`_chunk_stats` of every group of a channels-last run at once, over positions
    [l_lo, l_hi): per channel, its group's (count, mean, m2) of ``x - pivot`` (a scalar count:
    the groups of a run are equal). One (channels x positions) tile spans the run, so each
    position's row segment is a 16-byte multiple; a tile's per-channel sums are folded into
    groups (:func:`_group_sum`), two-pass within the tile, Chan-merged across tiles; float32 x
    in float64, as :func:`_chunk_stats`."""
    cnt, mean, m2 = _stats_start(tl.zeros(c.shape, tl.float32), X.dtype.element_ty == tl.float32)
    for lb in range(l_lo, l_hi, BLOCK_L):
        pos = lb + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (pos < l_hi)[None, :]
        v = tl.load(X + x_base + _tile_offsets(c, pos, sC, sL, IDX64), mask=mask, other=0.0)
        d = tl.where(mask, v.to(tl.float32) - pivot[:, None], 0.0)
        n_t = (CG * 1.0) * tl.minimum(l_hi - lb, BLOCK_L).to(tl.float32)
        mean_t = _group_sum(tl.sum(d, axis=1), gl, GPP) / n_t
        e = tl.where(mask, d - mean_t[:, None], 0.0)
        m2_t = _group_sum(tl.sum(e * e, axis=1), gl, GPP)
        r_t = _group_sum(tl.sum(e, axis=1), gl, GPP)
        cnt, mean, m2 = _merge_tile(cnt, mean, m2, n_t, mean_t, m2_t, r_t)
    return cnt, mean, m2


@triton.jit
def _run_partial(
    X,
    OFFS,
    PIVOT,
    P_CNT,
    P_MEAN,
    P_M2,
    G,
    L,
    sxN,
    sxC,
    sxL,
    CHUNK_L,
    K,
    pid,
    k,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    GPP: tl.constexpr,
):
    """The partial (count, mean, m2) of each group of channels-last run pid over chunk k of
    positions (:func:`_run_stats`), to partials[n, g, k]: a group's first channel stores it."""
    n, g0, c_lo, c, cmask, gl, first, _ = _run(pid, OFFS, OFFS, G, G // GPP, CG, GPP, BLOCK_C)
    x_base = n.to(tl.int64) * sxN + c_lo
    pivot = _run_pivot(X, x_base, gl, CG, GPP)
    l_lo = k * CHUNK_L
    cnt, mean, m2 = _run_stats(
        X, x_base, pivot, c, cmask, gl, l_lo, tl.minimum(l_lo + CHUNK_L, L), sxC, sxL, CG, GPP,
        BLOCK_L, IDX64,
    )  # fmt: skip
    head = cmask & (c == first)
    row = n * G + g0 + gl
    if k == 0:
        tl.store(PIVOT + row, pivot, mask=head)
    tl.store(P_CNT + row * K + k, tl.zeros_like(mean) + cnt, mask=head)
    tl.store(P_MEAN + row * K + k, mean, mask=head)
    tl.store(P_M2 + row * K + k, m2, mask=head)


@triton.jit
def _run_normalize(
    X,
    Y,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    PIVOT,
    P_CNT,
    P_MEAN,
    P_M2,
    SMEAN,
    M2,
    COUNT,
    RSTD,
    SS,
    C,
    G,
    L,
    sxN,
    sxC,
    sxL,
    syN,
    syC,
    syL,
    eps,
    CHUNK_L,
    KP,
    pid,
    k,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    FUSED: tl.constexpr,
    VOLATILE: tl.constexpr,
):
    """Channels-last run pid of GPP groups (n * G / GPP + r: :func:`_run`), chunk k: merge the
    KP partials of each group of the run as one (GPP, BLOCK_KP) tile (:func:`_merge_partials`),
    write the statistics from chunk 0 and normalize the chunk. ``FUSED`` (one chunk): the
    statistics come from the program's own pass over the run instead (:func:`_run_stats`), as
    the fused regime's. ``VOLATILE``: see :func:`_merge_partials`."""
    n, g0, c_lo, c, cmask, gl, first, _ = _run(pid, OFFS, OFFS, G, G // GPP, CG, GPP, BLOCK_C)
    x_base = n.to(tl.int64) * sxN + c_lo
    if FUSED:  # one chunk: k = 0
        row = n * G + g0 + gl
        head = cmask & (c == first)
        pivot = _run_pivot(X, x_base, gl, CG, GPP)
        cnt, mean, m2 = _run_stats(
            X, x_base, pivot, c, cmask, gl, 0, L, sxC, sxL, CG, GPP, BLOCK_L, IDX64
        )
        tl.store(PIVOT + row, pivot, mask=head)
        cnt = tl.zeros_like(mean) + cnt
        # Lanes past the run have m2 = 0; with eps = 0 (statistics only) they would divide by 0.
        rstd = (1.0 / tl.sqrt(tl.where(cmask, m2 / cnt + eps, 1.0))).to(tl.float32)
        _store_statistics(SMEAN, M2, COUNT, RSTD, SS, row, mean, m2, cnt, rstd, head)
        pivot, mean = _centred(X, pivot, mean)
    else:
        # per group, in the partials' precision; spread over the channels in float32 (spread in
        # float64, a run of 32 one-channel groups spilled 216 B)
        rows = n * G + g0 + tl.arange(0, GPP)
        i = tl.arange(0, BLOCK_KP)
        at = rows[:, None] * KP + i[None, :]
        imask = (i < KP)[None, :] & (rows >= 0)[:, None]
        g_pivot, g_mean, g_rstd = _merged_statistics(
            X, P_CNT, P_MEAN, P_M2, SMEAN, M2, COUNT, RSTD, SS, at, imask, rows,
            tl.load(PIVOT + rows, volatile=VOLATILE), eps, k, VOLATILE,
        )  # fmt: skip
        pivot = _spread(g_pivot, gl, GPP)
        mean = _spread(g_mean, gl, GPP)
        rstd = _spread(g_rstd, gl, GPP)
    a, b = _coefficients(
        n, c_lo, c, cmask, C, W, B, SCALE, SHIFT, mean, rstd, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT
    )
    y_base = n.to(tl.int64) * syN + c_lo
    l_lo = k * CHUNK_L
    l_hi = tl.minimum(l_lo + CHUNK_L, L)
    for lb in range(l_lo, l_hi, BLOCK_L):
        pos = lb + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (pos < l_hi)[None, :]
        v = tl.load(X + x_base + _tile_offsets(c, pos, sxC, sxL, IDX64), mask=mask, other=0.0)
        y = _act((v.to(tl.float32) - pivot[:, None]) * a[:, None] + b[:, None], ACT)
        tl.store(
            Y + y_base + _tile_offsets(c, pos, syC, syL, IDX64),
            y.to(Y.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _release_partials(SYNC, row):
    """Publish row's partial just stored: every thread's stores, then the row's counter
    SYNC[1 + row] raised with release semantics."""
    tl.debug_barrier()
    tl.atomic_add(SYNC + 1 + row, 1, sem="release")


@triton.jit
def _await_partials(SYNC, row, K):
    """Wait (acquire) until all K partials of row are published."""
    while tl.atomic_add(SYNC + 1 + row, 0, sem="acquire") < K:
        pass


@triton.jit
def _ticket(t, K, WAVE_ROWS, WAVES):
    """Ticket t of a wave schedule -> (an S ticket?, row, chunk). Block 0 is S0, block
    b < WAVES is S(b) then N(b - 1), block WAVES is N(WAVES - 1); each half-block has
    WAVE_ROWS * K tickets, chunk-fastest."""
    RK = WAVE_ROWS * K
    first = t < RK
    u = tl.maximum(t - RK, 0)
    b = u // (2 * RK) + 1
    within = u % (2 * RK)
    stats = first | ((b < WAVES) & (within < RK))
    wave = tl.where(first, 0, tl.where(stats, b, b - 1))
    i = tl.where(first, t, tl.where(within < RK, within, within - RK))
    return stats, wave * WAVE_ROWS + i // K, i % K


@triton.jit
def _gn_fwd_wave_kernel(
    X,
    Y,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    PIVOT,
    P_CNT,
    P_MEAN,
    P_M2,
    SMEAN,
    M2,
    COUNT,
    RSTD,
    SS,
    SYNC,
    C,
    G,
    L,
    sxN,
    sxC,
    sxL,
    syN,
    syC,
    syL,
    eps,
    CHUNK_L,
    K,
    ROWS,
    WAVE_ROWS,
    WAVES,
    GSTRIDE,
    LINV,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    FLAT: tl.constexpr,
    GPP: tl.constexpr = 1,
):
    """Wave regime: a persistent grid takes tickets in order from the counter SYNC[0]; each
    ticket is one chunk (CHUNK_L positions, or elements when FLAT) of one row (n * G + g) of one
    wave (WAVE_ROWS rows), either its partial statistics (S) or its normalization (N). Tickets
    run S0, S1 N0, S2 N1, ..., N(WAVES-1), so between a chunk's two reads at most five waves of
    distinct bytes are touched (x of the waves before, at and after its own, y of the one before
    and its own): a wave of a fifth of L2 makes the second read an L2 hit, and N(w - 1) gives
    the programs work while S(w) finishes, so one launch keeps the GPU busy across waves.

    An N ticket waits until its row's K partials are written (counter SYNC[1 + row], released
    after the partials' stores, acquired before their loads). It only ever waits for tickets
    issued before its own, and a ticket is issued only to a running program, so the wait always
    ends, on a GPU and in the interpreter (where one program takes every ticket in order). The
    next ticket is taken before the current one is worked, to hide the atomic's latency.
    """
    total = 2 * WAVES * WAVE_ROWS * K
    t = tl.atomic_add(SYNC, 1)
    while t < total:
        following = tl.atomic_add(SYNC, 1)
        stats, row, k = _ticket(t, K, WAVE_ROWS, WAVES)
        if row < ROWS:
            if GPP > 1:  # row: a channels-last run of GPP groups
                if stats:
                    _run_partial(
                        X, OFFS, PIVOT, P_CNT, P_MEAN, P_M2, G, L, sxN, sxC, sxL, CHUNK_L, K, row,
                        k, BLOCK_C, BLOCK_L, IDX64, CG, GPP,
                    )  # fmt: skip
                    _release_partials(SYNC, row)
                else:
                    _await_partials(SYNC, row, K)
                    _run_normalize(
                        X, Y, W, B, SCALE, SHIFT, OFFS, PIVOT, P_CNT, P_MEAN, P_M2, SMEAN, M2,
                        COUNT, RSTD, SS, C, G, L, sxN, sxC, sxL, syN, syC, syL, eps, CHUNK_L, K,
                        row, k, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT, BLOCK_KP, BLOCK_C,
                        BLOCK_L, IDX64, CG, GPP, False, True,
                    )  # fmt: skip
            else:
                n = row // G
                g = row % G
                c0, Cg = _group_channels(OFFS, g, CG)
                x_base, y_base, extent = _group_bases(
                    row, n, c0, Cg, G, L, sxN, sxC, syN, syC, GSTRIDE, FLAT
                )
                pivot = tl.load(X + x_base).to(tl.float32)
                if stats:
                    l_lo = k * CHUNK_L
                    l_hi = tl.minimum(l_lo + CHUNK_L, extent)
                    cnt, mean, m2 = _stats_range(
                        X, x_base, pivot, Cg, l_lo, l_hi, sxC, sxL, BLOCK_C, BLOCK_L, IDX64, FLAT
                    )
                    if k == 0:
                        tl.store(PIVOT + row, pivot)
                    tl.store(P_CNT + row * K + k, cnt)
                    tl.store(P_MEAN + row * K + k, mean)
                    tl.store(P_M2 + row * K + k, m2)
                    _release_partials(SYNC, row)
                else:
                    _await_partials(SYNC, row, K)
                    _merge_and_normalize(
                        X, Y, W, B, SCALE, SHIFT, P_CNT, P_MEAN, P_M2, SMEAN, M2, COUNT, RSTD, SS,
                        C, L, LINV, extent, sxC, sxL, syC, syL, eps, CHUNK_L, K, row, n, c0, Cg,
                        x_base, y_base, pivot, k, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT, BLOCK_KP,
                        BLOCK_C, BLOCK_L, IDX64, FLAT, True,
                    )  # fmt: skip
        t = following


@triton.jit
def _channel_block(
    cb,
    n,
    c0,
    Cg,
    C,
    W,
    B,
    SCALE,
    SHIFT,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DT: tl.constexpr = tl.float32,
):
    """Channels c = cb .. cb + BLOCK_C of the group (local index), their mask, and per-channel
    vectors in DT (w, bias, 1 + scale, shift) of sample n; identity values where absent."""
    c = cb + tl.arange(0, BLOCK_C)
    cmask = c < Cg
    one = tl.full((BLOCK_C,), 1.0, DT)
    w = one
    bias = one * 0.0
    s1 = one
    sh = one * 0.0
    nc = n.to(tl.int64) * C + c0 + c
    if HAS_W:
        w = tl.load(W + c0 + c, mask=cmask, other=1.0).to(DT)
    if HAS_B:
        bias = tl.load(B + c0 + c, mask=cmask, other=0.0).to(DT)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(SCALE + nc, mask=cmask, other=0.0).to(DT)
    if HAS_SHIFT:
        sh = tl.load(SHIFT + nc, mask=cmask, other=0.0).to(DT)
    return c, cmask, w, bias, s1, sh


@triton.jit
def _du_xhat(
    X,
    DY,
    x_base,
    dy_base,
    c,
    pos,
    mask,
    sxC,
    sxL,
    sdC,
    sdL,
    pivot,
    smean,
    rstd,
    w,
    bias,
    s1,
    sh,
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
    keep,
    DT: tl.constexpr = tl.float32,
    CURV: tl.constexpr = False,
):
    """Recompute d = (x - pivot) - shifted_mean, x_hat = d rstd and u of one tile from x and
    the saved statistics, in DT; du = dy * act'(u), and with ``CURV`` h = dy * act''(u) * w *
    (1 + scale), what du moves by per unit of x_hat. The tile is loaded where ``mask`` holds;
    all are 0 outside ``keep`` (within the mask). Returns (du, x_hat, d, h)."""
    v = tl.load(X + x_base + _tile_offsets(c, pos, sxC, sxL, IDX64), mask=mask, other=0.0)
    dy = tl.load(DY + dy_base + _tile_offsets(c, pos, sdC, sdL, IDX64), mask=mask, other=0.0)
    d = tl.where(keep, (v.to(DT) - pivot) - smean, 0.0)
    xhat = tl.where(keep, d * rstd, 0.0)
    du = tl.where(keep, dy.to(DT), 0.0)
    h = du
    if ACT != 0:
        u = (xhat * w[:, None] + bias[:, None]) * s1[:, None] + sh[:, None]
        g1, g2 = _act_grads(u, ACT)
        if CURV:
            h = tl.where(keep, du * g2 * (w * s1)[:, None], 0.0)
        du = tl.where(keep, du * g1, 0.0)
    return du, xhat, d, h


@triton.jit
def _channel_sums(
    X,
    DY,
    x_base,
    dy_base,
    c,
    cmask,
    l_lo,
    l_hi,
    sxC,
    sxL,
    sdC,
    sdL,
    pivot,
    smean,
    rstd,
    w,
    bias,
    s1,
    sh,
    ACT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    EXACT: tl.constexpr = False,
):
    """Per channel of the block, over positions [l_lo, l_hi): A = sum du * x_hat, B = sum du;
    ``EXACT`` (see :func:`_bwd_dx_chunk`): in float64, A = sum du * d, and also sum d, sum d^2
    and, for a smooth activation, sum h, sum h d, sum h d^2 (d = x_hat / rstd, h as
    :func:`_du_xhat`). Returns the seven sums (A, B, then these, 0 where not taken)."""
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    CURV: tl.constexpr = (ACT == 1 or ACT == 2) if EXACT else False
    acc = _no_sums(c.shape[0], DT)
    for lb in range(l_lo, l_hi, BLOCK_L):
        pos = lb + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (pos < l_hi)[None, :]
        du, xhat, d, h = _du_xhat(
            X,
            DY,
            x_base,
            dy_base,
            c,
            pos,
            mask,
            sxC,
            sxL,
            sdC,
            sdL,
            pivot,
            smean,
            rstd,
            w,
            bias,
            s1,
            sh,
            ACT,
            IDX64,
            mask,
            DT,
            CURV,
        )
        acc = _accumulate(acc, du, xhat, d, h, EXACT, CURV)
    return acc


@triton.jit
def _no_sums(n: tl.constexpr, DT: tl.constexpr):
    """The seven channel sums of :func:`_channel_sums`, zero."""
    z = tl.zeros((n,), DT)
    return z, z, z, z, z, z, z


@triton.jit
def _accumulate(acc, du, xhat, d, h, EXACT: tl.constexpr, CURV: tl.constexpr):
    """One tile's row sums added to the channel sums of :func:`_channel_sums`."""
    a, b, sd, sdd, h0, h1, h2 = acc
    if EXACT:
        a += tl.sum(du * d, axis=1)
        sd += tl.sum(d, axis=1)
        sdd += tl.sum(d * d, axis=1)
        if CURV:
            h0 += tl.sum(h, axis=1)
            h1 += tl.sum(h * d, axis=1)
            h2 += tl.sum(h * d * d, axis=1)
    else:
        a += tl.sum(du * xhat, axis=1)
    b += tl.sum(du, axis=1)
    return a, b, sd, sdd, h0, h1, h2


@triton.jit
def _dx_block(
    X,
    DY,
    DX,
    x_base,
    dy_base,
    dx_base,
    c,
    cmask,
    l_lo,
    l_hi,
    sxC,
    sxL,
    sdC,
    sdL,
    sgC,
    sgL,
    pivot,
    smean,
    rstd,
    w,
    bias,
    s1,
    sh,
    mean_dxhat,
    mean_dxhat_xhat,
    r,
    rstd_e,
    alpha,
    beta,
    ACT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    EXACT: tl.constexpr = False,
):
    """dx = rstd_e * (dx_hat - mean_dxhat - x_hat * mean_dxhat_xhat), dx_hat = du * w *
    (1 + scale); ``EXACT``: in float64 with the retaken statistics, x_hat = (d - r) rstd_e and
    du moved to them, du + h (alpha d + beta) (see :func:`_bwd_dx_chunk`); otherwise x_hat
    from the saved ones and rstd_e = rstd."""
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    CURV: tl.constexpr = (ACT == 1 or ACT == 2) if EXACT else False
    wc = w * s1
    for lb in range(l_lo, l_hi, BLOCK_L):
        pos = lb + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (pos < l_hi)[None, :]
        du, xhat, d, h = _du_xhat(
            X,
            DY,
            x_base,
            dy_base,
            c,
            pos,
            mask,
            sxC,
            sxL,
            sdC,
            sdL,
            pivot,
            smean,
            rstd,
            w,
            bias,
            s1,
            sh,
            ACT,
            IDX64,
            mask,
            DT,
            CURV,
        )
        if CURV:
            du += h * (alpha * d + beta)
        if EXACT:
            xhat = (d - r) * rstd_e
        dx = rstd_e * (du * wc[:, None] - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(
            DX + dx_base + _tile_offsets(c, pos, sgC, sgL, IDX64),
            dx.to(DX.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _channel_sums_flat(
    X,
    DY,
    x_base,
    dy_base,
    c,
    cmask,
    l_lo,
    l_hi,
    L,
    GSTRIDE,
    pivot,
    smean,
    rstd,
    w,
    bias,
    s1,
    sh,
    ACT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    VEC: tl.constexpr,
    EXACT: tl.constexpr = False,
):
    """:func:`_channel_sums` of a contiguous NCHW group (GSTRIDE = Cg * L elements at x_base
    and dy_base) whose rows of L elements are not 16-byte multiples: each channel's segment
    [l_lo, l_hi) is read through the window of whole VEC-element (16-byte) vectors that covers
    it, so that every load is 128-bit aligned (where the group is); what the window holds of the
    neighbouring rows (the same group's, less than 2 VEC elements a segment) is selected away,
    and nothing past the group is read."""
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    CURV: tl.constexpr = (ACT == 1 or ACT == 2) if EXACT else False
    acc = _no_sums(c.shape[0], DT)
    lo = c * L + l_lo
    hi = c * L + l_hi
    start = (lo // VEC) * VEC
    end = tl.minimum(((hi + VEC - 1) // VEC) * VEC, GSTRIDE)
    for q in range(0, l_hi - l_lo + VEC - 1, BLOCK_L):
        p = q + tl.arange(0, BLOCK_L)
        f = start[:, None] + p[None, :]
        mask = cmask[:, None] & (f < end[:, None])
        keep = mask & (f >= lo[:, None]) & (f < hi[:, None])
        du, xhat, d, h = _du_xhat(
            X, DY, x_base, dy_base, start, p, mask, 1, 1, 1, 1, pivot, smean, rstd, w, bias, s1,
            sh, ACT, IDX64, keep, DT, CURV,
        )  # fmt: skip
        acc = _accumulate(acc, du, xhat, d, h, EXACT, CURV)
    return acc


@triton.jit
def _dx_flat(
    X,
    DY,
    DX,
    x_base,
    dy_base,
    dx_base,
    n,
    c0,
    f_lo,
    f_hi,
    L,
    LINV,
    pivot,
    smean,
    rstd,
    W,
    B,
    SCALE,
    SHIFT,
    C,
    mean_dxhat,
    mean_dxhat_xhat,
    r,
    rstd_e,
    alpha,
    beta,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
    IDX64: tl.constexpr,
    EXACT: tl.constexpr = False,
):
    """:func:`_dx_block` over elements [f_lo, f_hi) of a contiguous NCHW group, in 1-D tiles
    whose loads and stores are 128-bit wherever the group is 16-byte aligned, whatever L; each
    element's channel and per-channel values as in :func:`_normalize_flat`; ``EXACT`` as
    :func:`_dx_block`."""
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    CURV: tl.constexpr = (ACT == 1 or ACT == 2) if EXACT else False
    for fb in range(f_lo, f_hi, BLOCK):
        f = fb + tl.arange(0, BLOCK)
        mask = f < f_hi
        t = fb // L
        ch = t + (((f - t * L).to(tl.int64) * LINV) >> 32).to(tl.int32)
        w = tl.full((BLOCK,), 1.0, DT)
        bias = tl.zeros((BLOCK,), DT)
        s1 = tl.full((BLOCK,), 1.0, DT)
        sh = tl.zeros((BLOCK,), DT)
        nc = n.to(tl.int64) * C + c0 + ch
        if HAS_W:
            w = tl.load(W + c0 + ch, mask=mask, other=1.0).to(DT)
        if HAS_B:
            bias = tl.load(B + c0 + ch, mask=mask, other=0.0).to(DT)
        if HAS_SCALE:
            s1 = 1.0 + tl.load(SCALE + nc, mask=mask, other=0.0).to(DT)
        if HAS_SHIFT:
            sh = tl.load(SHIFT + nc, mask=mask, other=0.0).to(DT)
        if IDX64:
            f = f.to(tl.int64)
        v = tl.load(X + x_base + f, mask=mask, other=0.0)
        du = tl.load(DY + dy_base + f, mask=mask, other=0.0).to(DT)
        # masked lanes as 0: their x_hat from x = 0 could overflow the activation's exp
        d = tl.where(mask, (v.to(DT) - pivot) - smean, 0.0)
        xhat = d * rstd
        if ACT != 0:
            g1, g2 = _act_grads((xhat * w + bias) * s1 + sh, ACT)
            if CURV:
                g1 += g2 * (w * s1) * (alpha * d + beta)
            du = du * g1
        if EXACT:
            xhat = (d - r) * rstd_e
        dx = rstd_e * (du * (w * s1) - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(DX + dx_base + f, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_partial_chunk(
    X,
    DY,
    W,
    B,
    SCALE,
    SHIFT,
    PA,
    PB,
    C,
    L,
    sxC,
    sxL,
    sdC,
    sdL,
    CHUNK_L,
    K,
    n,
    c0,
    Cg,
    x_base,
    dy_base,
    pivot,
    smean,
    rstd,
    k,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    GSTRIDE=0,
    FLAT: tl.constexpr = False,
    VEC: tl.constexpr = 8,
    EXACT: tl.constexpr = False,
):
    """A, B of the group's channels over chunk k of positions, into PA, PB[n, k, c]; ``FLAT``:
    through aligned windows (:func:`_channel_sums_flat`). ``EXACT``: the seven float64 sums of
    :func:`_channel_sums` in PA[n, k, c, :] (PB is not written)."""
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    l_lo = k * CHUNK_L
    l_hi = tl.minimum(l_lo + CHUNK_L, L)
    for cb in range(0, Cg, BLOCK_C):
        c, cmask, w, bias, s1, sh = _channel_block(
            cb, n, c0, Cg, C, W, B, SCALE, SHIFT, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, DT
        )
        if FLAT:
            sums = _channel_sums_flat(
                X, DY, x_base, dy_base, c, cmask, l_lo, l_hi, L, GSTRIDE, pivot, smean, rstd, w,
                bias, s1, sh, ACT, BLOCK_L, IDX64, VEC, EXACT,
            )  # fmt: skip
        else:
            sums = _channel_sums(
                X, DY, x_base, dy_base, c, cmask, l_lo, l_hi, sxC, sxL, sdC, sdL, pivot, smean,
                rstd, w, bias, s1, sh, ACT, BLOCK_L, IDX64, EXACT,
            )  # fmt: skip
        nkc = (n.to(tl.int64) * K + k) * C + c0 + c
        if EXACT:
            _store_sums(PA, nkc, sums, cmask)
        else:
            tl.store(PA + nkc, sums[0], mask=cmask)
            tl.store(PB + nkc, sums[1], mask=cmask)


@triton.jit
def _store_sums(P, at, sums, cmask):
    """The seven float64 sums of :func:`_channel_sums` at P[at, :] (rows of 7)."""
    a, b, sd, sdd, h0, h1, h2 = sums
    tl.store(P + 7 * at, a, mask=cmask)
    tl.store(P + 7 * at + 1, b, mask=cmask)
    tl.store(P + 7 * at + 2, sd, mask=cmask)
    tl.store(P + 7 * at + 3, sdd, mask=cmask)
    tl.store(P + 7 * at + 4, h0, mask=cmask)
    tl.store(P + 7 * at + 5, h1, mask=cmask)
    tl.store(P + 7 * at + 6, h2, mask=cmask)


@triton.jit
def _run_saved(pid, OFFS, PIVOT, SMEAN, RSTD, SS, G, CG: tl.constexpr, GPP: tl.constexpr, BLOCK_C):
    """Channels-last run pid (see :func:`_gn_bwd_partial_kernel`): n, its first channel c_lo,
    local channels c, their mask, local groups gl and per channel its group's saved (pivot,
    shifted_mean, rstd) as (BLOCK_C, 1) columns, which the per-group helpers' arithmetic
    broadcasts like their scalars."""
    n, g0, c_lo, c, cmask, gl, _, _ = _run(pid, OFFS, OFFS, G, G // GPP, CG, GPP, BLOCK_C)
    rows = n * G + g0 + tl.arange(0, GPP)
    pivot = _spread(tl.load(PIVOT + rows), gl, GPP)[:, None]
    smean = _spread(tl.load(SMEAN + SS + rows), gl, GPP)[:, None]
    rstd = _spread(tl.load(RSTD + 4 * SS + rows), gl, GPP)[:, None]
    return n, c_lo, cmask, gl, pivot, smean, rstd


@triton.jit
def _bwd_program(
    pid,
    OFFS,
    PIVOT,
    SMEAN,
    RSTD,
    SS,
    G,
    sxN,
    sxC,
    sdN,
    sdC,
    sgN,
    sgC,
    GSTRIDE,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """What a backward program of row pid (a program id, or a wave ticket's row) works on: n,
    first channel c0, channels Cg, the int64 offsets of (n, c0, 0) in x, dy and dx, and the
    saved (pivot, shifted_mean, rstd): of group pid (``FLAT``: offsets g * GSTRIDE, see
    :func:`_group_bases`), or with ``GPP`` > 1 of channels-last run pid as per-channel columns
    (:func:`_run_saved`)."""
    if GPP > 1:
        n, c0, _, _, pivot, smean, rstd = _run_saved(
            pid, OFFS, PIVOT, SMEAN, RSTD, SS, G, CG, GPP, BLOCK_C
        )
        Cg = GPP * CG
    else:
        n = pid // G
        c0, Cg = _group_channels(OFFS, pid % G, CG)
        pivot = tl.load(PIVOT + pid)
        smean = tl.load(SMEAN + SS + pid)
        rstd = tl.load(RSTD + 4 * SS + pid)
    # the group's offset past the sample's: c0 * sC, or with FLAT g * GSTRIDE, as _group_bases
    # (an argument, whose divisibility the launch specializes)
    if FLAT:
        at_x = (pid % G).to(tl.int64) * GSTRIDE
        at_dy = at_x
        at_dx = at_x
    else:
        at_x = c0.to(tl.int64) * sxC
        at_dy = c0.to(tl.int64) * sdC
        at_dx = c0.to(tl.int64) * sgC
    n64 = n.to(tl.int64)
    return n, c0, Cg, n64 * sxN + at_x, n64 * sdN + at_dy, n64 * sgN + at_dx, pivot, smean, rstd


@triton.jit
def _gn_bwd_partial_kernel(
    X,
    DY,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    PIVOT,
    SMEAN,
    RSTD,
    SS,
    PA,
    PB,
    C,
    G,
    L,
    sxN,
    sxC,
    sxL,
    sdN,
    sdC,
    sdL,
    CHUNK_L,
    K,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    GPP: tl.constexpr = 1,
    GSTRIDE=0,
    FLAT: tl.constexpr = False,
    VEC: tl.constexpr = 8,
    EXACT: tl.constexpr = False,
):
    """Split regime, pass 1: program (n * G + g, k) writes A, B of its group's channels over
    its chunk of positions to partials PA, PB[n, k, c] (fp32, (N, K, C)). ``GPP`` > 1: program
    (n * G / GPP + r, k), of channels-last run r's channels, as one channel block (see
    :func:`_gn_fwd_partial_kernel`). ``FLAT``: a contiguous NCHW group of GSTRIDE elements
    (rows of L not 16-byte multiples), read through aligned windows
    (:func:`_channel_sums_flat`)."""
    n, c0, Cg, x_base, dy_base, _, pivot, smean, rstd = _bwd_program(
        tl.program_id(0), OFFS, PIVOT, SMEAN, RSTD, SS, G, sxN, sxC, sdN, sdC, 0, 0, GSTRIDE,
        CG, GPP, FLAT, BLOCK_C,
    )  # fmt: skip
    _bwd_partial_chunk(
        X, DY, W, B, SCALE, SHIFT, PA, PB, C, L, sxC, sxL, sdC, sdL, CHUNK_L, K, n, c0, Cg,
        x_base, dy_base, pivot, smean, rstd, tl.program_id(1), HAS_W, HAS_B, HAS_SCALE,
        HAS_SHIFT, ACT, BLOCK_C, BLOCK_L, IDX64, GSTRIDE, FLAT, VEC, EXACT,
    )  # fmt: skip


@triton.jit
def _merged_sums(
    PA,
    PB,
    n,
    K,
    C,
    c0,
    c,
    cmask,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VOLATILE: tl.constexpr,
    EXACT: tl.constexpr = False,
):
    """Per channel c0 + c: the sums over k of the partials PA, PB[n, k, c], BLOCK_K partials at
    a time as one (BLOCK_K, channels) tile (a fixed reduction tree: deterministic);
    ``VOLATILE``: written by programs still running. Returns the seven sums of
    :func:`_channel_sums` (``EXACT``: from PA's float64 sums, see :func:`_bwd_partial_chunk`;
    otherwise A and B, then 0)."""
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    a, b, sd, sdd, h0, h1, h2 = _no_sums(BLOCK_C, DT)
    for kb in range(0, K, BLOCK_K):
        kk = kb + tl.arange(0, BLOCK_K)
        m = (kk < K)[:, None] & cmask[None, :]
        nkc = (n.to(tl.int64) * K + kk)[:, None] * C + (c0 + c)[None, :]
        if EXACT:
            a += _merged(PA + 7 * nkc, m, VOLATILE)
            b += _merged(PA + 7 * nkc + 1, m, VOLATILE)
            sd += _merged(PA + 7 * nkc + 2, m, VOLATILE)
            sdd += _merged(PA + 7 * nkc + 3, m, VOLATILE)
            h0 += _merged(PA + 7 * nkc + 4, m, VOLATILE)
            h1 += _merged(PA + 7 * nkc + 5, m, VOLATILE)
            h2 += _merged(PA + 7 * nkc + 6, m, VOLATILE)
        else:
            a += _merged(PA + nkc, m, VOLATILE)
            b += _merged(PB + nkc, m, VOLATILE)
    return a, b, sd, sdd, h0, h1, h2


@triton.jit
def _merged(ptrs, m, VOLATILE: tl.constexpr):
    """The column sums of one (BLOCK_K, channels) tile of partials."""
    return tl.sum(tl.load(ptrs, mask=m, other=0.0, volatile=VOLATILE), axis=0)


@triton.jit
def _bwd_dx_chunk(
    X,
    DY,
    DX,
    W,
    B,
    SCALE,
    SHIFT,
    PA,
    PB,
    SUMS,
    SCR,
    C,
    L,
    sxC,
    sxL,
    sdC,
    sdL,
    sgC,
    sgL,
    CHUNK_L,
    K,
    n,
    c0,
    Cg,
    x_base,
    dy_base,
    dx_base,
    pivot,
    smean,
    rstd,
    k,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IDX64: tl.constexpr,
    VOLATILE: tl.constexpr,
    GSTRIDE=0,
    LINV=0,
    CHUNK_F=0,
    FLAT: tl.constexpr = False,
    VEC: tl.constexpr = 8,
    BLOCK_F: tl.constexpr = 1024,
    CG: tl.constexpr = 0,
    GPP: tl.constexpr = 1,
    EPS=0.0,
    EXACT: tl.constexpr = False,
):
    """The group's channels' A, B over the whole group (stored from chunk 0 for the parameter
    gradients), the group means, and dx of chunk k. ``GPP`` > 1: the "group" is a channels-last
    run of GPP groups of CG channels in one channel block, with per-channel columns of the
    saved statistics (:func:`_run_saved`), and the means are per group.

    FUSED (one chunk, CHUNK_L = L): A, B are computed here from x and dy. Otherwise they are
    the sums of the partials PA, PB[n, 0..K, c] (:func:`_merged_sums`). ``FLAT`` (a contiguous
    NCHW group of GSTRIDE elements): A, B are read through aligned windows
    (:func:`_channel_sums_flat`) and chunk k is elements [k * CHUNK_F, (k + 1) * CHUNK_F) of
    the group, in 1-D tiles of BLOCK_F (:func:`_dx_flat`).

    ``EXACT`` (float32 x, statistics not given): everything after the loads in float64, and
    the group's mean and rstd retaken from the float64 sums of d = (x - pivot) - shifted_mean
    and d^2 (r = mean d, rstd_e = 1 / sqrt(mean d^2 - r^2 + eps)), as the on-chip kernel
    recomputes them: from the saved float32 statistics, dx cancelled to 1.6-2.8x the float32
    bound at small spread (SiLU and GELU: up to 4.4x and 4.8x) and dweight of a gradient with a
    mean (y.sum()) to 1.2-1.7x. The sums see x_hat and du at the saved statistics; x_hat moves
    to (d - r) rstd_e = x_hat + alpha d + beta (alpha = rstd_e - rstd, beta = -r rstd_e), and
    du, to first order, by h (alpha d + beta) (h = dy act''(u) w (1 + scale), summed as sum h,
    h d, h d^2): so B_e = B + alpha sum h d + beta sum h and A_e = rstd_e (A_d - r B_e),
    A_d = sum du_e d. Per channel the sums go to SCR (N, C, 7) from chunk 0, which takes them
    to SUMS once the group's alpha and beta are known."""
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    CURV: tl.constexpr = (ACT == 1 or ACT == 2) if EXACT else False
    # per lane (channel cb + i of each block), summed over the blocks, then over the group:
    # wc B, wc A, d, d^2, wc h, wc h d, wc h d^2
    t_b, t_a, t_d, t_dd, t_h0, t_h1, t_h2 = _no_sums(BLOCK_C, DT)
    for cb in range(0, Cg, BLOCK_C):
        c, cmask, w, bias, s1, sh = _channel_block(
            cb, n, c0, Cg, C, W, B, SCALE, SHIFT, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, DT
        )
        if FUSED and FLAT:
            sums = _channel_sums_flat(
                X, DY, x_base, dy_base, c, cmask, 0, L, L, GSTRIDE, pivot, smean, rstd, w, bias,
                s1, sh, ACT, BLOCK_L, IDX64, VEC, EXACT,
            )  # fmt: skip
        elif FUSED:
            sums = _channel_sums(
                X, DY, x_base, dy_base, c, cmask, 0, L, sxC, sxL, sdC, sdL, pivot, smean, rstd,
                w, bias, s1, sh, ACT, BLOCK_L, IDX64, EXACT,
            )  # fmt: skip
        else:
            sums = _merged_sums(PA, PB, n, K, C, c0, c, cmask, BLOCK_C, BLOCK_K, VOLATILE, EXACT)
        a, b, sd, sdd, h0, h1, h2 = sums
        nc = n.to(tl.int64) * C + c0 + c
        if k == 0:
            if EXACT:
                _store_sums(SCR, nc, sums, cmask)
            else:
                tl.store(SUMS + 2 * nc, a.to(SUMS.dtype.element_ty), mask=cmask)
                tl.store(SUMS + 2 * nc + 1, b.to(SUMS.dtype.element_ty), mask=cmask)
        wc = tl.where(cmask, w * s1, 0.0)
        t_b += wc * b
        t_a += wc * a
        t_d += tl.where(cmask, sd, 0.0)
        t_dd += tl.where(cmask, sdd, 0.0)
        t_h0 += wc * h0
        t_h1 += wc * h1
        t_h2 += wc * h2
    if GPP > 1:
        # A channels-last run (one block): each channel takes its own group's means, as a
        # (BLOCK_C, 1) column that the tile arithmetic broadcasts like the scalars.
        gl = tl.arange(0, BLOCK_C) // CG
        count = (CG * 1.0) * L
        mean_dxhat = _group_sum(t_b, gl, GPP) / count
        mean_dxhat_xhat = _group_sum(t_a, gl, GPP) / count
        r = _group_sum(t_d, gl, GPP) / count
        var = _group_sum(t_dd, gl, GPP) / count - r * r
        m_h0 = _group_sum(t_h0, gl, GPP) / count
        m_h1 = _group_sum(t_h1, gl, GPP) / count
        m_h2 = _group_sum(t_h2, gl, GPP) / count
    else:
        count = (Cg * 1.0) * L  # float: Cg * L may exceed int32
        mean_dxhat = tl.sum(t_b, axis=0) / count
        mean_dxhat_xhat = tl.sum(t_a, axis=0) / count
        r = tl.sum(t_d, axis=0) / count
        var = tl.sum(t_dd, axis=0) / count - r * r
        m_h0 = tl.sum(t_h0, axis=0) / count
        m_h1 = tl.sum(t_h1, axis=0) / count
        m_h2 = tl.sum(t_h2, axis=0) / count
    if STATS_GIVEN:
        mean_dxhat = tl.zeros_like(mean_dxhat)
        mean_dxhat_xhat = tl.zeros_like(mean_dxhat_xhat)
    else:
        # A group of one element: dx = 0 exactly (y does not depend on x), where fused
        # multiply-adds would leave rstd times a rounding of du * w.
        rstd = tl.where(count > 1.0, rstd, 0.0)
    # the move of x_hat to the retaken statistics, x_hat + alpha d + beta: none without EXACT
    rstd_e = rstd
    alpha = tl.zeros_like(r)
    beta = alpha
    if EXACT:
        rstd_e = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + EPS)
        # one element: 0 as above, NaN at eps = 0 (rstd_e infinite, y NaN)
        rstd_e = tl.where(count > 1.0, rstd_e, 0.0 * rstd_e)
        # rstd as a (BLOCK_C, 1) column in a run, a scalar otherwise
        alpha = rstd_e - (tl.sum(rstd, axis=1) if GPP > 1 else rstd)
        beta = -r * rstd_e
        if CURV:
            mean_dxhat = mean_dxhat + alpha * m_h1 + beta * m_h0
            mean_dxhat_xhat = mean_dxhat_xhat + alpha * m_h2 + beta * m_h1
        mean_dxhat_xhat = rstd_e * (mean_dxhat_xhat - r * mean_dxhat)
        if k == 0:
            # the parameter gradients' A and B as retaken, per channel from SCR
            tl.debug_barrier()
            for cb in range(0, Cg, BLOCK_C):
                c = cb + tl.arange(0, BLOCK_C)
                cmask = c < Cg
                nc = n.to(tl.int64) * C + c0 + c
                a = tl.load(SCR + 7 * nc, mask=cmask, other=0.0)
                b = tl.load(SCR + 7 * nc + 1, mask=cmask, other=0.0)
                if CURV:
                    h0 = tl.load(SCR + 7 * nc + 4, mask=cmask, other=0.0)
                    h1 = tl.load(SCR + 7 * nc + 5, mask=cmask, other=0.0)
                    h2 = tl.load(SCR + 7 * nc + 6, mask=cmask, other=0.0)
                    b = b + alpha * h1 + beta * h0
                    a = a + alpha * h2 + beta * h1
                tl.store(SUMS + 2 * nc, rstd_e * (a - r * b), mask=cmask)
                tl.store(SUMS + 2 * nc + 1, b, mask=cmask)
    if GPP > 1:
        mean_dxhat = mean_dxhat[:, None]
        mean_dxhat_xhat = mean_dxhat_xhat[:, None]
        r = r[:, None]
        alpha = alpha[:, None]
        beta = beta[:, None]
        if EXACT:
            rstd_e = rstd_e[:, None]
    if FLAT:
        f_lo = k * CHUNK_F
        _dx_flat(
            X, DY, DX, x_base, dy_base, dx_base, n, c0, f_lo,
            tl.minimum(f_lo + CHUNK_F, GSTRIDE), L, LINV, pivot, smean, rstd, W, B, SCALE, SHIFT,
            C, mean_dxhat, mean_dxhat_xhat, r, rstd_e, alpha, beta, HAS_W, HAS_B, HAS_SCALE,
            HAS_SHIFT, ACT, BLOCK_F, IDX64, EXACT,
        )  # fmt: skip
        return
    l_lo = k * CHUNK_L
    l_hi = tl.minimum(l_lo + CHUNK_L, L)
    for cb in range(0, Cg, BLOCK_C):
        c, cmask, w, bias, s1, sh = _channel_block(
            cb, n, c0, Cg, C, W, B, SCALE, SHIFT, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C, DT
        )
        _dx_block(
            X, DY, DX, x_base, dy_base, dx_base, c, cmask, l_lo, l_hi, sxC, sxL, sdC, sdL, sgC,
            sgL, pivot, smean, rstd, w, bias, s1, sh, mean_dxhat, mean_dxhat_xhat, r, rstd_e,
            alpha, beta, ACT, BLOCK_L, IDX64, EXACT,
        )  # fmt: skip


@triton.jit
def _gn_bwd_dx_kernel(
    X,
    DY,
    DX,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    PIVOT,
    SMEAN,
    RSTD,
    SS,
    PA,
    PB,
    SUMS,
    SCR,
    C,
    G,
    L,
    sxN,
    sxC,
    sxL,
    sdN,
    sdC,
    sdL,
    sgN,
    sgC,
    sgL,
    CHUNK_L,
    K,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    GPP: tl.constexpr = 1,
    GSTRIDE=0,
    LINV=0,
    CHUNK_F=0,
    FLAT: tl.constexpr = False,
    VEC: tl.constexpr = 8,
    BLOCK_F: tl.constexpr = 1024,
    EPS=0.0,
    EXACT: tl.constexpr = False,
):
    """Program (n * G + g, k): :func:`_bwd_dx_chunk` of its group and chunk (the fused regime:
    one chunk, A and B from x and dy; split: from the partial kernel's PA, PB). ``GPP`` > 1:
    program (n * G / GPP + r, k) does so for every group of channels-last run r at once, the
    group means folded from the run's per-channel A, B by :func:`_group_sum`. ``FLAT``: see
    :func:`_bwd_dx_chunk`."""
    n, c0, Cg, x_base, dy_base, dx_base, pivot, smean, rstd = _bwd_program(
        tl.program_id(0), OFFS, PIVOT, SMEAN, RSTD, SS, G, sxN, sxC, sdN, sdC, sgN, sgC,
        GSTRIDE, CG, GPP, FLAT, BLOCK_C,
    )  # fmt: skip
    _bwd_dx_chunk(
        X, DY, DX, W, B, SCALE, SHIFT, PA, PB, SUMS, SCR, C, L, sxC, sxL, sdC, sdL, sgC, sgL,
        CHUNK_L, K, n, c0, Cg, x_base, dy_base, dx_base, pivot, smean, rstd, _reversed_chunk(),
        HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT, STATS_GIVEN, FUSED, BLOCK_C, BLOCK_L, BLOCK_K,
        IDX64, False, GSTRIDE, LINV, CHUNK_F, FLAT, VEC, BLOCK_F, CG, GPP, EPS, EXACT,
    )  # fmt: skip


@triton.jit
def _gn_bwd_wave_kernel(
    X,
    DY,
    DX,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    PIVOT,
    SMEAN,
    RSTD,
    SS,
    PA,
    PB,
    SUMS,
    SCR,
    SYNC,
    C,
    G,
    L,
    sxN,
    sxC,
    sxL,
    sdN,
    sdC,
    sdL,
    sgN,
    sgC,
    sgL,
    CHUNK_L,
    K,
    ROWS,
    WAVE_ROWS,
    WAVES,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IDX64: tl.constexpr,
    CG: tl.constexpr,
    GPP: tl.constexpr = 1,
    GSTRIDE=0,
    LINV=0,
    CHUNK_F=0,
    FLAT: tl.constexpr = False,
    VEC: tl.constexpr = 8,
    BLOCK_F: tl.constexpr = 1024,
    EPS=0.0,
    EXACT: tl.constexpr = False,
):
    """Wave regime, backward: the tickets of :func:`_gn_fwd_wave_kernel`, an S ticket writing
    a chunk's partial A, B (:func:`_bwd_partial_chunk`), an N ticket its dx
    (:func:`_bwd_dx_chunk`) once its row's K partials are released. A row is a group, or with
    ``GPP`` > 1 a channels-last run of groups; ``FLAT``: see :func:`_bwd_dx_chunk`."""
    total = 2 * WAVES * WAVE_ROWS * K
    t = tl.atomic_add(SYNC, 1)
    while t < total:
        following = tl.atomic_add(SYNC, 1)
        stats, row, k = _ticket(t, K, WAVE_ROWS, WAVES)
        if row < ROWS:
            n, c0, Cg, x_base, dy_base, dx_base, pivot, smean, rstd = _bwd_program(
                row, OFFS, PIVOT, SMEAN, RSTD, SS, G, sxN, sxC, sdN, sdC, sgN, sgC, GSTRIDE,
                CG, GPP, FLAT, BLOCK_C,
            )  # fmt: skip
            if stats:
                _bwd_partial_chunk(
                    X, DY, W, B, SCALE, SHIFT, PA, PB, C, L, sxC, sxL, sdC, sdL, CHUNK_L, K, n,
                    c0, Cg, x_base, dy_base, pivot, smean, rstd, k, HAS_W, HAS_B, HAS_SCALE,
                    HAS_SHIFT, ACT, BLOCK_C, BLOCK_L, IDX64, GSTRIDE, FLAT, VEC, EXACT,
                )  # fmt: skip
                _release_partials(SYNC, row)
            else:
                _await_partials(SYNC, row, K)
                _bwd_dx_chunk(
                    X, DY, DX, W, B, SCALE, SHIFT, PA, PB, SUMS, SCR, C, L, sxC, sxL, sdC, sdL, sgC,
                    sgL, CHUNK_L, K, n, c0, Cg, x_base, dy_base, dx_base, pivot, smean, rstd, k,
                    HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT, STATS_GIVEN, False, BLOCK_C, BLOCK_L,
                    BLOCK_K, IDX64, True, GSTRIDE, LINV, CHUNK_F, FLAT, VEC, BLOCK_F, CG, GPP, EPS,
                    EXACT,
                )  # fmt: skip
        t = following


@triton.jit
def _gn_bwd_param_kernel(
    SUMS,
    W,
    B,
    SCALE,
    DW,
    DB,
    DSCALE,
    DSHIFT,
    N,
    C,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Parameter gradients from the per-(n, c) sums A, B (the (N, C, 2) buffer SUMS), over n in
    order (deterministic): dweight = sum_n (1 + scale) A, dbias = sum_n (1 + scale) B,
    dscale = w A + bias B, dshift = B."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    DT: tl.constexpr = SUMS.dtype.element_ty  # float64 for float32 x
    w = tl.full((BLOCK,), 1.0, DT)
    bias = tl.zeros((BLOCK,), DT)
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=1.0).to(DT)
    if HAS_B:
        bias = tl.load(B + c, mask=cmask, other=0.0).to(DT)
    dw = tl.zeros((BLOCK,), DT)
    db = tl.zeros((BLOCK,), DT)
    nc = c.to(tl.int64)  # n * C + c, advanced by C per sample (int64 without a multiply)
    for _ in range(0, N):
        a = tl.load(SUMS + 2 * nc, mask=cmask, other=0.0)
        b = tl.load(SUMS + 2 * nc + 1, mask=cmask, other=0.0)
        s1 = tl.full((BLOCK,), 1.0, DT)
        if HAS_SCALE:
            s1 = 1.0 + tl.load(SCALE + nc, mask=cmask, other=0.0).to(DT)
            tl.store(DSCALE + nc, (w * a + bias * b).to(DSCALE.dtype.element_ty), mask=cmask)
        if HAS_SHIFT:
            tl.store(DSHIFT + nc, b.to(DSHIFT.dtype.element_ty), mask=cmask)
        dw += s1 * a
        db += s1 * b
        nc += C
    if HAS_W:
        tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(DB + c, db.to(DB.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# launchers: allocation, checks, grid
# ----------------------------------------------------------------------------------------------


def _flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(sN, sC, sL) when t's positions are one index l with a single stride, else None."""
    shape, strides = t.shape, t.stride()
    try:
        return _flat_strides_of(shape, strides)
    except TypeError:  # symbolic sizes (a dynamic-shape trace's fake tensors) do not hash
        return _flat_strides_of.__wrapped__(shape, strides)


@lru_cache(maxsize=1024)
def _flat_strides_of(
    shape: tuple[int, ...], strides: tuple[int, ...]
) -> tuple[int, int, int] | None:
    sN, sC = strides[0], strides[1]
    dims = [(s, st) for s, st in zip(shape[2:], strides[2:], strict=True) if s != 1]
    if not dims:
        return sN, sC, 1
    for (_, outer), (size, inner) in zip(dims, dims[1:], strict=False):
        if outer != inner * size:
            return None
    return sN, sC, dims[-1][1]


def _flat_view(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x and its (sN, sC, sL). NCHW, channels-last (NHWC/NDHWC/NLC), (N, C) and any view whose
    positions collapse to one stride are used as they are; any other view is copied once to
    NCHW-contiguous (the only copy the Triton backend makes of x or dy)."""
    strides = _flat_strides(x)
    if strides is None:
        x = _copied(x)
        strides = _flat_strides(x)
        assert strides is not None
    return x, strides


def _max_offset(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(shape, strides, strict=True))


@lru_cache(maxsize=256)
def _plan(sizes: tuple[int, ...]) -> GroupPlan:
    """The plan of ``sizes``: the op and the kernels carry sizes, the helpers take plans."""
    return GroupPlan(sizes)


@lru_cache(maxsize=256)
def _offsets_tensor(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(_plan(sizes).offsets, dtype=torch.int32, device=device)


@lru_cache(maxsize=256)
def _group_index_tensor(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Group of each channel (C,) int32: the on-chip kernels' map for uneven plans."""
    return torch.tensor(_plan(sizes).channel_group, dtype=torch.int32, device=device)


@lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def _unit_stride(strides: tuple[int, int, int]) -> bool:
    """Positions (NCHW) or channels (channels-last) adjacent: what the on-chip kernels need."""
    return strides[2] == 1 or strides[1] == 1


def _channels_fast(strides: tuple[int, int, int]) -> bool:
    return strides[1] == 1 and strides[2] != 1


class _Launch(NamedTuple):
    """What one call's launches need besides its tensors: a pure function of shapes, strides,
    dtypes, the plan and the options, so it is decided once per such signature (a call on a
    small tensor is otherwise dominated by these decisions)."""

    cfg: LaunchConfig
    onchip: dict[str, Any]  # the on-chip kernels' options (``flags`` included)
    flags: dict[str, Any]  # options every kernel of the call takes
    has: dict[str, bool]  # which of weight, bias, scale, shift are given
    offs: torch.Tensor  # (G + 1,) int32 channel offsets of the groups
    group_index: torch.Tensor  # (C,) int32 group of each channel
    copy_x: bool  # x's positions do not collapse to one stride: read from an NCHW copy
    xs: tuple[int, int, int]  # (sN, sC, sL) of x as read
    outs: tuple[int, int, int]  # (sN, sC, sL) of y (forward) or dx (backward)
    copy_dy: bool  # as copy_x, for dy (backward)
    dys: tuple[int, int, int] | None  # (sN, sC, sL) of dy as read (backward)
    L: int  # positions per channel
    write_sums: bool  # backward: per-channel sums for the parameter gradients
    param_block: int  # backward: channels per program of the parameter kernel
    param_grid: tuple[int]  # backward: the parameter kernel's grid
    dx_flat: dict[str, int]  # backward, flat plans: the dx kernel's flat chunking
    rows: int  # N * G: statistics per field
    grid: tuple[int]  # the on-chip kernel's grid: N x on-chip programs per sample
    ints: tuple[int, ...]  # the on-chip kernel's integer arguments after its tensors


def _read_as(
    shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype
) -> tuple[bool, torch.Tensor]:
    """Whether a tensor of this shape and these strides is copied before the kernels read it,
    and (meta) the tensor they read (see :func:`_flat_view`)."""
    t = torch.empty_strided(shape, strides, dtype=dtype, device="meta")
    read = _flat_view(t)[0]
    return read is not t, read


@lru_cache(maxsize=1024)
def _launch(
    direction: str,
    shape: tuple[int, ...],
    x_strides: tuple[int, ...],
    dy_strides: tuple[int, ...] | None,
    dtype: torch.dtype,
    device: torch.device,
    sizes: tuple[int, ...],
    regime: str,
    has: tuple[bool, ...],
    activation: str | None,
) -> _Launch:
    """The launch for x of ``shape`` and ``x_strides`` (and dy's strides, backward); raises
    for what the kernels cannot take (checked here once per signature)."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the Triton kernels take x in {[str(d) for d in KERNEL_DTYPES]}, got "
            f"{dtype}; use backend='torch' for it"
        )
    if len(shape) < 2 or sum(sizes) != shape[1]:
        raise ValueError(f"group sizes {list(sizes)} must sum to C of x with shape {shape}")
    copy_x, xv = _read_as(shape, x_strides, dtype)
    strides = _flat_strides(xv)
    out = _flat_strides(torch.empty_like(xv))
    assert strides is not None and out is not None
    if _channels_fast(strides) and not _channels_fast(out):
        # An (N, C, 1, ...) view expanded over its positions: channel stride 1, yet its output
        # (empty_like) is NCHW. The kernels take y's or dx's channels adjacent where x's are,
        # so such an x is read from its NCHW copy.
        copy_x, xv = True, torch.empty(shape, dtype=dtype, device="meta")
        strides = out = _flat_strides(xv)
        assert strides is not None and out is not None
    full = [xv.stride(), torch.empty_like(xv).stride()]
    copy_dy, dys = False, None
    if dy_strides is not None:
        copy_dy, dyv = _read_as(shape, dy_strides, dtype)
        dys = _flat_strides(dyv)
        full.append(dyv.stride())
    N = shape[0]
    L = math.prod(shape[2:])
    unit = _unit_stride(strides) and (dys is None or _unit_stride(dys))
    even = min(sizes) == max(sizes)
    # Each group one contiguous run of elements, in x and in y or dx and dy (NCHW with sC = L).
    contiguous_groups = all(st[1:] == (L, 1) for st in (strides, out, dys) if st is not None)
    cfg = choose_config(
        N,
        L if N else 1,
        max(sizes),
        len(sizes),
        _channels_fast(strides),
        _sm_count(device),
        regime if N else "auto",  # nothing is launched for an empty batch
        even=even,
        elem_bytes=xv.element_size(),
        direction=direction,
        unit_stride=unit,
        contiguous_groups=contiguous_groups,
    )
    # the float64 backward's activation derivatives (_bwd_dx_chunk) spill at full tiles
    act64 = False
    if direction == "bwd" and cfg.regime != "onchip" and dtype == torch.float32 and activation:
        act64 = True
        wide = cfg.regime == "wave" or (cfg.flat and cfg.regime == "fused")
        shrink = EXACT_ACT_SHRINK[activation][wide]
        cfg = dataclasses.replace(cfg, block_l=max(1, cfg.block_l // shrink))
    int64 = any(_max_offset(shape, st) > _INT32_MAX for st in full)
    named = dict(zip(("HAS_W", "HAS_B", "HAS_SCALE", "HAS_SHIFT"), has, strict=True))
    common = dict(
        named,
        ACT=triton_code(activation),
        BLOCK_C=cfg.block_c,
        BLOCK_L=cfg.block_l,
        IDX64=int64,
        CG=sizes[0] if even else 0,
    )
    flags = common
    # The loop kernels' flat layout: GSTRIDE = Cg * L, LINV = ceil(2^32 / L) (see
    # _normalize_flat); unused (0) otherwise.
    gstride, linv = (sizes[0] * L, -(-(1 << 32) // L)) if cfg.flat else (0, 0)
    dx_flat: dict[str, int] = {}
    if direction == "fwd":
        flags = dict(common, FLAT=cfg.flat, GSTRIDE=gstride, LINV=linv)
    elif cfg.flat:
        flags = dict(common, FLAT=True, GSTRIDE=gstride, VEC=VECTOR_BYTES // xv.element_size())
        # dx: chunk k is the k-th of ``chunks`` runs of whole FLAT_DX_BLOCK tiles
        per_chunk = -(-gstride // cfg.chunks)
        chunk_f = -(-per_chunk // FLAT_DX_BLOCK) * FLAT_DX_BLOCK
        block_f = FLAT_DX_BLOCK // (EXACT_ACT_SHRINK_DX if act64 else 1)
        dx_flat = dict(LINV=linv, CHUNK_F=chunk_f, BLOCK_F=block_f)
    if cfg.regime != "onchip" and cfg.groups_per_program > 1:
        flags = dict(flags, GPP=cfg.groups_per_program)  # channels-last runs of groups
    onchip = dict(
        common,
        GPP=cfg.groups_per_program,
        CHANNELS_LAST=_channels_fast(strides),
        num_warps=cfg.num_warps,
    )
    write_sums = any(has)
    param_block = min(next_pow2(shape[1]), 1024)
    if dys is not None:
        onchip.update(WRITE_SUMS=write_sums, DY_CHANNELS_LAST=_channels_fast(dys))
    programs = -(-len(sizes) // cfg.groups_per_program)
    return _Launch(
        cfg,
        onchip,
        flags,
        named,
        _offsets_tensor(sizes, device),
        _group_index_tensor(sizes, device),
        copy_x,
        strides,
        out,
        copy_dy,
        dys,
        L,
        write_sums,
        param_block,
        (-(-shape[1] // param_block),),
        dx_flat,
        N * len(sizes),
        (N * programs,),
        (shape[1], len(sizes), L, programs, *strides, *(dys or ()), *out),
    )


def _launch_of(
    direction: str,
    x: torch.Tensor,
    dy: torch.Tensor | None,
    sizes: tuple[int, ...],
    regime: str,
    params: tuple[torch.Tensor | None, ...],
    activation: str | None,
) -> _Launch:
    """:func:`_launch` for these tensors (weight, bias, scale, shift in ``params``)."""
    w, b, sc, sh = params
    return _launch(
        direction,
        x.shape,
        x.stride(),
        None if dy is None else dy.stride(),
        x.dtype,
        x.device,
        sizes,
        regime,
        (w is not None, b is not None, sc is not None, sh is not None),
        activation,
    )


def _check_op_inputs(
    x: torch.Tensor, dy: torch.Tensor | None, params: tuple[torch.Tensor | None, ...]
) -> None:
    """What the ops' callers inside this package checked already, for a direct call of an op:
    the parameters on x's device and dy of x's shape."""
    for t in params:
        if t is not None and t.device != x.device:
            raise ValueError(f"a parameter is on {t.device} but x is on {x.device}")
    if dy is not None and dy.shape != x.shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, x has {tuple(x.shape)}")


def _copied(t: torch.Tensor) -> torch.Tensor:
    """t as NCHW-contiguous (an empty tensor counts as contiguous whatever its strides, and
    contiguous() keeps them: it gets the standard ones)."""
    return t.contiguous() if t.numel() else t.new_empty(t.shape)


def _stat_buffers(x: torch.Tensor, G: int, packed: int | None) -> tuple[list[torch.Tensor], int]:
    """The fields (pivot, shifted_mean, m2, count, rstd), each (N, G) float32, and SS: five
    tensors and SS = 0 (a custom op's outputs must not alias each other), or, ``packed`` being
    N * G, one flat buffer standing for every field and SS = N * G: field k of row n * G + g
    at k * SS + n * G + g."""
    if packed is not None:
        return [x.new_empty(5 * packed, dtype=torch.float32)] * 5, packed
    return [torch.empty((x.shape[0], G), dtype=torch.float32, device=x.device) for _ in range(5)], 0


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    sizes: tuple[int, ...],
    eps: float,
    activation: str | None,
    stats: tuple[torch.Tensor, ...] | None,
    regime: str,
    packed: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward; returns (y, pivot, shifted_mean, m2, count, rstd), stats (N, G) fp32,
    or ``packed`` (no given ``stats``): (y, buffer) with the flat buffer of the fields."""
    epilogue = (weight, bias, scale, shift)
    plan = _launch_of("fwd", x, None, sizes, regime, epilogue, activation)
    xv = _copied(x) if plan.copy_x else x
    y = torch.empty_like(xv)
    G = len(sizes)
    (pivot, smean, m2, count, rstd), ss = _stat_buffers(x, G, plan.rows if packed else None)
    if packed:
        assert stats is None, "given statistics are normalized with from their own tensors"
        out: tuple[torch.Tensor, ...] = (y, pivot)
    else:
        out = (y, pivot, smean, m2, count, rstd)
    if not plan.rows:
        return out
    cfg, offs = plan.cfg, plan.offs
    params = [xv if t is None else t.contiguous() for t in epilogue]
    if stats is None and cfg.regime == "onchip":
        _gn_fwd_onchip_kernel[plan.grid](
            xv, y, *params, offs, plan.group_index, pivot, smean, m2, count, rstd, ss,
            *plan.ints, eps, **plan.onchip,
        )  # fmt: skip
        return out
    N, C = x.shape[:2]
    L, flags = plan.L, plan.flags
    sxN, sxC, sxL = plan.xs
    strides = plan.xs + plan.outs
    # programs per chunk: one per group, or per channels-last run of groups (GPP); given
    # statistics under an on-chip plan are normalized per group
    programs = N * G // flags.get("GPP", 1)
    if stats is None and cfg.regime == "fused":
        _gn_fwd_fused_kernel[(programs,)](
            xv, y, *params, offs, pivot, smean, m2, count, rstd, ss, C, G, L, *strides, eps,
            **flags,
        )  # fmt: skip
        return out
    if stats is None:
        K = cfg.chunks
        # (count, mean, m2) partials; float32 x's means in float64 (see _centred)
        wide = torch.float64 if x.dtype == torch.float32 else torch.float32
        parts = [x.new_empty((N, G, K), dtype=dt) for dt in (torch.float32, wide, torch.float32)]
        if cfg.regime == "wave":
            sync = x.new_zeros(1 + N * G, dtype=torch.int32)  # ticket counter, then per row
            _gn_fwd_wave_kernel[(cfg.programs,)](
                xv, y, *params, offs, pivot, *parts, smean, m2, count, rstd, ss, sync, C, G, L,
                *strides, eps, cfg.chunk_l, K, programs, cfg.wave_rows, cfg.waves,
                BLOCK_KP=next_pow2(K), num_warps=cfg.num_warps, **flags,
            )  # fmt: skip
            return out
        _gn_fwd_partial_kernel[(programs, K)](
            xv,
            offs,
            pivot,
            *parts,
            G,
            L,
            sxN,
            sxC,
            sxL,
            cfg.chunk_l,
            K,
            GSTRIDE=flags["GSTRIDE"],
            BLOCK_C=cfg.block_c,
            BLOCK_L=cfg.block_l,
            IDX64=flags["IDX64"],
            CG=flags["CG"],
            FLAT=flags["FLAT"],
            GPP=cfg.groups_per_program,
        )
    else:
        K = 1
        given_pivot, given_mean, given_m2, given_count = (
            t.to(device=x.device, dtype=torch.float32).contiguous() for t in stats
        )
        pivot.copy_(given_pivot)
        parts = [given_count, given_mean, given_m2]
    _gn_fwd_normalize_kernel[(programs, cfg.chunks)](
        xv,
        y,
        *params,
        offs,
        pivot,
        *parts,
        smean,
        m2,
        count,
        rstd,
        ss,
        C,
        G,
        L,
        *strides,
        eps,
        cfg.chunk_l,
        K,
        BLOCK_KP=next_pow2(K),
        **flags,
    )
    if stats is not None:
        # The kernel's shifted mean is the given one merged over one part, sum(cnt * mean) /
        # cnt in float32, an ulp off it at times: the backward reads the given one, or dweight
        # took that ulp times rstd * sum(dy) (11x the float32 bound).
        smean.copy_(parts[1])
    return out


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    sizes: tuple[int, ...],
    pivot: torch.Tensor,
    smean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str | None,
    stats_given: bool,
    regime: str,
    dx_float32: bool,
    eps: float,
    ss: int = 0,
) -> tuple[Any, ...]:
    """Launch the backward; returns (dx, dweight, dbias, dscale, dshift), None where absent.
    dx is in x's dtype, or float32 when ``dx_float32`` (for gradients still to be added).
    ``ss``: the statistics are one packed buffer (see :func:`_stat_buffers`). The on-chip
    kernel takes a float32 x's backward in float64 (``EXACT``): from its own statistics (with
    ``eps``), or from given ones with ``rstd`` in float64 (:func:`_given_rstd`); other regimes
    read rstd in float32."""
    epilogue = (weight, bias, scale, shift)
    if 0 in dy.stride() and dy.numel() > 1:
        # An expanded gradient (y.sum().backward()) is no unit-stride input, which sent the
        # backward to a loop regime in float32 (dx 2.3x the bound at small spread) instead of
        # the on-chip one its size gets: read it dense, in x's layout.
        dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
    plan = _launch_of("bwd", x, dy, sizes, regime, epilogue, activation)
    xv = _copied(x) if plan.copy_x else x
    dyv = _copied(dy) if plan.copy_dy else dy
    dx = torch.empty_like(xv, dtype=torch.float32) if dx_float32 else torch.empty_like(xv)
    # new_empty: contiguous, as the kernels index them ((C,) and (N, C)) whatever the
    # parameters' strides.
    grads = [None if t is None else t.new_empty(t.shape) for t in epilogue]
    if not plan.rows:
        return (dx, *(None if g is None else g.zero_() for g in grads))
    cfg, offs, flags, has = plan.cfg, plan.offs, plan.flags, plan.has
    params = [xv if t is None else t.contiguous() for t in epilogue]
    stats = (pivot.contiguous(), smean.contiguous(), rstd.contiguous())
    N, C = x.shape[:2]
    # Float32 x takes its backward in float64 (see the module's docstring and _bwd_dx_chunk);
    # half precision is judged against torch's own rounding.
    f32 = x.dtype == torch.float32
    # (N, C, 2): A and B of each channel
    sums = x.new_empty(2 * N * C, dtype=torch.float64 if f32 else torch.float32)
    exact = cfg.regime == "onchip" and f32
    if rstd.dtype != torch.float32 and not exact:
        stats = (stats[0], stats[1], rstd.float())
    if cfg.regime == "onchip":
        _gn_bwd_onchip_kernel[plan.grid](
            xv, dyv, dx, *params, offs, plan.group_index, *stats, ss, sums, *plan.ints, eps,
            STATS_GIVEN=stats_given, EXACT=exact, **plan.onchip,
        )  # fmt: skip
    else:
        G, K = len(sizes), cfg.chunks
        dys = plan.dys
        assert dys is not None
        strides = (C, G, plan.L, *plan.xs, *dys)
        fused = cfg.regime == "fused"
        # Partials merged as (BLOCK_K, BLOCK_C) tiles of at most one TILE.
        block_k = min(next_pow2(K), max(1, TILE // cfg.block_c))
        loop_exact = f32 and not stats_given
        scratch = x.new_empty((N, C, 7), dtype=torch.float64) if loop_exact else sums
        if fused:
            parts = [sums] * 2  # not read: A, B come straight from x and dy
        elif loop_exact:
            parts = [x.new_empty((N, K, C, 7), dtype=torch.float64)] * 2
        else:
            parts = [x.new_empty((N, K, C), dtype=torch.float32) for _ in range(2)]
        if cfg.regime == "wave":
            sync = x.new_zeros(1 + N * G, dtype=torch.int32)  # ticket counter, then per row
            _gn_bwd_wave_kernel[(cfg.programs,)](
                xv, dyv, dx, *params, offs, *stats, ss, *parts, sums, scratch, sync, *strides,
                *plan.outs, cfg.chunk_l, K, N * G // flags.get("GPP", 1), cfg.wave_rows,
                cfg.waves, STATS_GIVEN=stats_given, BLOCK_K=block_k, num_warps=cfg.num_warps,
                **flags, **plan.dx_flat, EPS=eps, EXACT=loop_exact,
            )  # fmt: skip
        else:
            grid = (N * G // flags.get("GPP", 1), K)
            if not fused:
                _gn_bwd_partial_kernel[grid](
                    xv, dyv, *params, offs, *stats, ss, *parts, *strides, cfg.chunk_l, K,
                    **flags, EXACT=loop_exact,
                )  # fmt: skip
            _gn_bwd_dx_kernel[grid](
                xv, dyv, dx, *params, offs, *stats, ss, *parts, sums, scratch, *strides, *plan.outs,
                cfg.chunk_l, K, STATS_GIVEN=stats_given, FUSED=fused, BLOCK_K=block_k, **flags,
                **plan.dx_flat, EPS=eps, EXACT=loop_exact,
            )  # fmt: skip
    if plan.write_sums:  # no parameter kernel without parameters
        _gn_bwd_param_kernel[plan.param_grid](
            sums,
            params[0],
            params[1],
            params[2],
            *[xv if g is None else g for g in grads],
            N,
            C,
            BLOCK=plan.param_block,
            **has,
        )
    return (dx, *grads)


# ----------------------------------------------------------------------------------------------
# torch.library op (opaque to torch.compile: no graph break, fake impl for shapes)
# ----------------------------------------------------------------------------------------------

_Stats6 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("groupnorm::triton_group_norm_fwd", mutates_args=())
def group_norm_fwd_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045  (torch's schema inference needs Optional)
    bias: Optional[torch.Tensor],  # noqa: UP045
    scale: Optional[torch.Tensor],  # noqa: UP045
    shift: Optional[torch.Tensor],  # noqa: UP045
    sizes: list[int],
    eps: float,
    activation: Optional[str],  # noqa: UP045
    stats_pivot: Optional[torch.Tensor],  # noqa: UP045
    stats_mean: Optional[torch.Tensor],  # noqa: UP045
    stats_m2: Optional[torch.Tensor],  # noqa: UP045
    stats_count: Optional[torch.Tensor],  # noqa: UP045
    regime: str,
) -> _Stats6:
    """(y, pivot, shifted_mean, m2, count, rstd); the statistics are (N, G) fp32. With the four
    stats_* given, x is normalized with them."""
    given = None
    if (
        stats_pivot is not None
        and stats_mean is not None
        and stats_m2 is not None
        and stats_count is not None
    ):
        given = (stats_pivot, stats_mean, stats_m2, stats_count)
    _check_op_inputs(x, None, (weight, bias, scale, shift))
    y, pivot, smean, m2, count, rstd = _forward(
        x, weight, bias, scale, shift, tuple(sizes), eps, activation, given, regime
    )
    return y, pivot, smean, m2, count, rstd


@group_norm_fwd_op.register_fake
def _(
    x,
    weight,
    bias,
    scale,
    shift,
    sizes,
    eps,
    activation,
    stats_pivot,
    stats_mean,
    stats_m2,
    stats_count,
    regime,
):
    y = torch.empty_like(_flat_view(x)[0])
    stats = [x.new_empty((x.shape[0], len(sizes)), dtype=torch.float32) for _ in range(5)]
    return (y, *stats)


@torch.library.custom_op("groupnorm::triton_group_norm_bwd", mutates_args=())
def group_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    scale: Optional[torch.Tensor],  # noqa: UP045
    shift: Optional[torch.Tensor],  # noqa: UP045
    sizes: list[int],
    pivot: torch.Tensor,
    shifted_mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: Optional[str],  # noqa: UP045
    stats_given: bool,
    regime: str,
    dx_float32: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dscale, dshift); a (0,) tensor stands for an absent parameter; dx
    in float32 when ``dx_float32``, else in x's dtype."""
    _check_op_inputs(x, dy, (weight, bias, scale, shift))
    dx, *grads = _backward(
        dy,
        x,
        weight,
        bias,
        scale,
        shift,
        tuple(sizes),
        pivot,
        shifted_mean,
        rstd,
        activation,
        stats_given,
        regime,
        dx_float32,
        eps,
    )
    dw, db, dscale, dshift = (dy.new_empty(0) if g is None else g for g in grads)
    return dx, dw, db, dscale, dshift


@group_norm_bwd_op.register_fake
def _(
    dy,
    x,
    weight,
    bias,
    scale,
    shift,
    sizes,
    pivot,
    shifted_mean,
    rstd,
    activation,
    stats_given,
    regime,
    dx_float32,
    eps,
):
    def like(t):
        return (
            x.new_empty(0)
            if t is None
            else torch.empty_like(t, memory_format=torch.contiguous_format)
        )

    xv = _flat_view(x)[0]
    dx = torch.empty_like(xv, dtype=torch.float32 if dx_float32 else xv.dtype)
    return (dx, *(like(t) for t in (weight, bias, scale, shift)))


# ----------------------------------------------------------------------------------------------
# autograd: y depends on x, weight, bias, scale, shift and on given statistics; the statistics
# it returns depend on x (shifted_mean and m2; pivot, count and rstd are constants), as on the
# torch backend, whose pivot is detached. With u = dL/dx_hat and dx = rstd * u per element, a
# group's given statistics (mean = pivot + shifted_mean, var = m2 / count) get
#     dL/dmean = -sum(dx),   dL/dvar = -rstd^2 / 2 * sum(dx * (x - mean))
# and returned ones add  dL/dshifted_mean / count + 2 dL/dm2 * (x - mean)  to dx.
# Both take float32 reductions over x after the kernel (only when such a gradient is asked for).
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scale, shift, sizes, eps, activation, *given, regime = inputs
    _, pivot, smean, m2, count, rstd = output
    ctx.stats_given = given[0] is not None
    if ctx.stats_given:  # the statistics that made rstd, for dL/dm2 and dL/dcount
        m2, count = given[2], given[3]
        ctx.mark_non_differentiable(*output[1:])
    else:
        ctx.mark_non_differentiable(pivot, count, rstd)
    ctx.save_for_backward(x, weight, bias, scale, shift, pivot, smean, rstd, m2, count)
    ctx.sizes, ctx.eps, ctx.activation, ctx.regime = sizes, eps, activation, regime
    ctx.packed, ctx.ss = False, 0
    ctx.set_materialize_grads(False)


def _saved(ctx) -> tuple[Any, ...]:
    """(x, weight, bias, scale, shift, pivot, shifted_mean, rstd, m2, count) as saved; a plain
    eager call saved x, weight, bias and its packed statistics alone (ctx.packed)."""
    if ctx.packed:
        x, weight, bias, buf = ctx.saved_tensors
        return x, weight, bias, None, None, buf, buf, buf, None, None
    return ctx.saved_tensors


def _statistics_grads(
    x: torch.Tensor,
    dx: torch.Tensor,
    plan: GroupPlan,
    pivot: torch.Tensor,
    smean: torch.Tensor,
    rstd: torch.Tensor,
    m2: torch.Tensor,
    count: torch.Tensor,
    d_smean: torch.Tensor | None,
    d_m2: torch.Tensor | None,
    given: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """dx (float32, in place) plus what reaches x through returned statistics, and the gradients
    of given (pivot, shifted_mean, m2, count), all (N, G) float32 (None unless ``given``)."""
    from groupnorm.backends.torch_ops import _group_sum, _spatial_sum, _spread_groups

    def spread(v: torch.Tensor) -> torch.Tensor:  # (N, G) -> (N, C, 1, ...)
        return _spread_groups(v, plan, x.dim())

    # x - mean as (x - pivot) - shifted_mean: no cancellation at a large offset.
    xc = (x.float() - spread(pivot)).sub_(spread(smean))

    def group_sum(t: torch.Tensor) -> torch.Tensor:  # (N, C, ...) -> (N, G)
        return _group_sum(_spatial_sum(t), plan)

    stats_grads = None
    if given:
        s1, s2 = group_sum(dx), group_sum(dx * xc)
        d_mean, d_var = -s1, -0.5 * rstd * rstd * s2
        stats_grads = (d_mean, d_mean, d_var / count, -d_var * m2 / (count * count))
    if d_smean is not None:
        dx.add_(spread(d_smean / count))
    if d_m2 is not None:
        dx.add_(xc.mul_(spread(2 * d_m2)))
    return dx, stats_grads


def _given_rstd(m2: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """rstd of given statistics in float64, for the on-chip backward's EXACT x_hat and u: from
    a float32 rstd, SiLU's and GELU's derivative at u left dx at 3.4-7.2x the float32 bound
    where the activation's derivative is near 0 (std 1e-3 to 1e-2)."""
    return torch.rsqrt(m2.double() / count.double() + eps)


def _grads(ctx, need: tuple[bool, ...], dy, d_smean, d_m2) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, weight, bias, scale, shift, pivot, shifted_mean, m2, count), None where
    ``need`` (in that order) says no or the input is absent."""
    x, weight, bias, scale, shift, pivot, smean, rstd, m2, count = _saved(ctx)
    kernel_rstd = rstd
    if ctx.stats_given and x.dtype == torch.float32:
        kernel_rstd = _given_rstd(m2, count, ctx.eps)
    given = ctx.stats_given and any(need[5:])
    exact = given or d_smean is not None or d_m2 is not None
    params = (weight, bias, scale, shift)
    if dy is None:
        dx = torch.zeros_like(x, dtype=torch.float32)
        pgrads: list[torch.Tensor | None] = [None] * 4
    else:
        # The op where a graph is recorded (compile, make_fx), a direct launch in eager autograd.
        if _eager(dy):
            dx, *pgrads = _backward(
                dy, x, *params, tuple(ctx.sizes), pivot, smean, kernel_rstd, ctx.activation,
                ctx.stats_given, ctx.regime, exact, ctx.eps, ctx.ss,
            )  # fmt: skip
        else:
            if ctx.packed:  # the op takes each field as its own tensor
                fields = pivot.view(5, x.shape[0], len(ctx.sizes))
                pivot, smean, rstd = fields[0], fields[1], fields[4]
                kernel_rstd = rstd
            dx, *pgrads = group_norm_bwd_op(
                dy, x, *params, list(ctx.sizes), pivot, smean, kernel_rstd, ctx.activation,
                ctx.stats_given, ctx.regime, exact, ctx.eps,
            )  # fmt: skip
    stats_grads: tuple[torch.Tensor | None, ...] = (None,) * 4
    if exact:
        dx, sg = _statistics_grads(
            x, dx, _plan(tuple(ctx.sizes)), pivot, smean, rstd, m2, count, d_smean, d_m2, given
        )
        dx = dx.to(x.dtype)
        if sg is not None:
            stats_grads = tuple(g if need[5 + i] else None for i, g in enumerate(sg))
    grads = [g if need[i + 1] else None for i, g in enumerate(pgrads)]
    return (dx if need[0] else None, *grads, *stats_grads)


def _backward_fn(ctx, dy, _pivot, d_smean, d_m2, *_):
    """The op's backward: gradients for its 13 inputs."""
    need = ctx.needs_input_grad
    dx, *grads, dp, dm, dm2, dc = _grads(ctx, (*need[:5], *need[8:12]), dy, d_smean, d_m2)
    return (dx, *grads, None, None, None, dp, dm, dm2, dc, None)


group_norm_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


class _EagerGroupNorm(torch.autograd.Function):
    """The op's forward and autograd without the custom-op machinery, for eager calls: its
    dispatch cost several times nn.GroupNorm's whole call on a small tensor.

    ``apply(call, x, weight, bias)`` returns y alone; ``apply(call, x, weight, bias, scale,
    shift, pivot, shifted_mean, m2, count)`` (the last four given statistics or None) returns
    the op's six outputs; ``call`` is the tuple (sizes, eps, activation, regime). The plain call
    takes the first form: autograd's cost grows with every input and output. Old-style (ctx in
    forward): with a separate setup_context, apply binds the arguments by inspect.signature."""

    @staticmethod
    def forward(ctx, call, x, weight, bias, *extras):  # type: ignore[override]
        sizes, eps, activation, regime = call
        if not extras:
            y, buf = _forward(
                x, weight, bias, None, None, sizes, eps, activation, None, regime, packed=True
            )
            ctx.save_for_backward(x, weight, bias, buf)
            ctx.sizes, ctx.eps, ctx.activation, ctx.regime = sizes, eps, activation, regime
            ctx.packed, ctx.ss, ctx.stats_given = True, x.shape[0] * len(sizes), False
            return y
        scale, shift, *given = extras
        fields = None if given[0] is None else tuple(given)
        output = _forward(x, weight, bias, scale, shift, sizes, eps, activation, fields, regime)
        _setup_context(ctx, (x, weight, bias, scale, shift, *call[:3], *given, regime), output)
        return output

    @staticmethod
    def backward(ctx, dy, _pivot=None, d_smean=None, d_m2=None, *_):  # type: ignore[override]
        if ctx.packed and not torch.is_grad_enabled() and _eager(dy):
            # The plain call, no double backward asked for: straight to the kernels.
            x, weight, bias, buf = ctx.saved_tensors
            dx, dw, db, _, _ = _backward(
                dy, x, weight, bias, None, None, ctx.sizes, buf, buf, buf, ctx.activation,
                False, ctx.regime, False, ctx.eps, ctx.ss,
            )  # fmt: skip
            _, need_x, need_w, need_b = ctx.needs_input_grad
            return None, dx if need_x else None, dw if need_w else None, db if need_b else None
        return _general_backward(ctx, dy, d_smean, d_m2)


@once_differentiable
def _general_backward(ctx, dy, d_smean, d_m2):
    """The eager Function's backward; no double backward, as with the op: it raises rather
    than return zero second derivatives."""
    need = ctx.needs_input_grad[1:]
    grads = _grads(ctx, (*need, *(False,) * (9 - len(need))), dy, d_smean, d_m2)
    return (None, *grads[: len(need)])


def _eager(t: torch.Tensor) -> bool:
    """Whether a call on t may launch directly: a plain tensor, no graph being recorded
    (torch.compile, jit tracing, make_fx), no dispatch mode (fake tensors) and no functorch
    transform (vmap, grad). Everything else goes through the custom op and its fake impl."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and _untraced()


def _untraced() -> bool:
    """:func:`_eager` for a plain tensor outside torch.compile (dispatch checked both): no jit
    trace, no dispatch mode, no functorch transform."""
    return (
        not torch._C._is_tracing()
        and not torch._C._len_torch_dispatch_stack()
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------


def group_norm_triton(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    stats: GroupStats | None = None,
    return_stats: bool = False,
    regime: str = "auto",
) -> tuple[torch.Tensor, GroupStats | None]:
    """GroupNorm of x (N, C, *S) with the Triton kernels: ``(y, stats or None)``.

    y = act((x_hat * weight + bias) * (1 + scale) + shift), y in x's dtype and memory format.
    Arguments as in :func:`groupnorm.group_norm` (already validated there); ``regime``
    ("auto" | "onchip" | "fused" | "split" | "wave") forces a launch regime (see
    ``heuristics``; "auto" never picks "wave", which measured slower on an H200). Differentiable in
    x, weight, bias, scale, shift and given ``stats``; returned statistics are differentiable
    in x (their shifted_mean and m2), as on the torch backend.

    Autocast: the op has no autocast rule, so it runs in x's own dtype (statistics in float32
    either way) where torch's group_norm would be cast to float32. CUDA graphs: the first call
    for a group plan on a device uploads the plan's offsets; capture after one eager call.
    """
    fields = None if stats is None else (stats.pivot, stats.shifted_mean, stats.m2, stats.count)
    given = (None,) * 4 if fields is None else fields
    # y alone is asked for: the eager paths take the plain call's form (one packed buffer of
    # statistics, and the Function with four inputs and one output).
    plain = fields is None and scale is None and shift is None and not return_stats
    eps = float(eps)
    if not _eager(x):
        outs = group_norm_fwd_op(
            x, weight, bias, scale, shift, list(plan.sizes), eps, activation, *given, regime
        )
    elif _records_grad(x, weight, bias, scale, shift, *given):
        call = (plan.sizes, eps, activation, regime)
        if plain:
            return _EagerGroupNorm.apply(call, x, weight, bias), None
        outs = _EagerGroupNorm.apply(call, x, weight, bias, scale, shift, *given)
    else:
        outs = _forward(
            x, weight, bias, scale, shift, plan.sizes, eps, activation, fields, regime, plain
        )
    if plain:
        return outs[0], None
    y, pivot, smean, m2, count, _ = outs
    if not return_stats:
        return y, None
    if stats is not None:
        return y, stats
    return y, GroupStats(pivot, smean, m2, count, plan=plan)


def plain_forward(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> torch.Tensor | None:
    """y of a plain eager call (weight, bias and an activation at most), arguments checked by
    the backend's fast path; None for a call to be recorded through the op (traced, faked or
    transformed), which the validated path makes. x is a plain tensor and torch.compile is not
    tracing (dispatch checked both)."""
    if not _untraced():
        return None
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if (weight is not None and wrapped(weight)) or (bias is not None and wrapped(bias)):
        return None  # transformed by torch.func: the kernels cannot take a wrapper's pointer
    # _records_grad spelt out: its generator costs more than the rest of this check.
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        if wrapped(x):
            return None  # a tensor left over from a functorch transform: Function.apply unwraps it
        return _apply_plain((plan.sizes, eps, activation, "auto"), x, weight, bias)
    return _forward(
        x, weight, bias, None, None, plan.sizes, eps, activation, None, "auto", packed=True
    )[0]


# Function.apply in C, without its Python wrapper: that binds default arguments for Functions
# with a separate setup_context (this one has none) and, when no functorch transform is active
# (_eager checked), unwraps tensors left over from one (plain_forward declines those). On a
# small tensor the wrapper costs a sixth of the call.
_apply_plain = super(torch.autograd.Function, _EagerGroupNorm).apply
