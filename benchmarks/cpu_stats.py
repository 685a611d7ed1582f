"""CPU: statistics in and out vs the standard path.

Four calls on the same tensor, each timed interleaved with ``F.group_norm`` (groupnorm.bench
.time_pair), the ratio of medians against it:

- ``standard``: ``group_norm(x, G, w, b)``;
- ``stats out``: ``group_norm(x, G, w, b, return_stats=True)`` (y and the statistics);
- ``stats in``: ``group_norm(x, G, w, b, stats=s)`` with ``s`` computed beforehand;
- ``stats only``: ``group_stats(x, G)``.

Outputs are checked against the standard path first. Forward only, float32, no autograd.

    python benchmarks/cpu_stats.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu_standard import save, small_input_args

import groupnorm
from groupnorm import bench

SHAPES: list[tuple[str, tuple[int, ...], int]] = [
    ("CIFAR-scale", (8, 64, 32, 32), 32),
    ("SD1.5 16x16", (2, 1280, 16, 16), 32),
    ("VAE 512px 64^2", (1, 512, 64, 64), 32),
    ("1-D sequence", (8, 512, 1024), 32),
]
REPS = 20
LAYOUTS = ("nchw", "channels_last")


def _calls(
    x: torch.Tensor, G: int, w: torch.Tensor, b: torch.Tensor
) -> dict[str, Callable[[], object]]:
    given = groupnorm.group_stats(x, G)
    y = groupnorm.group_norm(x, G, w, b)
    y_out, _ = groupnorm.group_norm(x, G, w, b, return_stats=True)
    y_in = groupnorm.group_norm(x, G, w, b, stats=given)
    for other in (y_out, y_in):
        torch.testing.assert_close(other, y, rtol=1e-5, atol=1e-5)
    return {
        "torch": lambda: F.group_norm(x, G, w, b),
        "standard": lambda: groupnorm.group_norm(x, G, w, b),
        "stats out": lambda: groupnorm.group_norm(x, G, w, b, return_stats=True),
        "stats in": lambda: groupnorm.group_norm(x, G, w, b, stats=given),
        "stats only": lambda: groupnorm.group_stats(x, G),
    }


def run() -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for name, shape, G in SHAPES:
        for layout in LAYOUTS:
            if layout == "channels_last" and len(shape) != 4:
                continue
            x = torch.randn(shape)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            C = shape[1]
            w, b = torch.randn(C), torch.randn(C)
            with torch.no_grad():
                ratios = {}
                calls = _calls(x, G, w, b)
                theirs = calls.pop("torch")
                for call, fn in calls.items():
                    t_ours, t_torch = bench.time_pair(fn, theirs, REPS)
                    ms = statistics.median(t_ours) * 1e3
                    ratios[call] = statistics.median(t_ours) / statistics.median(t_torch)
                    rows.append(
                        {
                            "workload": name,
                            "shape": list(shape),
                            "G": G,
                            "layout": layout,
                            "call": call,
                            "ours_ms": ms,
                            "torch_ms": statistics.median(t_torch) * 1e3,
                            "ratio": ratios[call],
                            "reps": REPS,
                        }
                    )
            print(
                f"{name:<16} {layout:<14} "
                + " ".join(f"{ratios[c]:10.2f}" for c in ("standard", "stats out", "stats in"))
                + f" {ratios['stats only']:10.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    args = small_input_args(__doc__)
    print(
        f"{'workload':<16} {'layout':<14} {'standard':>10} {'stats out':>10} {'stats in':>10} "
        f"{'stats only':>10}   (time / F.group_norm's)"
    )
    save(args.out, "cpu_stats", run())


if __name__ == "__main__":
    main()
