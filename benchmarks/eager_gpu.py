"""On a CUDA device: eager per-call time of ours (Triton backend) against nn.GroupNorm.

A model that runs eagerly (no CUDA graph, no torch.compile) pays every GroupNorm call's host
time: our Python, Triton's launcher once per kernel launch, the caching allocator. On small
tensors that, not the kernels, sets the call's time. Each sample is a batch of calls ended by
one ``torch.cuda.synchronize()``, so a call costs the larger of its host and device time; ours'
and torch's batches alternate (groupnorm.bench.time_pair). ``groupnorm bench`` times the
kernels themselves (CUDA graphs); this is the other half. ``benchmarks/host_overhead.py`` times
our Python alone on the CPU, kernels and Triton's launcher stubbed out.

    python benchmarks/eager_gpu.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from cpu_standard import add_out
from torch import nn

import groupnorm
from groupnorm import bench

SHAPES = [
    ("tiny", (2, 64, 8, 8)),
    ("SD1.5 8x8", (2, 1280, 8, 8)),
    ("SD1.5 UNet 64x64", (2, 320, 64, 64)),
]
G = 32
DTYPE = torch.bfloat16
CALLS = 50
SAMPLES = 20


def _synced(f: Callable[[], object], calls: int, device: torch.device) -> Callable[[], None]:
    def batch() -> None:
        for _ in range(calls):
            f()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return batch


def _cases(
    x: torch.Tensor, ours: nn.Module, theirs: nn.Module
) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """case -> (ours, torch's) for one input."""
    xg = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)

    def fwd_bwd(m: nn.Module) -> Callable[[], object]:
        return lambda: m(xg).backward(dy)

    return {
        "forward": (lambda: ours(x), lambda: theirs(x)),
        "fwd+bwd": (fwd_bwd(ours), fwd_bwd(theirs)),
    }


def run(
    device: torch.device, on_row: Callable[[list[dict]], object] = lambda rows: None
) -> list[dict]:
    """The rows; ``on_row(rows)`` after each (a time limit keeps what was measured)."""
    rows: list[dict] = []
    torch.manual_seed(0)
    for name, shape in SHAPES:
        for layout in ("nchw", "channels_last"):
            x = torch.randn(shape, device=device, dtype=DTYPE)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            C = shape[1]
            ours = groupnorm.GroupNorm(G, C, backend="triton").to(device, DTYPE)
            theirs = nn.GroupNorm(G, C).to(device, DTYPE)
            theirs.load_state_dict(ours.state_dict())
            for case, (a, b) in _cases(x, ours, theirs).items():
                t_ours, t_torch = bench.time_pair(
                    _synced(a, CALLS, device), _synced(b, CALLS, device), SAMPLES
                )
                us_ours = statistics.median(t_ours) / CALLS * 1e6
                us_torch = statistics.median(t_torch) / CALLS * 1e6
                rows.append(
                    {
                        "workload": name,
                        "shape": list(shape),
                        "G": G,
                        "dtype": str(DTYPE),
                        "layout": layout,
                        "case": case,
                        "ours_us": us_ours,
                        "nn_groupnorm_us": us_torch,
                        "ratio": us_ours / us_torch,
                        "calls_per_sample": CALLS,
                        "samples": SAMPLES,
                    }
                )
                print(
                    f"{name:<18} {layout:<14} {case:<8} {us_ours:9.1f} {us_torch:9.1f} "
                    f"{us_ours / us_torch:7.2f}",
                    flush=True,
                )
                on_row(rows)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_out(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("eager_gpu: no CUDA device here; nothing to time")
        return 2
    device = torch.device("cuda")
    print(f"{'workload':<18} {'layout':<14} {'case':<8} {'ours us':>9} {'nn us':>9} {'ratio':>7}")
    meta = bench.environment("eager_gpu", torch.cuda.get_device_name())
    path = bench.save_results(args.out, meta, [])
    run(device, lambda rows: bench.save_results(args.out, meta, rows, path))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
