"""CPU: masked GroupNorm against the unmasked call.

What a mask costs: ``group_norm(x, G, w, b, mask=m)`` with a bool mask of valid positions
((N, 1, *S), about 80 % valid) and with float weights of the same shape, each timed interleaved
with ``F.group_norm(x, G, w, b)`` on the same tensor (groupnorm.bench.time_pair), the ratio of
medians. Forward without autograd, then forward and backward (the gradients of x, weight and
bias for one dy), each against ``F.group_norm``'s. float32, NCHW. Masked outputs are checked
against the unmasked call where every position is valid first.

    python benchmarks/cpu_masked.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu_standard import save, small_input_args
from cpu_stats import timed

import groupnorm

SHAPES: list[tuple[str, tuple[int, ...], int]] = [
    ("CIFAR-scale", (8, 64, 32, 32), 32),
    ("SD1.5 16x16", (2, 1280, 16, 16), 32),
    ("1-D sequence", (8, 512, 1024), 32),
]
COLUMNS = ("bool", "float", "train bool", "train float")


def _masks(x: torch.Tensor) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    positions = (x.shape[0], 1, *x.shape[2:])
    valid = torch.rand(positions, generator=gen) < 0.8
    return {"bool": valid, "float": valid * torch.rand(positions, generator=gen)}


def _calls(
    x: torch.Tensor, G: int, w: torch.Tensor, b: torch.Tensor
) -> dict[str, Callable[[], object]]:
    everywhere = torch.ones((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool)
    torch.testing.assert_close(
        groupnorm.group_norm(x, G, w, b, mask=everywhere), F.group_norm(x, G, w, b)
    )
    calls: dict[str, Callable[[], object]] = {"torch": lambda: F.group_norm(x, G, w, b)}
    for kind, mask in _masks(x).items():
        calls[kind] = lambda m=mask: groupnorm.group_norm(x, G, w, b, mask=m)
    return calls


def _train_calls(
    x: torch.Tensor, G: int, w: torch.Tensor, b: torch.Tensor
) -> dict[str, Callable[[], object]]:
    xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
    inputs = (xr, wr, br)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    calls: dict[str, Callable[[], object]] = {
        "torch": lambda: torch.autograd.grad(F.group_norm(xr, G, wr, br), inputs, dy)
    }
    for kind, mask in _masks(x).items():
        calls[f"train {kind}"] = lambda m=mask: torch.autograd.grad(
            groupnorm.group_norm(xr, G, wr, br, mask=m), inputs, dy
        )
    return calls


def run() -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for name, shape, G in SHAPES:
        x = torch.randn(shape)
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        with torch.no_grad():
            ratios, rows_fwd = timed(_calls(x, G, w, b), name, shape, G, "nchw")
        trained, rows_train = timed(_train_calls(x, G, w, b), name, shape, G, "nchw")
        rows += rows_fwd + rows_train
        ratios.update(trained)
        print(f"{name:<16} " + " ".join(f"{ratios[c]:12.2f}" for c in COLUMNS), flush=True)
    return rows


def main() -> None:
    args = small_input_args(__doc__)
    print(
        f"{'workload':<16} "
        + " ".join(f"{c:>12}" for c in COLUMNS)
        + "   (time / F.group_norm's; train: forward + backward)"
    )
    save(args.out, "cpu_masked", run())


if __name__ == "__main__":
    main()
