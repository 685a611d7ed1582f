"""CPU: the per-call cost of groupnorm over torch's own call, functional and module.

On small tensors a call is mostly Python: validation and dispatch (and, where the fused CPU
kernel is not built, the exactness check on torch's kernel's float32 mean). This times
``groupnorm.group_norm`` against ``F.group_norm`` and ``groupnorm.GroupNorm`` against
``nn.GroupNorm`` on the standard case (G divides C, affine, no epilogue), float32 and
bfloat16, forward only. Each
sample is the mean of a batch of calls; ours and torch's batches alternate
(groupnorm.bench.time_pair); the table gives medians and the difference in microseconds.

    python benchmarks/cpu_overhead.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu_standard import per_call_us, save, small_input_args
from torch import nn

import groupnorm

SHAPES: list[tuple[int, ...]] = [(2, 64, 8, 8), (2, 1280, 8, 8), (8, 64, 32, 32)]
G = 32
CALLS = 1000  # per sample: one call is microseconds, below perf_counter's useful resolution
SAMPLES = 30


def _pairs(
    x: torch.Tensor, ours_m: nn.Module, torch_m: nn.Module
) -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """API -> (ours, torch's) calls on x with the same weight and bias."""
    w, b = torch_m.weight, torch_m.bias
    return {
        "functional": (lambda: groupnorm.group_norm(x, G, w, b), lambda: F.group_norm(x, G, w, b)),
        "module": (lambda: ours_m(x), lambda: torch_m(x)),
    }


def run() -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for dtype, shape in [(d, s) for d in (torch.float32, torch.bfloat16) for s in SHAPES]:
        C = shape[1]
        x = torch.randn(shape).to(dtype)
        ours_m = groupnorm.GroupNorm(G, C).to(dtype)
        torch_m = nn.GroupNorm(G, C).to(dtype)
        torch_m.load_state_dict(ours_m.state_dict())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        with torch.no_grad():
            for api, (ours, theirs) in _pairs(x, ours_m, torch_m).items():
                w, b = torch_m.weight.double(), torch_m.bias.double()
                exact = F.group_norm(x.double(), G, w, b)
                for out in (ours(), theirs()):
                    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
                us_ours, us_torch = per_call_us(ours, theirs, CALLS, SAMPLES)
                rows.append(
                    {
                        "shape": list(shape),
                        "G": G,
                        "dtype": str(dtype),
                        "api": api,
                        "ours_us": us_ours,
                        "torch_us": us_torch,
                        "extra_us": us_ours - us_torch,
                        "calls_per_sample": CALLS,
                        "samples": SAMPLES,
                    }
                )
                print(
                    f"{str(shape):<18} {str(dtype)[6:]:<9} {api:<11} {us_ours:9.2f} "
                    f"{us_torch:9.2f} {us_ours - us_torch:+9.2f}",
                    flush=True,
                )
    return rows


def main() -> None:
    args = small_input_args(__doc__)
    print(f"{'shape':<18} {'dtype':<9} {'api':<11} {'ours us':>9} {'torch us':>9} {'extra us':>9}")
    save(args.out, "cpu_overhead", run())


if __name__ == "__main__":
    main()
