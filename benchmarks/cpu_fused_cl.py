"""CPU: channels-last samples done whole by one thread against the two-stage path.

The fused kernel normalizes a channels-last sample of at most ``fused_cl_bytes`` bytes whole on
one thread (statistics, then output while the sample is in L2), larger ones in two stages
(statistics of every block, then output). This times the kernel's call on samples of 512 KB
(the floor: both settings take the whole-sample path, a control) and 640 KB with the limit at
512 KB and at 1 MB, the two settings alternated ROUNDS times in one process (the minimum of
each), outputs checked equal.

    python benchmarks/cpu_fused_cl.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import timeit

import torch
from cpu_standard import kernel_limit, save, small_input_args

from groupnorm.backends import cpu_kernel
from groupnorm.functional import resolve_plan

CASES: list[tuple[tuple[int, ...], torch.dtype]] = [
    ((2, 1280, 16, 16), torch.float16),
    ((2, 1280, 16, 16), torch.bfloat16),
    ((2, 640, 16, 16), torch.float32),
    ((4, 320, 32, 32), torch.bfloat16),
    ((2, 512, 16, 16), torch.float32),  # 512 KB: the control
]
LIMITS = (512 << 10, 1 << 20)
ROUNDS = 6


def run() -> list[dict]:
    rows = []
    with kernel_limit("fused_cl_bytes", LIMITS[0]) as lib:
        for shape, dtype in CASES:
            x = torch.randn(shape).to(dtype).to(memory_format=torch.channels_last)
            C = shape[1]
            w, b = torch.randn(C).to(dtype), torch.randn(C).to(dtype)
            plan = resolve_plan(C, 32)

            def call(x=x, plan=plan, w=w, b=b) -> torch.Tensor | None:
                return cpu_kernel.forward_plain(x, x.shape, plan, w, b, 1e-5, False)

            times: dict[int, list[float]] = {limit: [] for limit in LIMITS}
            outputs = []
            for _ in range(ROUNDS):
                for limit in LIMITS:
                    lib.fused_cl_bytes(limit)
                    outputs.append(call())
                    times[limit].append(min(timeit.repeat(call, number=20, repeat=5)) / 20)
            assert all(torch.equal(y, outputs[0]) for y in outputs)
            kb = x[0].numel() * x.element_size() / 1024
            two_stage, whole = (min(times[limit]) * 1e6 for limit in LIMITS)
            rows.append(
                {
                    "shape": list(shape),
                    "dtype": str(dtype),
                    "sample_kb": kb,
                    "limit_512kb_us": two_stage,
                    "limit_1mb_us": whole,
                    "ratio": whole / two_stage,
                }
            )
            print(
                f"{str(shape):18s} {str(dtype)[6:]:9s} {kb:5.0f} KB  limit 512 KB "
                f"{two_stage:7.1f} us  1 MB {whole:7.1f} us  {whole / two_stage:.2f}x",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    args = small_input_args(__doc__ or "")
    save(args.out, "cpu_fused_cl", run())
