"""CPU: statistics in and out vs the standard path.

Four calls on the same tensor, each timed interleaved with ``F.group_norm`` (groupnorm.bench
.time_pair), the ratio of medians against it:

- ``standard``: ``group_norm(x, G, w, b)``;
- ``stats out``: ``group_norm(x, G, w, b, return_stats=True)`` (y and the statistics);
- ``stats in``: ``group_norm(x, G, w, b, stats=s)`` with ``s`` computed beforehand;
- ``stats only``: ``group_stats(x, G)``.

Outputs are checked against the standard path first. float32. Then the same under autograd,
forward and backward, each against ``F.group_norm``'s forward and backward:

- ``train standard``: the gradients of x, weight and bias for one dy;
- ``train stats out``: the same through y, the returned shifted mean and m2 (one dy each);
- ``train stats in``: through y, with statistics given (computed beforehand, detached).

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
COLUMNS = (
    "standard",
    "stats out",
    "stats in",
    "stats only",
    "train standard",
    "train stats out",
    "train stats in",
)
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


def _train_calls(
    x: torch.Tensor, G: int, w: torch.Tensor, b: torch.Tensor
) -> dict[str, Callable[[], object]]:
    xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
    inputs = (xr, wr, br)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=gen)
    d_mean, d_m2 = (torch.randn(x.shape[0], G, generator=gen) for _ in range(2))
    given = groupnorm.group_stats(x.detach(), G)

    def stats_out() -> object:
        y, stats = groupnorm.group_norm(xr, G, wr, br, return_stats=True)
        return torch.autograd.grad((y, stats.shifted_mean, stats.m2), inputs, (dy, d_mean, d_m2))

    return {
        "torch": lambda: torch.autograd.grad(F.group_norm(xr, G, wr, br), inputs, dy),
        "train standard": lambda: torch.autograd.grad(
            groupnorm.group_norm(xr, G, wr, br), inputs, dy
        ),
        "train stats out": stats_out,
        "train stats in": lambda: torch.autograd.grad(
            groupnorm.group_norm(xr, G, wr, br, stats=given), inputs, dy
        ),
    }


def timed(
    calls: dict[str, Callable[[], object]], name: str, shape: tuple[int, ...], G: int, layout: str
) -> tuple[dict[str, float], list[dict]]:
    """Each call against ``calls["torch"]``, interleaved: (ratios, rows)."""
    theirs = calls.pop("torch")
    ratios, rows = {}, []
    for call, fn in calls.items():
        t_ours, t_torch = bench.time_pair(fn, theirs, REPS)
        ratios[call] = statistics.median(t_ours) / statistics.median(t_torch)
        rows.append(
            {
                "workload": name,
                "shape": list(shape),
                "G": G,
                "layout": layout,
                "call": call,
                "ours_ms": statistics.median(t_ours) * 1e3,
                "torch_ms": statistics.median(t_torch) * 1e3,
                "ratio": ratios[call],
                "reps": REPS,
            }
        )
    return ratios, rows


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
                ratios, rows_fwd = timed(_calls(x, G, w, b), name, shape, G, layout)
            trained, rows_train = timed(_train_calls(x, G, w, b), name, shape, G, layout)
            rows += rows_fwd + rows_train
            ratios.update(trained)
            print(f"{name:<16} {layout:<14} " + " ".join(f"{ratios[c]:10.2f}" for c in COLUMNS))
    return rows


def main() -> None:
    args = small_input_args(__doc__)
    print(
        f"{'workload':<16} {'layout':<14} "
        + " ".join(f"{c.replace('train ', 'tr. '):>10}" for c in COLUMNS)
        + "   (time / F.group_norm's, forward; tr.: forward + backward)"
    )
    save(args.out, "cpu_stats", run())


if __name__ == "__main__":
    main()
