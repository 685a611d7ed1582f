"""Graph size: how many ATen ops a GroupNorm traces to, ours vs ``nn.GroupNorm``.

Traced with ``make_fx`` (the graph torch.compile and torch.export start from, before fusion),
forward only, for one layer and for the study's ResNet with every norm a GroupNorm; uneven
groups where ``nn.GroupNorm`` has no equivalent are counted for ours alone.

    python benchmarks/op_count.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from cpu_standard import save
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import groupnorm
from groupnorm.study.models import ResNet


def ops(model: nn.Module, x: torch.Tensor) -> int:
    gm = make_fx(model)(x)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def _resnet(norm: Callable[[int], nn.Module]) -> nn.Module:
    """The study's CIFAR ResNet (widths 16, 32, 64; three blocks per stage: ResNet-20)."""
    return ResNet(norm, blocks=3).eval()


def run() -> list[dict]:
    rows = []
    x_layer = torch.randn(2, 64, 8, 8)
    x_net = torch.randn(2, 3, 32, 32)
    cases = [
        ("layer G=32", nn.GroupNorm(32, 64), groupnorm.GroupNorm(32, 64), x_layer),
        ("layer uneven G=24", None, groupnorm.GroupNorm(24, 64, uneven=True), x_layer),
        (
            "ResNet-20 G=8",
            _resnet(lambda c: nn.GroupNorm(8, c)),
            _resnet(lambda c: groupnorm.GroupNorm(8, c)),
            x_net,
        ),
        (
            "ResNet-20 uneven G=12",
            None,
            _resnet(lambda c: groupnorm.GroupNorm(12, c, uneven=True)),
            x_net,
        ),
    ]
    for name, theirs, ours, x in cases:
        with torch.no_grad():
            n_ours = ops(ours, x)
            n_torch = None if theirs is None else ops(theirs, x)
        rows.append({"case": name, "ours_ops": n_ours, "torch_ops": n_torch})
        print(f"{name:<24} {n_ours:>6} {'-' if n_torch is None else n_torch:>6}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    print(f"{'case':<24} {'ours':>6} {'torch':>6}")
    save(args.out, "op_count", run())


if __name__ == "__main__":
    main()
