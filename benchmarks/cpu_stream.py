"""CPU: y stored around the caches (non-temporal stores) against through them, by output size.

The fused kernel stores outputs of at least ``stream_min`` bytes around the caches: it saves
the read that a cached store of a line not yet in cache makes, and costs the next layer, which
then finds y in memory instead of cache. This times a float32 NCHW group norm (2, C, 64, 64),
C = 32 per MiB of output, alone and followed by the residual add that reads y next (as a block
does), with ``stream_min`` at 0 (every output streamed) and at 2^62 (none), the two settings
alternated PAIRS times in one process; the table gives the median of the pairs' time ratios
(streamed / cached) with its quartiles. Outputs are checked equal.

    python benchmarks/cpu_stream.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from cpu_standard import kernel_limit, save, small_input_args

import groupnorm

MIB = (4, 8, 16, 24, 32, 64)
PAIRS = 15
NEVER = 1 << 62


def _consumers(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    residual = torch.randn_like(x)
    return {
        "alone": lambda: groupnorm.group_norm(x, 32, w, b),
        "then + residual": lambda: groupnorm.group_norm(x, 32, w, b) + residual,
    }


def run() -> list[dict]:
    rows = []
    print(f"{'MiB':>4} {'case':16s} {'cached ms':>9} {'streamed/cached':>15} {'quartiles':>13}")
    with kernel_limit("stream_min", NEVER) as lib:
        for mib in MIB:
            C = 32 * mib
            x = torch.randn(2, C, 64, 64)
            w, b = torch.randn(C), torch.randn(C)
            for case, fn in _consumers(x, w, b).items():
                with torch.no_grad():
                    seconds: dict[int, list[float]] = {0: [], NEVER: []}
                    outputs = {}
                    for i in range(PAIRS + 2):  # the first two pairs warm up
                        for limit in (0, NEVER) if i % 2 else (NEVER, 0):
                            lib.stream_min(limit)
                            start = time.perf_counter()
                            outputs[limit] = fn()
                            if i >= 2:
                                seconds[limit].append(time.perf_counter() - start)
                    assert torch.equal(outputs[0], outputs[NEVER])
                ratios = [s / c for s, c in zip(seconds[0], seconds[NEVER], strict=True)]
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                cached_ms = statistics.median(seconds[NEVER]) * 1e3
                ratio = statistics.median(ratios)
                rows.append(
                    {
                        "shape": list(x.shape),
                        "output_mib": mib,
                        "case": case,
                        "cached_ms": cached_ms,
                        "streamed_ms": statistics.median(seconds[0]) * 1e3,
                        "ratio": ratio,
                        "ratio_q1": q1,
                        "ratio_q3": q3,
                        "pairs": PAIRS,
                    }
                )
                print(
                    f"{mib:4d} {case:16s} {cached_ms:9.2f} {ratio:15.3f} {q1:6.3f}-{q3:.3f}",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    args = small_input_args(__doc__ or "")
    save(args.out, "cpu_stream", run())
