"""ONNX: what one op costs ``torch.onnx.export``, to choose the ops of an export form.

Each form below is repeated REPEATS times in a model on a (8, 64, 16, 16) float32 input that
requires grad (as a layer's activation does); the table gives the export time over the empty
model's, per repeat (the smaller of two exports), and the ONNX nodes per repeat that remain
after the exporter's optimizer. The forms are the pieces of ``shifted._exported``'s uneven
form and their alternatives; ``nn.GroupNorm``'s whole op is there for scale.

    python benchmarks/onnx_op_cost.py [--out benchmarks/results]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu_standard import save, small_input_args
from torch import nn

REPEATS = 60
N, C, H, W = 8, 64, 16, 16
SIZE = 4  # channels per group of the gathers below

_first = torch.arange(C) // SIZE * SIZE
_corner = _first * (H * W)
_w, _b = torch.randn(C), torch.randn(C)


def _corner_pivot(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(N, C * H * W)
    return x - flat.index_select(1, _corner).reshape(N, C, 1, 1)


def _mean_pivot(x: torch.Tensor) -> torch.Tensor:
    return x - x.detach().mean((2, 3), keepdim=True).index_select(1, _first)


def _row_pivot(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(N, C // SIZE, SIZE * H * W)
    return (rows - rows[:, :, :1].detach()).reshape(N, C, H, W)


def _affine(x: torch.Tensor) -> torch.Tensor:
    zeros, ones = torch.zeros(C), torch.ones(C)
    return F.batch_norm(x, zeros, ones, _w, _b, False, 0.0, 0.0)


FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "nothing": lambda x: x,
    "subtraction": lambda x: x - x,
    "detach + subtraction": lambda x: x - x.detach(),
    "two Reshapes": lambda x: x.reshape(N, C // SIZE, -1).reshape(N, C, H, W),
    "two Slices + Concat": lambda x: torch.cat([x[:, :1], x[:, 1:]], 1),
    "Split + Concat": lambda x: torch.cat(x.split([C // 2, C // 2], 1), 1),
    "pivot: corner Gather": _corner_pivot,
    "pivot: channel mean": _mean_pivot,
    "pivot: row Slice": _row_pivot,
    "instance_norm": lambda x: F.instance_norm(x),
    "instance_norm of rows": lambda x: F.instance_norm(x.reshape(N, C // SIZE, -1)).reshape(
        N, C, H, W
    ),
    "affine: batch_norm": _affine,
    "affine: multiply-add": lambda x: x * _w.reshape(C, 1, 1) + _b.reshape(C, 1, 1),
    "nn.GroupNorm's group_norm": lambda x: torch.group_norm(x, C // SIZE, _w, _b),
}


class _Repeated(nn.Module):
    def __init__(self, form: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(REPEATS):
            x = self.form(x)
        return x


def _export(form: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[float, int]:
    """(the smaller of two export times in seconds, ONNX nodes) of the repeated form."""
    seconds, nodes = [], 0
    for _ in range(2):
        start = time.perf_counter()
        program = torch.onnx.export(_Repeated(form), (x,), dynamo=True, verbose=False)
        seconds.append(time.perf_counter() - start)
        assert program is not None
        nodes = len(program.model_proto.graph.node)
    return min(seconds), nodes


def run() -> list[dict]:
    x = torch.randn(N, C, H, W, requires_grad=True)
    _export(FORMS["nothing"], x)  # warm the exporter
    base, _ = _export(FORMS["nothing"], x)
    rows = []
    print(f"{'form':<28} {'ms per op':>9} {'nodes per op':>12}")
    for name, form in FORMS.items():
        seconds, nodes = _export(form, x)
        per_ms = (seconds - base) / REPEATS * 1e3
        rows.append({"form": name, "ms_per_repeat": per_ms, "nodes_per_repeat": nodes / REPEATS})
        print(f"{name:<28} {per_ms:9.2f} {nodes / REPEATS:12.2f}", flush=True)
    return rows


if __name__ == "__main__":
    args = small_input_args(__doc__ or "")
    save(args.out, "onnx_op_cost", run())
