"""On-chip regime: each program holds whole groups in registers, so every byte moves once.

A program owns sample n and a run of ``GPP`` consecutive groups (channels [c_lo, c_lo + nch)),
as one (BLOCK_C, BLOCK_L) register tile over those channels and all L positions. Forward reads
x once and writes y once; backward reads x and dy once and writes dx once (plus (N, C) fp32
channel sums for the parameter gradients). The formulas are those of ``group_norm`` (same
pivot-shifted statistics, same backward with named intermediates); here every reduction over a
group is a tile reduction over positions (per channel) followed by a sum over the channels of
the group (``_group_sum``), exact two-pass within the registers: the mean first, then
m2 = sum((x - p - mean)^2) from the same registers.

Vector width. The unit-stride axis is a compile-time fact (``CHANNELS_LAST``: channels are
adjacent, else positions are), so the compiler's coalescing puts it innermost; with an even plan
the channels per group ``CG`` and groups per program ``GPP`` are constexprs, which makes the run's
first channel g0 * CG divisible by GPP * CG: with 16-byte-divisible pointers and strides (the
launch specializes them) each row segment is 128-bit aligned and loads and stores are
ld/st.global.v4 (asserted on sm_90 code in tests/_triton_compile.py).
"""

import triton
import triton.language as tl

from groupnorm.triton.activation import _act, _act_grad


@triton.jit
def _tile(c, pos, sC, sL, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr):
    """(BLOCK_C, BLOCK_L) offsets; the unit stride is a literal 1, never a runtime value."""
    if IDX64:
        c = c.to(tl.int64)
        pos = pos.to(tl.int64)
    if CHANNELS_LAST:
        return c[:, None] + pos[None, :] * sL
    else:
        return c[:, None] * sC + pos[None, :]


@triton.jit
def _chan(c, sC, CHANNELS_LAST: tl.constexpr):
    """Offset of channel c at position 0."""
    if CHANNELS_LAST:
        return c
    else:
        return c * sC


