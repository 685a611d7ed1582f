"""Graph size under torch's graph capture, ours vs ``nn.GroupNorm``, and a compiled training step.

Counted two ways, forward only: the ATen ops ``make_fx`` records (what torch.export and
AOTAutograd start from, before fusion), and the ops of the FX graph torch.compile's Dynamo hands
its backend (modules inlined; the issue's "resnet18 traces 69 ops" level), the latter in eval
mode without grad and in train mode with grad, where our pivot adds a detach. Models: one layer
and the study's ResNet-20 with every norm a GroupNorm; uneven groups, which ``nn.GroupNorm``
cannot do, are counted for ours alone.

``--step`` also times one SGD step of ResNet-20 (batch 8, 32 px), eager and compiled (inductor),
ours and torch's, interleaved; compile time is left out (warm-up steps).

    python benchmarks/op_count.py [--step] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from cpu_standard import add_out, save
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import groupnorm
from groupnorm import bench
from groupnorm.study.models import ResNet


def aten_ops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        gm = make_fx(model)(x)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def graph_ops(model: nn.Module, x: torch.Tensor, train: bool) -> int:
    """Ops in the one FX graph Dynamo captures (fullgraph: a graph break raises)."""
    counts: list[int] = []

    def backend(gm: torch.fx.GraphModule, example: object) -> Callable[..., object]:
        kinds = ("call_function", "call_method", "call_module")
        counts.append(sum(1 for n in gm.graph.nodes if n.op in kinds))
        return gm.forward

    torch._dynamo.reset()
    model.train(train)
    with torch.set_grad_enabled(train):
        torch.compile(model, backend=backend, fullgraph=True)(x)
    model.eval()
    return counts[0]


def resnet20(norm: Callable[[int], nn.Module]) -> nn.Module:
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
            resnet20(lambda c: nn.GroupNorm(8, c)),
            resnet20(lambda c: groupnorm.GroupNorm(8, c)),
            x_net,
        ),
        (
            "ResNet-20 uneven G=12",
            None,
            resnet20(lambda c: groupnorm.GroupNorm(12, c, uneven=True)),
            x_net,
        ),
    ]
    for name, theirs, ours, x in cases:
        row: dict[str, object] = {"case": name}
        for who, model in (("ours", ours), ("torch", theirs)):
            if model is None:
                continue
            row[f"aten_{who}"] = aten_ops(model, x)
            row[f"graph_eval_{who}"] = graph_ops(model, x, train=False)
            row[f"graph_train_{who}"] = graph_ops(model, x, train=True)
        rows.append(row)
        cells = [
            f"{row.get(f'{k}_ours')}/{row.get(f'{k}_torch', '-')}"
            for k in ("aten", "graph_eval", "graph_train")
        ]
        print(f"{name:<24} " + " ".join(f"{c:>12}" for c in cells), flush=True)
    return rows


def _step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def step_times(reps: int = 15) -> list[dict]:
    """Median seconds per SGD step of ResNet-20 (G=8), eager vs compiled, ours vs torch's."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    rows = []
    for who, norm in (
        ("torch", lambda c: nn.GroupNorm(8, c)),
        ("ours", lambda c: groupnorm.GroupNorm(8, c)),
    ):
        torch.manual_seed(0)
        model = resnet20(norm).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        compiled = torch.compile(model)
        torch._dynamo.reset()
        t_eager, t_compiled = bench.time_pair(
            partial(_step, model, opt, x, y), partial(_step, compiled, opt, x, y), reps
        )
        row = {
            "norm": who,
            "eager_ms": 1e3 * statistics.median(t_eager),
            "compiled_ms": 1e3 * statistics.median(t_compiled),
        }
        rows.append(row)
        print(
            f"train step {who:<6} eager {row['eager_ms']:7.2f} ms  compiled "
            f"{row['compiled_ms']:7.2f} ms",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step", action="store_true", help="also time a compiled train step")
    add_out(parser)
    args = parser.parse_args()
    print(f"{'ops (ours/torch)':<24} {'aten':>12} {'graph eval':>12} {'graph train':>12}")
    rows = run()
    if args.step:
        rows += step_times()
    save(args.out, "op_count", rows)


if __name__ == "__main__":
    main()
