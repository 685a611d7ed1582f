"""CPU: uneven groups (G does not divide C), torch's kernel per run of equal-size groups vs the
composite path.

``uneven=True`` splits C channels into larger groups first, then groups one channel smaller:
two runs of equal-size groups. The torch backend runs torch's kernel on each run and
concatenates; the composite path (shift, per-channel moments, Chan merge) is the alternative.
Both are timed in blocks of consecutive calls (groupnorm.bench.time_pair), with torch's
kernel on the same tensor with an even G nearby as the floor, alternating with the per-run path;
the composite path is timed afterwards. Blocks, not single calls: alternating single calls with
the composite path's large temporaries made the per-run path's time vary 5x between runs of this
script. Large buffers come from fresh pages whenever glibc's allocator has returned memory to
the system, which still varies a path's time up to 4x between runs; run with
``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`` to see the ops alone.
Forward only, float32, one thread by default.

    python benchmarks/cpu_uneven.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from cpu_standard import save, small_input_args

import groupnorm
from groupnorm import bench
from groupnorm.backends import torch_ops

# (shape, G) where G does not divide C.
SHAPES: list[tuple[tuple[int, ...], int]] = [
    ((2, 48, 64, 64), 32),  # 16 groups of 2, 16 of 1
    ((2, 100, 32, 32), 32),  # 4 groups of 4, 28 of 3
    ((2, 1000, 16, 16), 32),  # 8 groups of 32, 24 of 31
]
REPS = 20  # samples per path
CALLS = 10  # consecutive calls per sample


def _composite(x: torch.Tensor, G: int, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    saved = torch_ops.MAX_NATIVE_RUNS
    torch_ops.MAX_NATIVE_RUNS = 0  # every uneven plan takes the composite path
    try:
        return groupnorm.group_norm(x, G, w, b, uneven=True)
    finally:
        torch_ops.MAX_NATIVE_RUNS = saved


def _measure(shape: tuple[int, ...], G: int) -> dict:
    C = shape[1]
    x = torch.randn(shape)
    w, b = torch.randn(C), torch.randn(C)
    even_g = max(g for g in range(1, G + 1) if C % g == 0)
    with torch.no_grad():
        torch.testing.assert_close(
            groupnorm.group_norm(x, G, w, b, uneven=True),
            _composite(x, G, w, b),
            rtol=1e-5,
            atol=1e-5,
        )
        # The even floor alternates with the per-run path; the composite path's large
        # temporaries come after, so that they cannot slow the first pair's allocations.
        t_runs, t_even = bench.time_pair(
            bench.batched(lambda: groupnorm.group_norm(x, G, w, b, uneven=True), CALLS),
            bench.batched(lambda: F.group_norm(x, even_g, w, b), CALLS),
            REPS,
        )
        t_comp, _ = bench.time_pair(
            bench.batched(lambda: _composite(x, G, w, b), CALLS), lambda: None, REPS
        )
    ms = [statistics.median(t) / CALLS * 1e3 for t in (t_runs, t_comp, t_even)]
    plan = groupnorm.functional.resolve_plan(C, G, uneven=True)
    print(
        f"{str(shape):<18} {plan.describe():<22} {ms[0]:9.3f} {ms[1]:9.3f} {ms[2]:9.3f} "
        f"{ms[1] / ms[0]:8.1f}x {ms[0] / ms[2]:8.1f}x",
        flush=True,
    )
    return {
        "shape": list(shape),
        "G": G,
        "plan": plan.describe(),
        "native_runs_ms": ms[0],
        "composite_ms": ms[1],
        "torch_even_ms": ms[2],
        "torch_even_G": even_g,
        "speedup": ms[1] / ms[0],
        "runs_over_even": ms[0] / ms[2],
        "reps": REPS,
        "calls_per_sample": CALLS,
    }


def run() -> list[dict]:
    torch.manual_seed(0)
    return [_measure(shape, G) for shape, G in SHAPES]


def main() -> None:
    args = small_input_args(__doc__)
    print(
        f"{'shape':<18} {'plan':<22} {'runs ms':>9} {'comp ms':>9} {'even ms':>9} "
        f"{'speedup':>9} {'vs even':>9}"
    )
    save(args.out, "cpu_uneven", run())


if __name__ == "__main__":
    main()
