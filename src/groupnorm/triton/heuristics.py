"""Launch heuristics for the Triton GroupNorm kernels: every threshold lives here.

Pure Python (no triton import), so the choices are testable anywhere.

Three regimes (docs/spec.md#performance-floors):

* ``onchip``: a program holds whole groups in registers (``onchip.py``): forward reads x once
  and writes y once, backward reads x and dy once and writes dx once. Chosen whenever the tile
  fits (``ONCHIP_MAX_SLOTS``) and the layout has a unit-stride axis (NCHW or channels-last).
* ``fused``: one program per (sample, group) reads its group (statistics), then reads it again
  and writes y, in one launch. Right when there are enough (sample, group) pairs to fill the GPU
  or the groups are small (the second read then hits L1/L2, and one launch beats two).
* ``split``: each group is cut into ``chunks`` position ranges; a partial-statistics kernel
  writes per-chunk (count, pivot-shifted mean, M2), a normalize kernel merges its group's
  partials (Chan's formula, fixed order) and normalizes its chunk. Right when N * G is small
  and groups are large (VAE decode at batch 1, 3-D segmentation, detection at batch 2), where the
  fused regime leaves most SMs idle (torch's kernel: 3-8 % of the bandwidth floor there).
* Channels-last runs (fused, split and wave): an even plan is read by programs of several
  consecutive groups (:func:`loop_run`): at least a 16-byte multiple of channels (SD's 10 bf16
  channels, 20 bytes: 4 groups, 80 bytes), so every row segment a program loads or stores is
  128-bit aligned, and at least RUN_CHANNELS channels, so that it reads whole sectors (VAE's 4
  channels: 8 groups); the run's statistics are folded per group in registers.
* ``wave`` (opt-in, never chosen by ``auto``): the split regime's two passes in one launch of a
  persistent grid, scheduled in waves of groups sized to an L2 budget, so that the second read
  of every chunk comes from L2 (``_gn_fwd_wave_kernel``, ``_gn_bwd_wave_kernel``; backward
  then launches the parameter kernel as the other regimes do). Its synchronization
  (release/acquire counters between programs) passed its tests on an H200, where it measured
  1.3-6.9x slower than ``auto`` on the spec shapes, so ``auto`` does not take it.

One H200 run (benchmarks/results/bench-nvidia-h200-20261204T131010Z.json) measured these
choices; RUN_CHANNELS was tuned on it, and the wave regime measured slower than ``auto`` on every
spec shape. The other thresholds are derived from the hardware facts cited next to each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = [
    "PASSES",
    "REGIMES",
    "LaunchConfig",
    "choose_config",
    "loop_run",
    "next_pow2",
    "onchip_tile",
    "wave_bytes",
]

REGIMES = ("auto", "onchip", "fused", "split", "wave")

# Reads and writes each regime issues per element of the big tensors (the traffic tests assert
# them under the interpreter; benchmarks/model.py turns them into DRAM bytes with an L2 model).
PASSES = {
    "onchip": {"fwd": {"x": 1, "y": 1}, "bwd": {"x": 1, "dy": 1, "dx": 1}},
    "fused": {"fwd": {"x": 2, "y": 1}, "bwd": {"x": 2, "dy": 2, "dx": 1}},
    "split": {"fwd": {"x": 2, "y": 1}, "bwd": {"x": 2, "dy": 2, "dx": 1}},
    "wave": {"fwd": {"x": 2, "y": 1}, "bwd": {"x": 2, "dy": 2, "dx": 1}},
}

# Elements per tile (BLOCK_C * BLOCK_L). 4096 fp32 values over 4 warps is 32 registers per
# thread per live tile: the kernels keep about three tiles live, well under the 255-register
# limit, and one tile of bf16 is 8 KB in flight per program (enough to cover HBM latency with
# 2+ programs per SM).
TILE = 4096
# Programs per SM the split regime aims for: 4 x 132 SMs on an H100 keeps every SM busy while
# the per-program partial merge (up to MAX_CHUNKS values) stays negligible.
PROGRAMS_PER_SM = 4
# A chunk of fewer elements than one tile spends more on its merge and bookkeeping than on
# moving data; one tile (8 KB of bf16) per program is the least that keeps loads in flight.
MIN_CHUNK_ELEMS = 4096
# The normalize kernel loads all partials of its group as one vector: bound its length.
MAX_CHUNKS = 1024
# Wave regime (untuned: every number here awaits a GPU). L2 a schedule may count on: about half
# of the H100's 50 MB (set-associativity, other traffic, write-back); the H200 has 60 MB.
# Between the two reads of a chunk of wave w the tickets touch at most this many waves' worth
# of x's bytes, distinct (the LRU stack distance the traffic tests measure): forward, x of waves
# w - 1, w and w + 1 and y of waves w - 1 and w (5); backward, x and dy of the three waves and
# dx of two (8). A wave is the budget over that.
L2_BUDGET = 24 * 2**20
WAVE_STACK = {"fwd": 5, "bwd": 8}
# Bytes of x per ticket: enough work (about 1 us at a program's share of HBM bandwidth, 2
# programs per SM) that taking the next ticket (one L2 atomic, issued before the work) is
# hidden, and small enough that a wave (about 300 tickets) outnumbers the programs, so that a
# normalize ticket rarely waits for its wave's last partials.
WAVE_TICKET_BYTES = 16 * 2**10
WAVE_PROGRAMS_PER_SM = 2
# A wave program over channels-last runs holds both tickets' code, each with per-group folds of
# its tile. Compiled for sm_90 (SD 64^2 and the up-block concat, bf16): at 4 warps 128-151
# registers and an 8 B spill forward, 230-254 registers backward; at 8 warps 125-128 and
# 177-178, no spills (the backward then has room for one program per SM, not two; untuned).
WAVE_RUN_WARPS = 8
# Programs the device runs at once when it is not a GPU (the interpreter): keeps the tiny test
# tensors in the fused regime under "auto".
CPU_SM_COUNT = 1

# On-chip regime. A program's tile is BLOCK_C x BLOCK_L "slots" (powers of two, so a group of
# Cg x L elements takes next_pow2(Cg) * next_pow2(L) slots) held in registers. The limits are the
# largest tiles whose compiled sm_90 code (triton 3.9, GELU epilogue, the launch's real argument
# specialization) uses no local memory at the warp count below; tests/_triton_compile.py compiles
# every on-chip variant at these limits and asserts no spills and 128-bit accesses. Sweep
# (registers / local bytes at 8, 16, 32 warps, GELU only; forward measured with the pivot loaded
# separately, which the tile now provides):
#   fwd  bf16 16 K: NCHW 119/0, 78/0, 54/0        NHWC 144/0, 80/0, 54/0
#   fwd  bf16 32 K: NCHW 255/48, 128/0, 64/64     NHWC 255/120, 128/16, 64/32
#   fwd  fp32 16 K: NCHW 181/0, 82/0, 54/0        NHWC 140/0, 91/0, 52/0
#   fwd  fp32 32 K: NCHW 255/88, 128/0, 64/56     NHWC 255/232, 128/8, 64/104
#   bwd  bf16 16 K: NCHW 207/0, 125/0, 64/0       NHWC 255/0, 128/0, 64/56
#   bwd  bf16 32 K: NCHW 255/912, 128/336, 64/224 NHWC 255/1176, 128/432, 64/224
#   bwd  bf16 8 K: no spills at any width
# 65 K slots never fit. With scale and shift on as well, channels-last spills 32 B at the NCHW
# limits (each thread holds every per-channel vector for its 8 adjacent channels), so it gets the
# next smaller tile. Keyed by (direction, element bytes, channels-last); backward keeps x, dy,
# x_hat and du live and holds half the forward's tile. Under triton 3.6 (the GPU machine's; same
# audit) every other limit holds, but the 32 K NCHW bf16 forward with GELU, scale and shift
# spills 32 B at 16 warps (without the epilogue, ResNet b32: 112 registers, none); kept until a
# GPU says what those 32 B cost.
# A float32 backward computes in float64 (EXACT in onchip.py): in float32, x_hat's and du's own
# roundings (and the saved float32 mean's, the same for every element) put dx at 26-28x and
# dweight at 51-156x the float32 bound on 8 K-slot tiles (y.sum()'s gradient, std 3e-3 or
# zero-padded data; SiLU at random dy 9x). Float64 tiles of 4 K slots take 192-196 registers at
# 8 warps (16 slots a thread); at 8 K slots they spilled 232-256 B at 16 warps (1.1-1.3 KB when
# x_hat and du were recomputed after the reductions instead of kept), so larger float32 groups
# take the loop regimes, which are exact too.
ONCHIP_MAX_SLOTS = {
    ("fwd", 2, False): 32768,
    ("fwd", 2, True): 16384,
    ("fwd", 4, False): 16384,
    ("fwd", 4, True): 16384,
    ("bwd", 2, False): 16384,
    ("bwd", 2, True): 8192,
    ("bwd", 4, False): 4096,
    ("bwd", 4, True): 4096,
}
# Slots per thread (warps = slots / (32 * this), clamped to ONCHIP_WARPS): 64 values per thread
# in forward (32 K slots at 16 warps), 32 in backward (16 K at 16 warps), 16 in the float32
# backward (float64 inside: 4 K at 8 warps). Wide programs also keep a whole group's loads in
# flight: 32 K slots of bf16 are 64 KB per program, more than the ~25 KB per SM that Little's law
# asks for (3.35 TB/s over 132 SMs x ~1 us DRAM latency), so even 32-64 programs (SD 64x64 at
# batch 2) can stream near bandwidth with one per SM.
ONCHIP_SLOTS_PER_THREAD = {("fwd", 2): 64, ("fwd", 4): 64, ("bwd", 2): 32, ("bwd", 4): 16}
ONCHIP_WARPS = (4, 16)
# A program of fewer slots than this takes several consecutive groups (even plans): tiny groups
# (G = C, 8x8 maps) otherwise cost one program each for a few bytes.
ONCHIP_MIN_SLOTS = 2048
# 128-bit global accesses: a channels-last run of groups is widened to a multiple of 16 bytes
# (Cg = 10 in bf16 is 20 bytes: 4 groups = 80 bytes) so that every row segment is aligned.
VECTOR_BYTES = 16
# The flat backward's dx tiles (1-D, elements of a contiguous group): each element gathers its
# channel's parameters, so a tile is half a TILE to keep registers near the 2-D kernels'.
FLAT_DX_BLOCK = 2048
# The loop regimes' channels-last runs (loop_run) hold a run as one channel block: 256 channels
# leave at least 16 positions of a TILE per block.
RUN_MAX_CHANNELS = 256
# ... and a run is widened (doubled, where the groups divide G) to at least RUN_CHANNELS channels.
# Measured on an H200 (bf16, graphed, L2 flushed; runs widened to 16/64/128/256 bytes): a program
# reading one 8- or 16-byte group (or aligned run) of each position streams a forward at 16-31 %
# of the copy rate; runs of 32 channels (64 bytes) at 31-41 % (VAE 1024 758 -> 349 us, FPN P2
# 184 -> 82 us, ResNet b32 117 -> 66 us); runs of 64 channels were 0-24 % slower than 32, of 128
# channels 1.0-6.8x slower.
# float32: 32 channels (128 bytes) 148 -> 99 us on ResNet b32, 64 channels 93 us.
RUN_CHANNELS = 32
# The loop regimes' float32 backward with an activation computes in float64 (its derivatives,
# and for SiLU and GELU the first-order move of du to the retaken statistics), in tiles shorter
# along L: by EXACT_ACT_SHRINK[activation][0], or [1] for the wave regime and the fused regime's
# flat groups, and flat dx tiles (FLAT_DX_BLOCK) by EXACT_ACT_SHRINK_DX. Compiled for sm_90
# (tests/_triton_compile.py --loops): at full tiles SiLU and GELU spilled 272-1856 B at 4 warps
# and 48-1056 B at 8; at a quarter still 8-112 B in the split partials and channels-last fused
# runs; at an eighth 16-32 B in the flat fused and wave kernels, whose 8-warp channels-last runs
# also lost their 128-bit accesses. ReLU spilled 16-168 B at full tiles, 8-12 B in the wave
# kernels at a quarter or an eighth (which also cost those runs their 128-bit accesses), none
# at a half.
EXACT_ACT_SHRINK = {"silu": (8, 4), "gelu": (8, 4), "relu": (2, 2)}
EXACT_ACT_SHRINK_DX = 4
# ... and its channels-last runs take at most this many groups: the dx kernel's per-group float64
# sums spilled at 16 groups (2 channels a group: 744 B with SiLU, 24 B with ReLU) and 32 (one
# channel: 992 B, 2736 B with SiLU); 8 groups take 181-194 registers and none.
EXACT_RUN_GROUPS = 8
# A float32 forward in the wave regime merges its partials per group in float64 (_run_normalize)
# in the same 8-warp program as its statistics: runs of 32 one-channel groups (InstanceNorm
# NHWC) spilled 16-24 B there; 16 groups take 109-111 registers and none (GELU, scale and shift
# too). The fused and split kernels hold 32 without spilling.
EXACT_WAVE_RUN_GROUPS = 16


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class LaunchConfig:
    """How one call is launched.

    ``block_c`` x ``block_l`` is the tile (channels x positions); ``chunk_l`` positions per
    program along L and ``chunks`` = ceil(L / chunk_l) programs per group (1 in the fused and
    on-chip regimes); ``groups_per_program`` consecutive groups per program (on-chip, and the
    loop regimes' channels-last runs: :func:`loop_run`; chunks then span the run). Wave regime:
    ``wave_rows`` rows (a sample's group, or run of groups) per wave, ``waves`` of them, and a
    persistent grid of ``programs`` of ``num_warps``. ``flat`` (the loop regimes, NCHW, rows of
    L not 16-byte multiples): forward, each group is read as one run of Cg * L elements in 1-D
    tiles (``block_c`` = 1), ``chunk_l`` elements a chunk, so that loads are 128-bit, and a group of
    short rows (down to the (N, C) input's one element) still splits into many chunks;
    backward, the per-channel sums read each row through 16-byte-aligned windows and dx is
    written in 1-D tiles of FLAT_DX_BLOCK elements.
    """

    regime: str
    block_c: int
    block_l: int
    chunk_l: int
    chunks: int
    groups_per_program: int = 1
    num_warps: int = 4
    wave_rows: int = 0
    waves: int = 0
    programs: int = 0
    flat: bool = False


def _aligned_run(group_channels: int, elem_bytes: int) -> int:
    """The fewest consecutive channels-last groups of ``group_channels`` channels whose row
    segment is a multiple of VECTOR_BYTES (a power of two)."""
    return VECTOR_BYTES // math.gcd(group_channels * elem_bytes, VECTOR_BYTES)


def onchip_tile(
    L: int,
    num_groups: int,
    max_group: int,
    even: bool,
    channels_last: bool,
    elem_bytes: int,
    direction: str,
) -> tuple[int, int, int, int] | None:
    """(block_c, block_l, groups_per_program, num_warps) of the on-chip regime, or None when
    a group does not fit in one program (``ONCHIP_MAX_SLOTS``)."""
    limit = ONCHIP_MAX_SLOTS[direction, elem_bytes, channels_last]
    block_l = next_pow2(L)

    def slots(gpp: int) -> int:
        return next_pow2(gpp * max_group) * block_l

    gpp = 1
    if even and channels_last:
        want = _aligned_run(max_group, elem_bytes)
        if num_groups % want == 0 and slots(want) <= limit:
            gpp = want
    if even:
        while slots(gpp) < ONCHIP_MIN_SLOTS and num_groups % (2 * gpp) == 0:
            gpp *= 2
    if slots(gpp) > limit:
        return None
    lo, hi = ONCHIP_WARPS
    per_thread = ONCHIP_SLOTS_PER_THREAD[direction, elem_bytes]
    warps = min(hi, max(lo, slots(gpp) // (per_thread * 32)))
    return next_pow2(gpp * max_group), block_l, gpp, warps


def _tile(max_group: int, L: int, channels_fast: bool, whole: bool = False) -> tuple[int, int]:
    """(block_c, block_l). The contiguous axis gets the long side of the tile so that loads are
    coalesced: channels for channels-last (a group's channels are adjacent), positions for NCHW.
    ``whole``: one block spans all ``max_group`` channels (a channels-last run of groups)."""
    if channels_fast:
        block_c = next_pow2(max_group) if whole else min(next_pow2(max_group), 64)
        return block_c, max(1, min(next_pow2(L), TILE // block_c))
    block_l = min(next_pow2(L), TILE)
    return max(1, min(next_pow2(max_group), TILE // block_l)), block_l


def choose_config(
    N: int,
    L: int,
    max_group: int,
    num_groups: int,
    channels_fast: bool,
    sm_count: int,
    regime: str = "auto",
    *,
    even: bool = False,
    elem_bytes: int = 2,
    direction: str = "fwd",
    unit_stride: bool = True,
    contiguous_groups: bool = False,
) -> LaunchConfig:
    """Pick the regime and tiling for an (N, C, L) input whose largest group has ``max_group``
    channels. ``regime`` forces "onchip", "fused", "split" or "wave"; "auto" decides by size.
    ``even``: all groups have ``max_group`` channels; ``unit_stride``: positions (NCHW) or
    channels (channels-last) are adjacent in memory, which the on-chip kernels need;
    ``contiguous_groups``: each group is one run of memory in x and y (NCHW), which lets the
    loop regimes' forward read it flat (``LaunchConfig.flat``) when its rows are not 16-byte
    multiples."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if regime in ("auto", "onchip"):
        tile = None
        if unit_stride:
            tile = onchip_tile(L, num_groups, max_group, even, channels_fast, elem_bytes, direction)
        if tile is not None:
            block_c, block_l, gpp, warps = tile
            return LaunchConfig("onchip", block_c, block_l, L, 1, gpp, warps)
        if regime == "onchip":
            limit = ONCHIP_MAX_SLOTS[direction, elem_bytes, channels_fast]
            raise ValueError(
                f"regime 'onchip' needs a unit-stride layout and a group of at most {limit} "
                f"tile slots; got {max_group} channels x {L} positions (unit stride: "
                f"{unit_stride}); use 'auto', 'fused' or 'split'"
            )
    flat = (
        contiguous_groups
        and even
        and (L * elem_bytes) % VECTOR_BYTES != 0
        and (TILE + L) * L < 2**32  # _normalize_flat's exact channel index
        and max_group * L < 2**31  # element indices within a group are int32
    )
    if flat and direction == "fwd":
        cfg = _loop_config(N, max_group * L, 1, num_groups, False, sm_count, regime, elem_bytes)
        return replace(cfg, flat=True)
    if flat:
        # Backward: the partial sums stay per channel over chunks of positions (read through
        # aligned windows); dx is written flat, chunk k being the k-th of ``chunks`` equal runs
        # of the group's elements.
        cfg = _loop_config(N, L, max_group, num_groups, False, sm_count, regime, elem_bytes, "bwd")
        return replace(cfg, flat=True)
    gpp = loop_run(max_group, num_groups, even, channels_fast, elem_bytes, direction, regime)
    if gpp > 1:
        cfg = _loop_config(
            N, L, gpp * max_group, num_groups // gpp, True, sm_count, regime, elem_bytes,
            direction, whole=True,
        )  # fmt: skip
        return replace(cfg, groups_per_program=gpp)
    return _loop_config(
        N, L, max_group, num_groups, channels_fast, sm_count, regime, elem_bytes, direction
    )


def loop_run(
    max_group: int,
    num_groups: int,
    even: bool,
    channels_fast: bool,
    elem_bytes: int,
    direction: str = "fwd",
    regime: str = "auto",
) -> int:
    """Groups per program of the fused, split and wave regimes: 1, or for a channels-last even plan
    a run of consecutive groups: the fewest whose channels are a 16-byte multiple (SD's 320 / 32
    = 10 bf16 channels, 20 bytes: 4 groups, 80 bytes), so that every row segment a program reads
    is 128-bit aligned, then doubled while it has fewer than RUN_CHANNELS channels (VAE's 128 / 32
    = 4: 8 groups), so that a program reads whole sectors of each position. Only where the
    groups divide G and the run fits one channel block of at most RUN_MAX_CHANNELS (the kernels
    hold a run as one tile row); a float32 backward's runs at most EXACT_RUN_GROUPS groups, a
    float32 forward's in the wave ``regime`` at most EXACT_WAVE_RUN_GROUPS."""
    if not (even and channels_fast):
        return 1
    most = num_groups
    if elem_bytes == 4 and direction == "bwd":
        most = EXACT_RUN_GROUPS
    elif elem_bytes == 4 and regime == "wave":
        most = EXACT_WAVE_RUN_GROUPS
    gpp = _aligned_run(max_group, elem_bytes)
    if num_groups % gpp or next_pow2(gpp * max_group) > RUN_MAX_CHANNELS:
        return 1
    while (
        gpp * max_group < RUN_CHANNELS
        and 2 * gpp <= most
        and num_groups % (2 * gpp) == 0
        and next_pow2(2 * gpp * max_group) <= RUN_MAX_CHANNELS
    ):
        gpp *= 2
    return gpp


def _loop_config(
    N: int,
    L: int,
    max_group: int,
    num_groups: int,
    channels_fast: bool,
    sm_count: int,
    regime: str,
    elem_bytes: int,
    direction: str = "fwd",
    whole: bool = False,
) -> LaunchConfig:
    """The fused, split or wave plan (``regime`` "auto" picks fused or split); ``whole``: see
    :func:`_tile`."""
    block_c, block_l = _tile(max_group, L, channels_fast, whole)
    group_elems = max_group * L
    if regime == "auto":
        # Groups that fit on chip took the branch above; the rest are fused when the (sample,
        # group) pairs alone fill the GPU, else split into chunks so that every SM has programs.
        fills_gpu = N * num_groups >= PROGRAMS_PER_SM * sm_count
        regime = "fused" if fills_gpu else "split"
    if regime == "fused":
        return LaunchConfig("fused", block_c, block_l, L, 1)
    if regime == "wave":
        return _wave_config(
            N * num_groups, L, max_group, channels_fast, sm_count, elem_bytes, direction, whole
        )
    want = -(-PROGRAMS_PER_SM * sm_count // max(1, N * num_groups))
    chunks_wanted = max(1, min(want, group_elems // MIN_CHUNK_ELEMS, MAX_CHUNKS))
    if chunks_wanted == 1:
        # Forced split of a small group (tests): a few chunks, so that the partial/merge path
        # really merges several.
        chunks_wanted = min(4, L)
    block_c, block_l, chunk_l, chunks = _chunking(L, max_group, channels_fast, chunks_wanted, whole)
    return LaunchConfig("split", block_c, block_l, chunk_l, chunks)


def _chunking(
    L: int, max_group: int, channels_fast: bool, chunks_wanted: int, whole: bool = False
) -> tuple[int, int, int, int]:
    """(block_c, block_l, chunk_l, chunks): chunks of whole tiles along L, about
    ``chunks_wanted`` of them. The tile is shortened along L so that a short L still splits (an
    L of one tile would otherwise collapse to one chunk), and widened along C to keep TILE."""
    block_c, block_l = _tile(max_group, L, channels_fast, whole)
    block_l = min(block_l, next_pow2(-(-L // chunks_wanted)))
    if not channels_fast:
        block_c = max(1, min(next_pow2(max_group), TILE // block_l))
    chunk_l = -(-L // chunks_wanted)
    chunk_l = -(-chunk_l // block_l) * block_l
    return block_c, block_l, chunk_l, -(-L // chunk_l)


def wave_bytes(direction: str) -> int:
    """Bytes of x in one wave of the wave regime: the L2 budget over its reuse stack."""
    return L2_BUDGET // WAVE_STACK[direction]


def _wave_config(
    rows: int,
    L: int,
    max_group: int,
    channels_fast: bool,
    sm_count: int,
    elem_bytes: int,
    direction: str,
    whole: bool = False,
) -> LaunchConfig:
    """The wave regime's plan: waves of about :func:`wave_bytes` (at least one row), chunks of
    about WAVE_TICKET_BYTES of x, or smaller where a wave would otherwise have fewer tickets
    than the persistent grid (WAVE_PROGRAMS_PER_SM per SM) has programs."""
    group_bytes = max_group * L * elem_bytes
    wave_rows = max(1, min(rows, wave_bytes(direction) // max(1, group_bytes)))
    grid = WAVE_PROGRAMS_PER_SM * sm_count
    chunks_wanted = max(-(-group_bytes // WAVE_TICKET_BYTES), -(-grid // wave_rows))
    cap = max(1, min(MAX_CHUNKS, L))
    chunks_wanted = max(1, min(chunks_wanted, cap))
    block_c, block_l, chunk_l, chunks = _chunking(L, max_group, channels_fast, chunks_wanted, whole)
    # Whole power-of-two tiles can round the chunks down to half of what was asked for: ask for
    # more while that does not shrink the tile (the bytes a program keeps in flight).
    while wave_rows * chunks < grid and chunks_wanted < cap:
        chunks_wanted = min(2 * chunks_wanted, cap)
        finer = _chunking(L, max_group, channels_fast, chunks_wanted, whole)
        if finer[0] * finer[1] < block_c * block_l:
            break
        block_c, block_l, chunk_l, chunks = finer
    waves = -(-rows // wave_rows)
    tickets = 2 * waves * wave_rows * chunks
    programs = max(1, min(tickets, grid))
    return LaunchConfig(
        "wave", block_c, block_l, chunk_l, chunks, wave_rows=wave_rows, waves=waves,
        programs=programs, num_warps=WAVE_RUN_WARPS if whole else 4,
    )  # fmt: skip