@triton.jit
def _run(pid, OFFS, GIDX, G, R, CG: tl.constexpr, GPP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Run pid = n * R + r (a program id, or a wave ticket's row) is groups [g0, g0 + GPP) of
    sample n. Returns n, g0, the run's first channel c_lo, local channels c, their mask, and per
    local channel: its local group gl, the local index of its group's first channel and its
    group's size."""
    n = pid // R
    g0 = (pid % R) * GPP
    c = tl.arange(0, BLOCK_C)
    if CG > 0:  # even plan, GPP divides G (heuristics): all compile-time
        c_lo = g0 * CG
        cmask = c < GPP * CG
        gl = c // CG
        first = gl * CG
        gsize = tl.full((BLOCK_C,), CG, tl.int32)
    else:
        c_lo = tl.load(OFFS + g0)
        cmask = c < tl.load(OFFS + tl.minimum(g0 + GPP, G)) - c_lo
        gl = tl.load(GIDX + c_lo + c, mask=cmask, other=0) - g0
        first = tl.load(OFFS + g0 + gl, mask=cmask, other=0) - c_lo
        # Lanes past the run get size 1, so no count of theirs is 0 or negative.
        gsize = tl.where(cmask, tl.load(OFFS + g0 + gl + 1, mask=cmask, other=1) - c_lo - first, 1)
    return n, g0, c_lo, c, cmask, gl, first, gsize


@triton.jit
def _group_sum(v, gl, GPP: tl.constexpr):
    """Per channel, the sum of v (BLOCK_C,) over the channels of its group. Other groups'
    values are selected away, never added (a NaN stays in its group)."""
    out = tl.zeros_like(v)
    for j in tl.static_range(GPP):
        in_j = gl == j
        out = tl.where(in_j, tl.sum(tl.where(in_j, v, 0.0), axis=0), out)
    return out


@triton.jit
def _params(
    n, c_lo, c, cmask, C, W, B, SCALE, SHIFT, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, DT: tl.constexpr
):
    """Per-channel (w, bias, 1 + scale[n], shift[n]) in DT (float32, or float64 for an EXACT
    backward: 1 + scale rounded to float32 would perturb dx where it cancels); identity values
    where absent."""
    one = tl.full(c.shape, 1.0, DT)
    w = one
    bias = one * 0.0
    s1 = one
    sh = one * 0.0
    cc = c_lo + c
    nc = n.to(tl.int64) * C + cc
    if HAS_W:
        w = tl.load(W + cc, mask=cmask, other=1.0).to(DT)
    if HAS_B:
        bias = tl.load(B + cc, mask=cmask, other=0.0).to(DT)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(SCALE + nc, mask=cmask, other=0.0).to(DT)
    if HAS_SHIFT:
        sh = tl.load(SHIFT + nc, mask=cmask, other=0.0).to(DT)
    return w, bias, s1, sh


@triton.jit
def _coefficients(
    n, c_lo, c, cmask, C, W, B, SCALE, SHIFT, mean, rstd, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT
):
    """Per channel, y = d * a + b before the activation, d being x less its group's pivot (or,
    on chip in float32, less the pivot and the float32 mean) and ``mean`` the mean of d:
    a = rstd w (1 + scale), b = (bias - mean rstd w)(1 + scale) + shift."""
    w, bias, s1, sh = _params(
        n, c_lo, c, cmask, C, W, B, SCALE, SHIFT, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, tl.float32
    )
    return rstd * w * s1, (bias - mean * rstd * w) * s1 + sh


@triton.jit
def _gn_fwd_onchip_kernel(
    X,
    Y,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    GIDX,
    PIVOT,
    SMEAN,
    M2,
    COUNT,
    RSTD,
    SS,
    C,
    G,
    L,
    R,
    sxN,
    sxC,
    sxL,
    syN,
    syC,
    syL,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
):
    """Forward, one read of x: d = x - p (p = the group's first element), per group
    mean = sum d / count, m2 = sum (d - mean)^2, rstd = 1 / sqrt(m2 / count + eps), then
    y = act(d * a[c] + b[c]) with a = rstd w (1 + scale), b = (bias - mean rstd w)(1 + scale)
    + shift, from the same registers.

    Float32 x: y = act((d - mean) a[c] + b[c]) with b from r = sum (d - mean) / count, what
    the float32 mean left (the stored shifted mean is mean + r). Where the pivot lies far out
    in its group (a zero of padding before data at 30-1000) the halves of d a + b cancel and
    left y at up to 3x the float32 bound (0.1x now). Half precision keeps d a + b: that error is
    far below its rounding, and the second sum over the tile costs registers (a 32 K-slot
    bfloat16 tile spilled 48 B at 16 warps)."""
    pid = tl.program_id(0)
    n, g0, c_lo, c, cmask, gl, first, gsize = _run(pid, OFFS, GIDX, G, R, CG, GPP, BLOCK_C)
    pos = tl.arange(0, BLOCK_L)
    mask = cmask[:, None] & (pos < L)[None, :]
    xb = X + n.to(tl.int64) * sxN + _chan(c_lo, sxC, CHANNELS_LAST)
    # Only the loaded tile stays live (in x's dtype); d = x - p is re-formed where needed.
    v = tl.load(xb + _tile(c, pos, sxC, sxL, CHANNELS_LAST, IDX64), mask=mask, other=0.0)
    # The pivot x[first channel of the group, 0] comes from the tile, not a second load: each
    # channel's x[c, 0] (a sum of one element and zeros: exact), kept on the group's first channel.
    x0 = tl.sum(tl.where((pos == 0)[None, :], v.to(tl.float32), 0.0), axis=1)
    pivot = _group_sum(tl.where(c == first, x0, 0.0), gl, GPP)
    count = gsize.to(tl.float32) * L
    d = tl.where(mask, v.to(tl.float32) - pivot[:, None], 0.0)
    mean = _group_sum(tl.sum(d, axis=1), gl, GPP) / count
    e = tl.where(mask, (v.to(tl.float32) - pivot[:, None]) - mean[:, None], 0.0)
    m2 = _group_sum(tl.sum(e * e, axis=1), gl, GPP)
    r = tl.zeros_like(mean)
    if X.dtype.element_ty == tl.float32:
        r = _group_sum(tl.sum(e, axis=1), gl, GPP) / count
    # Lanes past the run have m2 = 0; with eps = 0 (statistics only) they would divide by 0.
    rstd = 1.0 / tl.sqrt(tl.where(cmask, m2 / count + eps, 1.0))
    for j in tl.static_range(GPP):
        # one channel speaks for each group: its first
        head = cmask & (gl == j) & (c == first)
        row = n * G + g0 + j
        ok = g0 + j < G
        tl.store(PIVOT + row, tl.sum(tl.where(head, pivot, 0.0), axis=0), mask=ok)
        tl.store(SMEAN + SS + row, tl.sum(tl.where(head, mean + r, 0.0), axis=0), mask=ok)
        tl.store(M2 + 2 * SS + row, tl.sum(tl.where(head, m2, 0.0), axis=0), mask=ok)
        tl.store(COUNT + 3 * SS + row, tl.sum(tl.where(head, count, 0.0), axis=0), mask=ok)
        tl.store(RSTD + 4 * SS + row, tl.sum(tl.where(head, rstd, 0.0), axis=0), mask=ok)
    if X.dtype.element_ty == tl.float32:
        a, b = _coefficients(
            n, c_lo, c, cmask, C, W, B, SCALE, SHIFT, r, rstd, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT
        )
        y = _act(((v - pivot[:, None]) - mean[:, None]) * a[:, None] + b[:, None], ACT)
    else:
        a, b = _coefficients(
            n, c_lo, c, cmask, C, W, B, SCALE, SHIFT, mean, rstd, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT
        )
        y = _act((v.to(tl.float32) - pivot[:, None]) * a[:, None] + b[:, None], ACT)
    yb = Y + n.to(tl.int64) * syN + _chan(c_lo, syC, CHANNELS_LAST)
    tl.store(
        yb + _tile(c, pos, syC, syL, CHANNELS_LAST, IDX64), y.to(Y.dtype.element_ty), mask=mask
    )


@triton.jit
def _gn_bwd_onchip_kernel(
    X,
    DY,
    DX,
    W,
    B,
    SCALE,
    SHIFT,
    OFFS,
    GIDX,
    PIVOT,
    SMEAN,
    RSTD,
    SS,
    SUMS,
    C,
    G,
    L,
    R,
    sxN,
    sxC,
    sxL,
    sdN,
    sdC,
    sdL,
    sgN,
    sgC,
    sgL,
    EPS,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    EXACT: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    DY_CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IDX64: tl.constexpr,
):
    """Backward, one read of x and dy: x_hat = ((x - p) - mean) rstd, du = dy act'(u),
    A[c] = sum_l du x_hat, B[c] = sum_l du (stored for the parameter gradients when
    WRITE_SUMS), wc = w (1 + scale), per group mean_dxhat = sum_c wc B / count,
    mean_dxhat_xhat = sum_c wc A / count, dx = rstd (du wc - mean_dxhat - x_hat mean_dxhat_xhat)
    (with statistics given by the caller: dx = rstd du wc; their own gradients are formed
    after the kernel, see group_norm.py).

    EXACT (float32 x, whose tiles are limited to what float64 fits: heuristics.ONCHIP_MAX_SLOTS):
    everything after the loads in float64, the mean and rstd recomputed from the registers
    (two-pass, with EPS), or, with statistics given, x_hat from the given pivot and shifted mean
    and a float64 RSTD made from the given m2 and count. dx cancels where a group is small and
    rstd |w| large: from float32 statistics and float32 arithmetic it reached 13x the float32
    bound at std 3e-3 (groups of 2-512 elements, |w| ~ 2), as torch's own float32 kernels do (the
    CPU kernel takes float64 for the same reason); with given statistics, SiLU's and GELU's
    derivative at a float32 u put dx at 3.4-7.2x."""
    pid = tl.program_id(0)
    n, g0, c_lo, c, cmask, gl, first, gsize = _run(pid, OFFS, GIDX, G, R, CG, GPP, BLOCK_C)
    pos = tl.arange(0, BLOCK_L)
    mask = cmask[:, None] & (pos < L)[None, :]
    DT: tl.constexpr = tl.float64 if EXACT else tl.float32
    w, bias, s1, sh = _params(
        n, c_lo, c, cmask, C, W, B, SCALE, SHIFT, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, DT
    )
    nb = n.to(tl.int64)
    xb = X + nb * sxN + _chan(c_lo, sxC, CHANNELS_LAST)
    db = DY + nb * sdN + _chan(c_lo, sdC, DY_CHANNELS_LAST)
    v = tl.load(xb + _tile(c, pos, sxC, sxL, CHANNELS_LAST, IDX64), mask=mask, other=0.0)
    dy = tl.load(db + _tile(c, pos, sdC, sdL, DY_CHANNELS_LAST, IDX64), mask=mask, other=0.0)
    count = gsize.to(DT) * L
    du = dy.to(DT)
    if EXACT and not STATS_GIVEN:  # the saved statistics are not read
        x64 = tl.where(mask, v.to(tl.float64), 0.0)
        mean = _group_sum(tl.sum(x64, axis=1), gl, GPP) / count
        e = tl.where(mask, x64 - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(_group_sum(tl.sum(e * e, axis=1), gl, GPP) / count + EPS)
        xhat = e * rstd[:, None]
    else:
        srow = n * G + g0 + gl
        pivot = tl.load(PIVOT + srow, mask=cmask, other=0.0).to(DT)
        smean = tl.load(SMEAN + SS + srow, mask=cmask, other=0.0).to(DT)
        rstd = tl.load(RSTD + 4 * SS + srow, mask=cmask, other=0.0).to(DT)
        xhat = tl.where(mask, ((v.to(DT) - pivot[:, None]) - smean[:, None]) * rstd[:, None], 0.0)
    if ACT != 0:
        u = (xhat * w[:, None] + bias[:, None]) * s1[:, None] + sh[:, None]
        du = tl.where(mask, du * _act_grad(u, ACT), 0.0)
    a = tl.sum(du * xhat, axis=1)
    b = tl.sum(du, axis=1)
    if WRITE_SUMS:
        nc = nb * C + c_lo + c
        tl.store(SUMS + 2 * nc, a.to(SUMS.dtype.element_ty), mask=cmask)
        tl.store(SUMS + 2 * nc + 1, b.to(SUMS.dtype.element_ty), mask=cmask)
    wc = w * s1
    mean_dxhat = _group_sum(wc * b, gl, GPP) / count
    mean_dxhat_xhat = _group_sum(wc * a, gl, GPP) / count
    if STATS_GIVEN:
        mean_dxhat = tl.zeros_like(mean_dxhat)
        mean_dxhat_xhat = tl.zeros_like(mean_dxhat_xhat)
    else:
        # A group of one element: y does not depend on x, so dx = 0 exactly. Computed, fused
        # multiply-adds leave du * wc - mean_dxhat at a rounding of du * wc, times rstd (up to
        # 1 / sqrt(eps)).
        rstd = tl.where(count > 1.0, rstd, 0.0)
    dx = rstd[:, None] * (du * wc[:, None] - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])
    gb = DX + nb * sgN + _chan(c_lo, sgC, CHANNELS_LAST)
    tl.store(
        gb + _tile(c, pos, sgC, sgL, CHANNELS_LAST, IDX64), dx.to(DX.dtype.element_ty), mask=mask
    )
