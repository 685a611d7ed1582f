"""CPU: groupnorm.group_norm vs torch.nn.functional.group_norm on the standard case, float32,
bfloat16 and float16.

The standard case is what both can do: G divides C, no epilogue. Forward only, no autograd.
Ours runs the fused CPU kernel on float32 (exact, both layouts) and torch's kernel, checked, on
half precision where it holds the tolerance table (elsewhere the fused kernel). Ours and
torch's calls are timed interleaved (A B, B A, ...) so that load from other processes and cache
warmth hit both alike, as many pairs as fill about 1.5 s a row (20 to 400); the table gives the
medians and the ratio as the median of the pairs' ratios, with its quartiles: on this project's
shared 2-core machine one row's ratio of medians moved by 5-10 % between runs, the pairs' ratio
by less (each pair shares the load of its moment). Correctness against float64 is checked
first.

    python benchmarks/cpu_standard.py [--quick] [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import bench
from groupnorm.backends import cpu_kernel

# Benchmark shapes (docs/spec.md) that fit a 2-core CPU run (the largest take seconds per call).
SHAPES: list[tuple[str, tuple[int, ...], int]] = [
    ("SD1.5 64x64", (2, 320, 64, 64), 32),
    ("SD1.5 32x32", (2, 640, 32, 32), 32),
    ("SD1.5 16x16", (2, 1280, 16, 16), 32),
    ("SD1.5 8x8", (2, 1280, 8, 8), 32),
    ("SD1.5 up concat", (2, 960, 64, 64), 32),
    ("VAE 512px 64^2", (1, 512, 64, 64), 32),
    ("R50-GN C5 odd HW", (2, 2048, 25, 38), 32),
    ("3-D bottleneck", (2, 320, 8, 8, 8), 32),
    ("1-D sequence", (8, 512, 1024), 32),
    ("CIFAR-scale", (8, 64, 32, 32), 32),
]


def run(quick: bool) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    shapes = SHAPES[-4:] if quick else SHAPES
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, shape, G in shapes:
            for layout in ("nchw", "channels_last"):
                x = torch.randn(shape).to(dtype)
                if layout == "channels_last":
                    if len(shape) == 3:
                        continue  # (N, C, L) has no channels-last memory format in torch
                    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
                    x = x.to(memory_format=fmt)
                C = shape[1]
                w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
                with torch.no_grad():
                    ours = groupnorm.group_norm(x, G, w, b)
                    exact = F.group_norm(x.double(), G, w.double(), b.double())
                    tol = 1e-5 if dtype == torch.float32 else 2e-2
                    torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=tol)
                    args = (x, G, w, b)

                    def ours(a: tuple = args) -> torch.Tensor:
                        return groupnorm.group_norm(*a)

                    def theirs(a: tuple = args) -> torch.Tensor:
                        return F.group_norm(*a)

                    reps = 6 if quick else _pairs(theirs)
                    t_ours, t_torch = bench.time_pair(ours, theirs, reps)
                m_ours, m_torch = statistics.median(t_ours), statistics.median(t_torch)
                q1, ratio, q3 = statistics.quantiles(
                    [a / b for a, b in zip(t_ours, t_torch, strict=True)], n=4
                )
                rows.append(
                    {
                        "workload": name,
                        "shape": list(shape),
                        "G": G,
                        "dtype": str(dtype),
                        "layout": layout,
                        "ours_ms": m_ours * 1e3,
                        "torch_ms": m_torch * 1e3,
                        "ratio": ratio,
                        "ratio_quartiles": [q1, q3],
                        "ratio_of_medians": m_ours / m_torch,
                        "reps": reps,
                    }
                )
                print(
                    f"{name:<18} {str(tuple(shape)):<20} {str(dtype)[6:]:<9} {layout:<14} "
                    f"{m_ours * 1e3:9.3f} {m_torch * 1e3:9.3f} {ratio:6.3f} "
                    f"[{q1:.3f}, {q3:.3f}] {reps:5d}",
                    flush=True,
                )
    return rows


def _pairs(call: Callable[[], object], seconds: float = 1.5) -> int:
    """How many interleaved pairs of calls like ``call`` fill about ``seconds``: 20 to 400."""
    call()
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    return max(20, min(400, int(seconds / (2 * once))))


def save(out: Path, benchmark: str, rows: list[dict]) -> None:
    """Write the rows with the shared harness's metadata (groupnorm.bench) and say where."""
    print(f"wrote {bench.save_results(out, bench.environment(benchmark), rows)}")


def per_call_us(
    ours: Callable[[], object], theirs: Callable[[], object], calls: int, samples: int
) -> tuple[float, float]:
    """Median microseconds per call of ours and theirs, batches of ``calls`` alternating."""
    t_ours, t_theirs = bench.time_pair(
        bench.batched(ours, calls), bench.batched(theirs, calls), samples
    )
    return (
        statistics.median(t_ours) / calls * 1e6,
        statistics.median(t_theirs) / calls * 1e6,
    )


@contextmanager
def kernel_limit(name: str, value: int) -> Iterator[ModuleType]:
    """The fused CPU kernel's module with its limit ``name`` (``stream_min`` or
    ``fused_cl_bytes``, setters that return the value before) at ``value``, set back on exit;
    exits where the kernel is not in use here."""
    lib = cpu_kernel.library()
    if lib is None:
        raise SystemExit(f"the fused CPU kernel is not in use here: {cpu_kernel.status()}")
    before = getattr(lib, name)(value)
    try:
        yield lib
    finally:
        getattr(lib, name)(before)


RESULTS = Path(__file__).parent / "results"


def count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least`` (torch.set_num_threads(0) raised a
    RuntimeError traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    return parse


def writable_dir(text: str) -> Path:
    """An argparse type: a folder, created and tried with a file at parsing, so that an --out
    that cannot take the results fails before the timings, not after them all (unsaved)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"cannot write files in {text}: {e.strerror or e}"
        ) from None
    return path


def add_out(parser: argparse.ArgumentParser) -> None:
    """--out, checked before any timing (:func:`writable_dir`; the default too)."""
    parser.add_argument(
        "--out", type=writable_dir, default=str(RESULTS), help=f"results folder (default {RESULTS})"
    )


def add_threads(parser: argparse.ArgumentParser, default: int = 1) -> None:
    parser.add_argument(
        "--threads", type=count(1), default=default, help=f"torch CPU threads (default {default})"
    )


def small_input_args(doc: str) -> argparse.Namespace:
    """The options of the small-input benchmarks (--out, --threads default 1), threads set."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_out(parser)
    add_threads(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="four small shapes, 6 pairs")
    add_out(parser)
    parser.add_argument(
        "--threads",
        type=count(0),
        default=0,
        help="torch CPU threads (0: torch's default). One thread is steadier on "
        "a machine shared with other jobs: a busy core delays the wake-up "
        "of a second worker thread by a scheduler slice (~8 ms seen)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{'workload':<18} {'shape':<20} {'dtype':<9} {'layout':<14} {'ours ms':>9} "
        f"{'torch ms':>9} {'ratio':>6} {'quartiles':>16} {'pairs':>5}"
    )
    rows = run(args.quick)
    ratios = [r["ratio"] for r in rows]
    print(
        f"geometric-mean ratio ours/torch: "
        f"{statistics.geometric_mean(ratios):.3f}; worst {max(ratios):.3f}"
    )
    save(args.out, "cpu_standard", rows)


if __name__ == "__main__":
    main()
