"""``groupnorm bench``: GPU GroupNorm speed against the memory-bandwidth floor.

Every shape of docs/spec.md#benchmark-shapes, in NCHW and channels-last, forward and
forward+backward, for each provider (ours, torch eager, torch.compile, cuDNN BatchNorm in
training mode on the same tensor, Liger-Kernel when importable). Per case:

* correctness first: each provider's output (and dx for forward+backward) is compared with a
  float32 computation of the same op; a provider that fails is reported, not timed;
* timing with CUDA events, the L2 cache flushed (a 256 MB write) before every repetition,
  median and p20/p80; every case is captured in a CUDA graph and replayed, so that host time
  is not what is measured (on the H200 machine here, a virtual machine, an eager fwd+bwd call
  costs 300-1300 us of host time, torch's own and ours alike, more than the GPU work of every
  shape up to 100 MB; host cost is benchmarks/host_overhead.py's subject);
* bandwidth from an explicit formula, :func:`bytes_moved`: the forward must read x and write y
  (2 tensors), the backward read x and dy and write dx (3 more); weight, bias and statistics
  are ignored (they are C or N*G values). GB/s = bytes / median, and % of the device-to-device
  copy bandwidth measured at the start of the run (the floor of a shape is bytes / that rate).

The table is printed and written as JSON (device, versions, date, copy bandwidth, rows) to
``--out``, in a file named after the benchmark, the machine and the time, so runs never
overwrite each other. Exit status: 0 when every case of ours passed its correctness check, 1
when one failed (its row records why), 2 without CUDA (no CPU numbers).

The harness pieces the CPU scripts in ``benchmarks/`` share with it: :func:`environment`
(what a result file records about where and when), :func:`save_results` (the JSON file and its
name), :func:`time_pair` and :func:`batched` (interleaved CPU timing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import groupnorm

__all__ = [
    "DIRECTIONS",
    "LAYOUTS",
    "PROVIDERS",
    "SHAPES",
    "Shape",
    "add_arguments",
    "batched",
    "bytes_moved",
    "environment",
    "failures",
    "finish",
    "main",
    "run",
    "save_results",
    "time_pair",
]

# ------------------------------------------------------------------------------- shapes, bytes


@dataclass(frozen=True)
class Shape:
    """One benchmark input: x of shape (N, C, *spatial), G groups."""

    workload: str
    N: int
    C: int
    spatial: tuple[int, ...]
    G: int = 32
    dtype: torch.dtype = torch.bfloat16

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.N, self.C, *self.spatial)

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in self.dims) + f" G={self.G} {str(self.dtype)[6:]}"


def _sd(N: int, C: int, hw: int, name: str) -> Shape:
    return Shape(name, N, C, (hw, hw))


# docs/spec.md#benchmark-shapes: one entry per shape; rows with several values are expanded.
SHAPES: list[Shape] = [
    _sd(2, 320, 64, "SD1.5 UNet 64x64"),
    _sd(2, 640, 32, "SD1.5 32x32"),
    _sd(2, 1280, 16, "SD1.5 16x16"),
    _sd(2, 1280, 8, "SD1.5 8x8"),
    _sd(2, 960, 64, "SD1.5 up-block concat (C/G=30)"),
    _sd(2, 320, 128, "SDXL 128x128"),
    _sd(16, 320, 64, "SD training batch"),
    _sd(1, 512, 64, "VAE 512px 64^2"),
    _sd(1, 512, 128, "VAE 512px 128^2"),
    _sd(1, 256, 256, "VAE 512px 256^2"),
    _sd(1, 128, 512, "VAE 512px 512^2"),
    _sd(1, 128, 1024, "VAE 1024px"),
    Shape("Video VAE 5-D", 1, 128, (20, 256, 256)),
    Shape("Detection FPN P2", 2, 256, (200, 304)),
    Shape("R50-GN C5 (odd HxW)", 2, 2048, (25, 38)),
    _sd(32, 256, 56, "ResNet training b32"),
    Shape("ResNet training b32 fp32", 32, 256, (56, 56), dtype=torch.float32),
    Shape("3-D segmentation", 2, 32, (128, 128, 128), G=8),
    Shape("3-D bottleneck", 2, 320, (8, 8, 8)),
    Shape("1-D sequence", 8, 512, (1024,)),
    _sd(8, 64, 32, "CIFAR-scale"),
]

LAYOUTS = ("nchw", "channels_last")
DIRECTIONS = ("fwd", "fwd+bwd")
# Tensors of x's size that must cross HBM: forward reads x, writes y; the backward reads x
# and dy and writes dx (recomputing y's epilogue from x instead of reading a saved y).
TENSORS_MOVED = {"fwd": 2, "fwd+bwd": 5}
FLUSH_BYTES = 256 * 2**20  # > 5x the 50 MB L2 of an H100


def bytes_moved(shape: Shape, direction: str) -> int:
    """Bytes the op must move at least: TENSORS_MOVED[direction] tensors of x's size."""
    return TENSORS_MOVED[direction] * shape.nbytes


