"""CPU: a training step's GroupNorm, forward and backward, groupnorm.GroupNorm vs nn.GroupNorm.

Each sample is a batch of steps (zero the gradients, forward, backward with a fixed dy); ours
and torch's batches alternate (groupnorm.bench.time_pair), the table gives medians and their
ratio. Float32, NCHW and channels-last, even G = 32 and an uneven plan (G = 24 on C that 24
does not divide; its baseline is nn.GroupNorm with G = 32 on the same tensor), and even G with
SiLU and GELU fused (baseline: nn.GroupNorm then nn.SiLU / nn.GELU). Ours runs the fused CPU
kernel's forward and backward (float32 always records it: torch's float32 backward misses the
float32 bound on dweight and dbias); the activation's derivative is taken in float64 by the
kernel's backward, at u recomputed from x. Gradients are checked against float64 first.

    python benchmarks/cpu_train.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from cpu_standard import save, small_input_args
from torch import nn

import groupnorm
from groupnorm import bench

SHAPES: list[tuple[int, ...]] = [(2, 320, 64, 64), (8, 64, 32, 32), (2, 1280, 8, 8)]
STEPS = 3  # per sample
SAMPLES = 15


def _step(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        m.zero_grad(set_to_none=True)
        m(x).backward(dy)

    return step


def _grads(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    _step(m, x, dy)()
    assert x.grad is not None
    return [x.grad.clone(), *(p.grad.clone() for p in m.parameters() if p.grad is not None)]


ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "gelu": nn.GELU}


def _measure(
    shape: tuple[int, ...], layout: str, uneven: bool, activation: str | None = None
) -> dict:
    C = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape)
    G = 24 if uneven else 32
    ours = groupnorm.GroupNorm(G, C, uneven=uneven, activation=activation)
    if uneven:
        sizes = list(ours.plan.sizes)
        exact = groupnorm.GroupNorm(G, C, uneven=True).double()
        theirs: nn.Module = nn.GroupNorm(32, C)  # the floor: torch's kernel on an even G
    else:
        sizes = [C // G] * G
        exact = nn.GroupNorm(G, C).double()
        theirs = nn.GroupNorm(G, C)
    exact.load_state_dict(ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    if activation is not None:
        exact = nn.Sequential(exact, ACTIVATIONS[activation]())
        theirs = nn.Sequential(theirs, ACTIVATIONS[activation]())
    x64 = x.detach().double().requires_grad_()
    for got, want in zip(_grads(ours, x, dy), _grads(exact, x64, dy.double()), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    t_ours, t_theirs = bench.time_pair(
        bench.batched(_step(ours, x, dy), STEPS),
        bench.batched(_step(theirs, x, dy), STEPS),
        SAMPLES,
    )
    ms_ours = statistics.median(t_ours) / STEPS * 1e3
    ms_theirs = statistics.median(t_theirs) / STEPS * 1e3
    plan = f"{len(sizes)} groups, sizes {sorted(set(sizes))}"
    if activation is not None:
        plan += f", {activation}"
    print(
        f"{str(shape):<18} {layout:<14} {plan:<32} {ms_ours:9.3f} {ms_theirs:9.3f} "
        f"{ms_ours / ms_theirs:6.2f}",
        flush=True,
    )
    return {
        "shape": list(shape),
        "layout": layout,
        "dtype": "torch.float32",
        "plan": plan,
        "activation": activation,
        "baseline": "nn.GroupNorm(32, C)" + ("" if activation is None else f" + {activation}"),
        "ours_ms": ms_ours,
        "baseline_ms": ms_theirs,
        "ratio": ms_ours / ms_theirs,
        "steps_per_sample": STEPS,
        "samples": SAMPLES,
    }


def main() -> None:
    args = small_input_args(__doc__)
    print(f"{'shape':<18} {'layout':<14} {'plan':<32} {'ours ms':>9} {'base ms':>9} {'ratio':>6}")
    torch.manual_seed(0)
    rows = [
        _measure(shape, layout, uneven)
        for uneven in (False, True)
        for shape in SHAPES
        for layout in ("nchw", "channels_last")
    ]
    rows += [
        _measure(shape, layout, False, activation)
        for activation in ACTIVATIONS
        for shape in SHAPES
        for layout in ("nchw", "channels_last")
    ]
    save(args.out, "cpu_train", rows)


if __name__ == "__main__":
    main()
