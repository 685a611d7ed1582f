"""The Triton backend's per-call host cost, kernels stubbed out, against nn.GroupNorm's whole call.

On a GPU, a call on a small tensor costs what its Python costs: validation, dispatch, launch
decisions, allocations, autograd bookkeeping, then one launch per kernel. This measures that
part on a CPU machine: Triton's interpreter is switched on so that the backend accepts CPU
tensors, and every kernel launch is replaced by a no-op that only counts it (Triton's own
launcher, from its ``kernel[grid]`` proxy on, is therefore not in these numbers: on a GPU it
comes on top). The baseline is ``nn.GroupNorm``'s whole call on the same tiny CPU tensor,
kernel included. Each sample is the mean of a batch of calls; ours and torch's batches
alternate (groupnorm.bench.time_pair).

    python benchmarks/host_overhead.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the backend takes CPU tensors

from collections.abc import Callable

import torch
from cpu_standard import per_call_us, save, small_input_args
from torch import nn
from triton.runtime.interpreter import InterpretedFunction

import groupnorm

SHAPE = (2, 64, 8, 8)
G = 32
CALLS = 300
SAMPLES = 20
LAUNCHES: list[str] = []


def _stub_launches() -> None:
    """``kernel[grid]`` returns a no-op that records the kernel's name: neither Triton's launcher
    (the ``[grid]`` proxy and its ``run``) nor the kernel runs; the call site's arguments are
    still built and passed."""

    def launcher(self, grid):
        name = self.fn.__name__

        def launch(*args, **kwargs):
            LAUNCHES.append(name)

        return launch

    InterpretedFunction.__getitem__ = launcher  # type: ignore[method-assign]


def _cases(
    x: torch.Tensor, ours_m: nn.Module, torch_m: nn.Module
) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """case -> (ours, torch's)."""
    w, b = ours_m.weight, ours_m.bias
    dy = torch.randn(x.shape)
    xg = x.detach().clone().requires_grad_()

    def fwd_bwd(m: nn.Module) -> Callable[[], object]:
        return lambda: m(xg).backward(dy)

    return {
        "module forward": (lambda: ours_m(x), lambda: torch_m(x)),
        "function forward": (
            lambda: groupnorm.group_norm(x, G, w, b, backend="triton"),
            lambda: torch_m(x),
        ),
        "module fwd+bwd": (fwd_bwd(ours_m), fwd_bwd(torch_m)),
    }


def run() -> list[dict]:
    _stub_launches()
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    ours_m = groupnorm.GroupNorm(G, SHAPE[1], backend="triton")
    torch_m = nn.GroupNorm(G, SHAPE[1])
    torch_m.load_state_dict(ours_m.state_dict())
    rows = []
    for case, (ours, theirs) in _cases(x, ours_m, torch_m).items():
        LAUNCHES.clear()
        ours()
        launches = list(LAUNCHES)
        us_ours, us_torch = per_call_us(ours, theirs, CALLS, SAMPLES)
        rows.append(
            {
                "shape": list(SHAPE),
                "G": G,
                "case": case,
                "ours_us_kernels_stubbed": us_ours,
                "nn_groupnorm_us": us_torch,
                "ratio": us_ours / us_torch,
                "launches": launches,
                "calls_per_sample": CALLS,
                "samples": SAMPLES,
            }
        )
        print(
            f"{case:<18} {us_ours:9.1f} {us_torch:9.1f} {us_ours / us_torch:7.2f}  "
            f"{' + '.join(launches)}",
            flush=True,
        )
    return rows


def main() -> None:
    args = small_input_args(__doc__)
    print(f"{'case':<18} {'ours us':>9} {'nn us':>9} {'ratio':>7}  launches (stubbed)")
    save(args.out, "host_overhead", run())


if __name__ == "__main__":
    main()