def make_input(
    shape: Shape, layout: str, device: str | torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Random x in the layout: NCHW-contiguous, or channels-last (channel stride 1, also for
    (N, C, L) and 5-D)."""
    if layout == "nchw":
        x = torch.randn(shape.dims, generator=generator)
    else:
        perm = (0, *range(2, len(shape.dims)), 1)  # N, *S, C in memory
        x = torch.randn([shape.dims[i] for i in perm], generator=generator)
        x = x.permute(0, len(perm) - 1, *range(1, len(perm) - 1))
    return x.to(device=device, dtype=shape.dtype)


# ---------------------------------------------------------------------------------- providers


Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """A way to compute the op. ``kind`` says which float32 computation checks it: "group"
    (GroupNorm) or "batch" (BatchNorm in training mode, the speed bar it must beat)."""

    name: str
    kind: str
    fn: Callable[[], Fn]  # built lazily: imports and torch.compile
    available: Callable[[], str | None] = field(default=lambda: None)


def _ours() -> Fn:
    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, G: int) -> torch.Tensor:
        y = groupnorm.group_norm(x, G, w, b, backend="triton")
        assert isinstance(y, torch.Tensor)
        return y

    return f


def _ours_wave() -> Fn:
    """Ours forced into the wave regime (opt-in), forward and backward."""
    from groupnorm.functional import resolve_plan
    from groupnorm.triton.group_norm import group_norm_triton

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, G: int) -> torch.Tensor:
        return group_norm_triton(x, resolve_plan(x.shape[1], G), w, b, regime="wave")[0]

    return f


def _ours_available() -> str | None:
    return groupnorm.available_backends().get("triton", "the triton backend is not registered")


def _torch() -> Fn:
    return lambda x, w, b, G: F.group_norm(x, G, w, b)


def _compiled() -> Fn:
    compiled = torch.compile(F.group_norm, dynamic=False)
    return lambda x, w, b, G: compiled(x, G, w, b)


def _batchnorm() -> Fn:
    return lambda x, w, b, G: F.batch_norm(x, None, None, w, b, training=True)


def _liger() -> Fn:
    from liger_kernel.ops.group_norm import LigerGroupNormFunction

    return lambda x, w, b, G: LigerGroupNormFunction.apply(x, w, b, x.shape[1], G, 1e-5)


def _liger_available() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("liger_kernel") else "liger_kernel is not installed"


PROVIDERS: list[Provider] = [
    Provider("ours", "group", _ours, _ours_available),
    Provider("ours-wave", "group", _ours_wave, _ours_available),
    Provider("torch", "group", _torch),
    Provider("torch.compile", "group", _compiled),
    Provider("cudnn-batchnorm", "batch", _batchnorm),
    Provider("liger", "group", _liger, _liger_available),
]

# (atol, rtol) of the check against torch's float32 computation, by dtype: a few units in the last
# place of bf16/fp16 at |y| ~ 4, and float32 summation-order differences.
CHECK_TOL = {
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (4e-3, 2e-3),
    torch.float32: (1e-4, 1e-4),
}


def _reference(
    kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, G: int
) -> torch.Tensor:
    xf, wf, bf = x.float(), w.float(), b.float()
    if kind == "batch":
        return F.batch_norm(xf, None, None, wf, bf, training=True)
    return F.group_norm(xf, G, wf, bf)


def _close(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> str | None:
    atol, rtol = CHECK_TOL[dtype]
    err = (got.float() - want).abs() - rtol * want.abs()
    worst = err.max().item() if err.numel() else 0.0
    return None if worst <= atol * scale else f"error {worst:.2e} above atol {atol * scale:.1e}"


# ------------------------------------------------------------------------------------- timing

Timer = Callable[[Callable[[], object], bool, int], tuple[float, float, float]]


def cuda_time(fn: Callable[[], object], graph: bool, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) seconds of ``fn`` with the L2 flushed before each repetition; with
    ``graph`` the call is captured once in a CUDA graph and replayed."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    run: Callable[[], object] = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    for _ in range(5):
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends, strict=True)]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def copy_bandwidth(timer: Timer, device: str | torch.device, nbytes: int = 2**30) -> float:
    """Measured device-to-device copy rate in bytes/s, read plus write (2 * nbytes per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _, _ = timer(lambda: dst.copy_(src), False, 20)
    return 2 * nbytes / median


# ---------------------------------------------------------------------------------------- run


def _case(
    provider: Provider, fn: Fn, shape: Shape, x: torch.Tensor, direction: str, gen: torch.Generator
) -> tuple[Callable[[], object] | None, str | None]:
    """(the callable to time, None) after checking the provider's result, or (None, why not)."""
    C, G = shape.C, shape.G
    w = (torch.rand(C, generator=gen) + 0.5).to(x.device, x.dtype)
    b = torch.randn(C, generator=gen).to(x.device, x.dtype)
    try:
        with torch.no_grad():
            y = fn(x, w, b, G)
        if (bad := _close(y, _reference(provider.kind, x, w, b, G), shape.dtype)) is not None:
            return None, f"wrong output: {bad}"
        if direction == "fwd":
            return (lambda: fn(x, w, b, G)), None
        xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
        dy = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        (dx,) = torch.autograd.grad(fn(xr, wr, br, G), (xr,), dy)
        xf = x.detach().float().requires_grad_()
        (dx_ref,) = torch.autograd.grad(_reference(provider.kind, xf, w, b, G), (xf,), dy.float())
        # dx sums over a whole group: scale the allowance as the test table does.
        group = shape.numel // shape.N // G if provider.kind == "group" else shape.numel // C
        if (bad := _close(dx, dx_ref, shape.dtype, max(1.0, math.sqrt(group / 256)))) is not None:
            return None, f"wrong dx: {bad}"
    except Exception as e:  # a provider that cannot run a case is reported, the run goes on
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return (lambda: torch.autograd.grad(fn(xr, wr, br, G), (xr, wr, br), dy)), None


def run(
    shapes: Sequence[Shape],
    layouts: Sequence[str],
    directions: Sequence[str],
    providers: Sequence[Provider],
    *,
    timer: Timer,
    device: str | torch.device,
    reps: int,
    copy_bw: float,
    echo: Callable[[str], None] = print,
    on_row: Callable[[dict], None] = lambda row: None,
) -> list[dict]:
    """Check and time every (shape, layout, direction, provider); one dict per row, each also
    handed to ``on_row`` as soon as it is done (so that a run cut short keeps what it measured)."""
    usable = []
    for p in providers:
        reason = p.available()
        if reason is None:
            usable.append((p, p.fn()))
        else:
            echo(f"provider {p.name} skipped: {reason}")
    rows = []
    echo(
        f"{'workload':<30} {'shape':<26} {'layout':<13} {'dir':<8} {'provider':<16} "
        f"{'median us':>10} {'p20':>9} {'p80':>9} {'GB/s':>7} {'% copy':>7}"
    )
    for shape in shapes:
        for layout in layouts:
            gen = torch.Generator().manual_seed(0)
            x = make_input(shape, layout, device, gen)
            for direction in directions:
                nbytes = bytes_moved(shape, direction)
                for provider, fn in usable:
                    row = {
                        "workload": shape.workload,
                        "shape": list(shape.dims),
                        "G": shape.G,
                        "dtype": str(shape.dtype),
                        "layout": layout,
                        "direction": direction,
                        "provider": provider.name,
                        "bytes": nbytes,
                        "cuda_graph": True,
                    }
                    timed, why = _case(provider, fn, shape, x, direction, gen)
                    if timed is None:
                        row["error"] = why
                        echo(
                            f"{shape.workload:<30} {shape.label:<26} {layout:<13} "
                            f"{direction:<8} {provider.name:<16} {why}"
                        )
                    else:
                        median, p20, p80 = timer(timed, True, reps)
                        row.update(
                            median_us=median * 1e6,
                            p20_us=p20 * 1e6,
                            p80_us=p80 * 1e6,
                            gbps=nbytes / median / 1e9,
                            pct_copy_bw=100 * nbytes / median / copy_bw,
                        )
                        echo(
                            f"{shape.workload:<30} {shape.label:<26} {layout:<13} "
                            f"{direction:<8} {provider.name:<16} {row['median_us']:>10.1f} "
                            f"{row['p20_us']:>9.1f} {row['p80_us']:>9.1f} {row['gbps']:>7.0f} "
                            f"{row['pct_copy_bw']:>6.1f}%"
                        )
                    rows.append(row)
                    on_row(row)
    return rows


def failures(rows: Sequence[dict], provider: str = "ours") -> list[dict]:
    """The rows of ``provider`` that did not pass their correctness check (or did not run)."""
    return [r for r in rows if r["provider"] == provider and "error" in r]


# ------------------------------------------------------------------------------------ harness


def environment(benchmark: str, device: str | None = None) -> dict[str, object]:
    """What a result file records about where and when it was measured."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device or "cpu",
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "groupnorm": groupnorm.__version__,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    """The CPU's model name from Linux's /proc/cpuinfo (the session machines differ: AMD EPYC
    on some days, Intel Xeon on others, with CPU timings apart by up to 2x), else what
    platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text).lower().split())


