"""CPU: uneven groups (G does not divide C), each path of the torch backend against torch's
kernel on an even G of the same tensor.

``uneven=True`` splits C channels into larger groups first, then groups one channel smaller:
two runs of equal-size groups. Where autograd does not record, the fused CPU kernel serves
them (``fused``: any plan is a list of channel ranges to it). Where it is not built, the torch
backend serves them, in order of preference, from per-channel sums of x and x^2 and one
multiply-add (``sums``: where autograd does not record and ``|mean| * rstd <= SUMS_TRUST``),
from torch's kernel once per run with the outputs concatenated (``runs``: under autograd, or
past that ratio), or from the composite path (shift, per-channel moments, Chan merge). Each
path is timed in blocks of consecutive calls (groupnorm.bench.time_pair) alternating with
torch's kernel on an even G nearby, the floor. Blocks, not single calls: alternating single
calls with the composite path's large temporaries made a path's time vary 5x between runs of
this script. Large buffers come from fresh pages whenever glibc's allocator has returned
memory to the system, which still varies a path's time up to 4x between runs; run with
``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`` to see the ops alone.
Forward only, float32, NCHW and channels-last, one thread by default.

    python benchmarks/cpu_uneven.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from cpu_standard import save, small_input_args

import groupnorm
from groupnorm import bench
from groupnorm.backends import cpu_kernel, torch_ops

# (shape, G) where G does not divide C.
SHAPES: list[tuple[tuple[int, ...], int]] = [
    ((2, 48, 64, 64), 32),  # 16 groups of 2, 16 of 1
    ((2, 100, 32, 32), 32),  # 4 groups of 4, 28 of 3
    ((2, 1000, 16, 16), 32),  # 8 groups of 32, 24 of 31
]
LAYOUTS = ("nchw", "channels_last")
REPS = 20  # samples per path
CALLS = 10  # consecutive calls per sample
PATHS = ("fused", "sums", "runs", "composite")


@contextlib.contextmanager
def _path(name: str) -> Iterator[None]:
    """Make the torch backend take one path for uneven plans."""
    saved = torch_ops.SUMS_TRUST, torch_ops.MAX_NATIVE_RUNS, cpu_kernel.library
    if name != "fused":
        cpu_kernel.library = lambda: None  # type: ignore[assignment]  # as if not built
    if name not in ("fused", "sums"):
        torch_ops.SUMS_TRUST = -1.0  # the sums path declines every call
    if name == "composite":
        torch_ops.MAX_NATIVE_RUNS = 0
    try:
        yield
    finally:
        torch_ops.SUMS_TRUST, torch_ops.MAX_NATIVE_RUNS, cpu_kernel.library = saved


def _measure(shape: tuple[int, ...], G: int, layout: str) -> dict:
    C = shape[1]
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(C), torch.randn(C)
    even_g = max(g for g in range(1, G + 1) if C % g == 0)
    ms = {}
    with torch.no_grad():
        expected = groupnorm.group_norm(x.double(), G, w.double(), b.double(), uneven=True)
        for name in PATHS:
            with _path(name):
                ours = groupnorm.group_norm(x, G, w, b, uneven=True)
                torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
                t_path, t_even = bench.time_pair(
                    bench.batched(lambda: groupnorm.group_norm(x, G, w, b, uneven=True), CALLS),
                    bench.batched(lambda: F.group_norm(x, even_g, w, b), CALLS),
                    REPS,
                )
            ms[name] = statistics.median(t_path) / CALLS * 1e3
            ms[f"even_with_{name}"] = statistics.median(t_even) / CALLS * 1e3
    over = {name: ms[name] / ms[f"even_with_{name}"] for name in PATHS}
    plan = groupnorm.functional.resolve_plan(C, G, uneven=True)
    print(
        f"{str(shape):<18} {layout:<13} {plan.describe():<22} "
        + " ".join(f"{ms[n]:8.3f} {over[n]:5.2f}x" for n in PATHS),
        flush=True,
    )
    return {
        "shape": list(shape),
        "layout": layout,
        "G": G,
        "plan": plan.describe(),
        "torch_even_G": even_g,
        **{f"{k}_ms": v for k, v in ms.items()},
        **{f"{n}_over_even": over[n] for n in PATHS},
        "reps": REPS,
        "calls_per_sample": CALLS,
    }


def run() -> list[dict]:
    torch.manual_seed(0)
    return [_measure(shape, G, layout) for shape, G in SHAPES for layout in LAYOUTS]


def main() -> None:
    args = small_input_args(__doc__)
    print(
        f"{'shape':<18} {'layout':<13} {'plan':<22} "
        + " ".join(f"{n + ' ms':>8} {'/even':>6}" for n in PATHS)
    )
    save(args.out, "cpu_uneven", run())


if __name__ == "__main__":
    main()
