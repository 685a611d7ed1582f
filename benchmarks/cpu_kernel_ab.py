"""CPU: the fused kernel, this tree's source against another revision's, one process.

Builds ``src/groupnorm/backends/cpu_kernel.c`` as it is in the working tree and as it is at
``--base`` (a git revision; default HEAD), as the loader builds and loads the kernel (its
cache keeps both), and times ``cpu_kernel.backward`` (or, with ``--forward``,
``cpu_kernel.forward`` with weight and bias, of x in ``--dtype``) of each on the same inputs,
the two builds alternated (A B, B A, ...) PAIRS times; the table gives each build's median and
the median of the pairs' time ratios (new / base). The outputs of both are checked equal
within float32's bound first (half precision: within one of its ulps). Both revisions must
share the kernel's C call signatures (the Python wrapper is this tree's).

    python benchmarks/cpu_kernel_ab.py [--base REV] [--forward [--dtype D]] [--threads T]
                                       [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from cpu_standard import add_out, add_threads, save

from groupnorm.backends import cpu_kernel
from groupnorm.functional import resolve_plan

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/groupnorm/backends/cpu_kernel.c"
# (shape, channels-last, std of x: rstd 1 or 100, activation the backward differentiates)
CASES: list[tuple[tuple[int, ...], bool, float, str | None]] = [
    ((2, 320, 64, 64), False, 1.0, None),
    ((2, 320, 64, 64), True, 1.0, None),
    ((2, 1280, 8, 8), False, 1.0, None),
    ((8, 64, 32, 32), True, 1.0, None),
    ((2, 320, 64, 64), False, 0.01, None),
    ((2, 320, 64, 64), False, 1.0, "silu"),
    ((2, 320, 64, 64), True, 1.0, "silu"),
    ((2, 1280, 8, 8), False, 1.0, "silu"),
    ((2, 320, 64, 64), False, 1.0, "gelu"),
]
# The forward's: standard shapes of benchmarks/cpu_standard.py, both layouts.
FORWARD_CASES: list[tuple[tuple[int, ...], bool, float, str | None]] = [
    ((1, 1280, 8, 8), True, 1.0, None),
    ((2, 1280, 8, 8), True, 1.0, None),
    ((2, 1280, 8, 8), False, 1.0, None),
    ((2, 640, 32, 32), True, 1.0, None),
    ((2, 320, 64, 64), True, 1.0, None),
    ((2, 320, 64, 64), False, 1.0, None),
    ((1, 512, 64, 64), True, 1.0, None),
    ((2, 960, 64, 64), True, 1.0, None),
    ((8, 64, 32, 32), True, 1.0, None),
]
PAIRS = 40


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def run(base: str, forward: bool, dtype: torch.dtype = torch.float32) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "base.c"
        old.write_text(_git("show", f"{base}:{SOURCE}"))
        builds = {
            "base": cpu_kernel._load(cpu_kernel._build(old)),
            "new": cpu_kernel._load(cpu_kernel._build(ROOT / SOURCE)),
        }
        loader = cpu_kernel.library
        rows = []
        try:
            for shape, channels_last, std, activation in FORWARD_CASES if forward else CASES:
                rows.append(_case(builds, forward, shape, channels_last, std, activation, dtype))
        finally:
            cpu_kernel.library = loader
    return rows


def _case(
    builds: dict[str, ModuleType],
    forward: bool,
    shape: tuple[int, ...],
    channels_last: bool,
    std: float,
    activation: str | None,
    dtype: torch.dtype,
) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape) * std).to(dtype=dtype, memory_format=fmt)
    w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
    plan = resolve_plan(shape[1], num_groups=32)
    if forward:

        def once() -> torch.Tensor:
            return cpu_kernel.forward(x, plan, w, b, 1e-5)[0]

    else:
        dy = torch.randn(shape).to(memory_format=fmt)
        _, moments = cpu_kernel.forward(x, plan, w, None, 1e-5, want_moments=True)

        def once() -> torch.Tensor:
            return cpu_kernel.backward(x, dy, plan, w, moments, 1e-5, activation=activation)[0]

    def call(name: str) -> torch.Tensor:
        cpu_kernel.library = lambda: builds[name]  # type: ignore[assignment]
        return once()

    # Half precision's output is a float32 result rounded once: a float32 difference in the
    # last bit can move it by one of its own ulps.
    tol = 2e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(call("new"), call("base"), rtol=tol, atol=tol / std)
    seconds: dict[str, list[float]] = {"base": [], "new": []}
    for i in range(PAIRS + 1):  # the first pair warms up
        for name in ("base", "new") if i % 2 else ("new", "base"):
            start = time.perf_counter()
            call(name)
            if i:
                seconds[name].append(time.perf_counter() - start)
    ratio = statistics.median(n / b for n, b in zip(seconds["new"], seconds["base"], strict=True))
    row = {
        "pass": "forward" if forward else "backward",
        "shape": list(shape),
        "layout": "channels_last" if channels_last else "nchw",
        "dtype": str(dtype).removeprefix("torch."),
        "x_std": std,
        "activation": activation,
        "base_ms": statistics.median(seconds["base"]) * 1e3,
        "new_ms": statistics.median(seconds["new"]) * 1e3,
        "ratio": ratio,
        "pairs": PAIRS,
    }
    print(
        f"{str(shape):18s} {row['layout']:13s} {row['dtype']:8s} std {std:<5} "
        f"{str(activation):5s} "
        f"base {row['base_ms']:7.3f} ms  "
        f"new {row['new_ms']:7.3f} ms  new/base {ratio:.3f}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the base source")
    parser.add_argument("--forward", action="store_true", help="time the forward instead")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="x's dtype (forward)",
    )
    add_threads(parser)
    add_out(parser)
    args = parser.parse_args()
    if args.dtype != "float32" and not args.forward:
        parser.error("--dtype is for the forward (--forward); the backward runs float32")
    torch.set_num_threads(args.threads)
    base = _git("rev-parse", "--short", args.base).strip()
    name = f"cpu_kernel_ab-forward-{args.dtype}" if args.forward else "cpu_kernel_ab"
    save(args.out, f"{name}-base-{base}", run(base, args.forward, getattr(torch, args.dtype)))