def save_results(
    out: Path, meta: dict[str, object], rows: list[dict], path: Path | None = None
) -> Path:
    """Write ``{"meta", "rows"}`` to ``out/<benchmark>-<machine>-<UTC time>.json`` and return
    the path. The machine is the GPU's name, else ``<arch>-<cores>cores-<threads>threads``; a
    file of that name already there gets a ``-2``, ``-3``, ... suffix rather than overwritten.
    With ``path`` (what an earlier call returned) that file is rewritten with ``rows``."""
    if path is not None:
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return path
    if meta["device"] == "cpu":
        machine = f"{meta['machine']}-{meta['cpu_count']}cores-{meta['torch_threads']}threads"
    else:
        machine = str(meta["device"])
    when = dt.datetime.fromisoformat(str(meta["date"])).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{meta['benchmark']}-{_slug(machine)}-{when}"
    out.mkdir(parents=True, exist_ok=True)
    path, n = out / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{n}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return path


def time_pair(
    a: Callable[[], object], b: Callable[[], object], reps: int
) -> tuple[list[float], list[float]]:
    """CPU wall times (s) of ``reps`` calls each of ``a`` and ``b``, interleaved."""
    for _ in range(3):
        a()
        b()
    # Alternate which goes first (A B, B A, ...): the second call of a pair finds x warmer in
    # the cache, which alone made the second provider look ~5-10 % faster.
    times: dict[int, list[float]] = {0: [], 1: []}
    for rep in range(reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for which in order:
            fn = a if which == 0 else b
            t0 = time.perf_counter()
            fn()
            times[which].append(time.perf_counter() - t0)
    return times[0], times[1]


def batched(f: Callable[[], object], calls: int) -> Callable[[], None]:
    """``f`` called ``calls`` times in a row: one timing sample for :func:`time_pair`."""

    def in_a_row() -> None:
        for _ in range(calls):
            f()

    return in_a_row


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [p.name for p in PROVIDERS]
    parser.add_argument("--shapes", default="", help="only workloads whose name contains this")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {LAYOUTS}")
    parser.add_argument("--directions", default=",".join(DIRECTIONS), help=f"of {DIRECTIONS}")
    parser.add_argument("--providers", default=",".join(names), help=f"of {names}")
    parser.add_argument(
        "--reps", type=_at_least_two, default=50, help="timed repetitions per case (>= 2)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON results"
    )
    parser.add_argument(
        "--warm",
        metavar="I/N",
        help="run ours untimed on every N-th shape from the I-th (all layouts and directions) and "
        "save nothing: N such processes side by side fill Triton's disk cache, so that a later "
        "timed run compiles nothing",
    )


def _at_least_two(text: str) -> int:
    """--reps: the timing's quantiles need two repetitions at least."""
    try:
        reps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if reps < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {reps}")
    return reps


def _pick(value: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise ValueError(f"--{what} must be a comma list of {list(allowed)}, got {value!r}")
    return chosen


def main(args: argparse.Namespace) -> int:
    """Exit status 0, 1 where one of our cases failed its check (:func:`finish`), 2 for bad
    arguments (checked first, with or without a GPU) or no CUDA device."""
    try:
        layouts = _pick(args.layouts, LAYOUTS, "layouts")
        directions = _pick(args.directions, DIRECTIONS, "directions")
        names = _pick(args.providers, [p.name for p in PROVIDERS], "providers")
        shapes = [s for s in SHAPES if args.shapes.lower() in s.workload.lower()]
        if not shapes:
            raise ValueError(f"no workload name contains {args.shapes!r}")
        share = _share(args.warm) if args.warm else None
    except ValueError as e:
        print(f"groupnorm bench: error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "groupnorm bench: no CUDA device (torch.cuda.is_available() is False). The "
            "benchmark times GPU kernels against the GPU's copy bandwidth and reports no CPU "
            "numbers; run it on a machine with an NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    if share is not None:
        return _warm(share, shapes, layouts, directions, device)
    copy_bw = copy_bandwidth(cuda_time, device)
    name = torch.cuda.get_device_name(device)
    print(f"{name}: measured device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    meta = environment("bench", name)
    meta.update(
        copy_bandwidth_gbps=copy_bw / 1e9,
        reps=args.reps,
        l2_flush_bytes=FLUSH_BYTES,
        cuda_graph=True,
        tensors_moved=TENSORS_MOVED,
    )
    path = save_results(args.out, meta, [])
    done: list[dict] = []

    def keep(row: dict) -> None:
        done.append(row)
        save_results(args.out, meta, done, path)

    rows = run(
        shapes,
        layouts,
        directions,
        [p for p in PROVIDERS if p.name in names],
        timer=cuda_time,
        device=device,
        reps=args.reps,
        copy_bw=copy_bw,
        on_row=keep,
    )
    return finish(args.out, meta, rows, path)


def _share(value: str) -> tuple[int, int]:
    parts = value.split("/")
    if len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]):
        return int(parts[0]), int(parts[1])
    raise ValueError(f"--warm must be I/N with 0 <= I < N, got {value!r}")


def _warm(
    share: tuple[int, int],
    shapes: Sequence[Shape],
    layouts: Sequence[str],
    directions: Sequence[str],
    device: torch.device,
) -> int:
    """Ours once per case of ``shapes[i::n]``, untimed; exit status as :func:`finish`'s."""

    def once(fn: Callable[[], object], graph: bool, reps: int) -> tuple[float, float, float]:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1.0, 1.0, 1.0

    i, n = share
    ours = [p for p in PROVIDERS if p.name == "ours"]
    rows = run(shapes[i::n], layouts, directions, ours, timer=once, device=device, reps=1,
               copy_bw=1.0, echo=lambda line: None)  # fmt: skip
    for r in failures(rows):
        print(f"groupnorm bench --warm: ours failed {r['workload']} {r['layout']} "
              f"{r['direction']}: {r['error']}")  # fmt: skip
    return 1 if failures(rows) else 0


def finish(out: Path, meta: dict[str, object], rows: list[dict], path: Path | None = None) -> int:
    """Save the results (to ``path`` where given); the exit status: 1 when a case of ours
    (either regime) failed, else 0."""
    print(f"wrote {save_results(out, meta, rows, path)}")
    failed = failures(rows) + failures(rows, "ours-wave")
    for r in failed:
        print(
            f"groupnorm bench: {r['provider']} failed {r['workload']} {r['layout']} "
            f"{r['direction']}: {r['error']}",
            file=sys.stderr,
        )
    return 1 if failed else 0
