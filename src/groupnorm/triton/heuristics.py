"""Launch heuristics for the Triton GroupNorm kernels: every threshold lives here.

Pure Python (no triton import), so the choices are testable anywhere.

Two regimes (docs/spec.md#performance-floors):

* ``fused``: one program per (sample, group) reads its group (statistics), then reads it again
  and writes y, in one launch. Right when there are enough (sample, group) pairs to fill the GPU
  or the groups are small (the second read then hits L1/L2, and one launch beats two).
* ``split``: each group is cut into ``chunks`` position ranges; a partial-statistics kernel
  writes per-chunk (count, pivot-shifted mean, M2), a normalize kernel merges its group's
  partials (Chan's formula, fixed order) and normalizes its chunk. Right when N * G is small
  and groups are large (VAE decode at batch 1, 3-D segmentation, detection at batch 2), where the
  fused regime leaves most SMs idle (torch's kernel: 3-8 % of the bandwidth floor there).

GPU timings of these choices are not measured yet; the thresholds below are derived from the
hardware facts cited next to each, and are the first thing to tune with ``groupnorm bench`` on a
real device.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REGIMES", "LaunchConfig", "choose_config", "next_pow2"]

REGIMES = ("auto", "fused", "split")

# Elements per tile (BLOCK_C * BLOCK_L). 4096 fp32 values over 4 warps is 32 registers per
# thread per live tile: the kernels keep about three tiles live, well under the 255-register
# limit, and one tile of bf16 is 8 KB in flight per program (enough to cover HBM latency with
# 2+ programs per SM).
TILE = 4096
# Programs per SM the split regime aims for: 4 x 132 SMs on an H100 keeps every SM busy while
# the per-program partial merge (up to MAX_CHUNKS values) stays negligible.
PROGRAMS_PER_SM = 4
# A chunk shorter than this many elements spends more on its merge and launch bookkeeping than
# on moving data (16 K bf16 elements = 32 KB, ~10 ns of one SM's share of 3 TB/s).
MIN_CHUNK_ELEMS = 16384
# The normalize kernel loads all partials of its group as one vector: bound its length.
MAX_CHUNKS = 1024
# Below this many elements per group the fused regime is kept even when N * G is small: the
# whole group fits in L1/L2 on its second read and a second launch (~3 us) would dominate
# (docs/spec.md#performance-floors: a two-kernel split ran 2x320x64x64 at 27 % of the floor).
FUSED_MAX_GROUP_ELEMS = 65536
# Programs the device runs at once when it is not a GPU (the interpreter): keeps the tiny test
# tensors in the fused regime under "auto".
CPU_SM_COUNT = 1


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class LaunchConfig:
    """How one call is launched.

    ``block_c`` x ``block_l`` is the tile (channels x positions); ``chunk_l`` positions per
    program along L and ``chunks`` = ceil(L / chunk_l) programs per group (1 in the fused regime).
    """

    regime: str
    block_c: int
    block_l: int
    chunk_l: int
    chunks: int


def _tile(max_group: int, L: int, channels_fast: bool) -> tuple[int, int]:
    """(block_c, block_l). The contiguous axis gets the long side of the tile so that loads are
    coalesced: channels for channels-last (a group's channels are adjacent), positions for NCHW."""
    if channels_fast:
        block_c = min(next_pow2(max_group), 64)
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
) -> LaunchConfig:
    """Pick the regime and tiling for an (N, C, L) input whose largest group has ``max_group``
    channels. ``regime`` forces "fused" or "split" (tests); "auto" decides by size."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    block_c, block_l = _tile(max_group, L, channels_fast)
    group_elems = max_group * L
    if regime == "auto":
        fills_gpu = N * num_groups >= PROGRAMS_PER_SM * sm_count
        regime = "fused" if fills_gpu or group_elems <= FUSED_MAX_GROUP_ELEMS else "split"
    if regime == "fused":
        return LaunchConfig("fused", block_c, block_l, L, 1)
    if regime == "split" and group_elems <= FUSED_MAX_GROUP_ELEMS:
        # Forced split on a small group (tests): about four chunks of one small tile each, so
        # that the partial/merge path really merges several chunks.
        block_l = min(block_l, next_pow2(-(-L // 4)))
        chunks_wanted = 4
    else:
        want = -(-PROGRAMS_PER_SM * sm_count // max(1, N * num_groups))
        chunks_wanted = max(1, min(want, group_elems // MIN_CHUNK_ELEMS, MAX_CHUNKS))
    chunk_l = -(-L // chunks_wanted)
    chunk_l = -(-chunk_l // block_l) * block_l  # whole tiles per chunk
    chunks = -(-L // chunk_l)
    return LaunchConfig("split", block_c, block_l, chunk_l, chunks)
