"""Compile every Triton kernel for an H100 (sm_90) without a GPU (python -m tests._triton_compile).

The interpreter (TRITON_INTERPRET=1) accepts code the compiler rejects (Python ints where the
compiler wants tensors, mixed loop-carried types); this runs the real compiler down to a cubin
(Triton ships ptxas), so CI without a GPU still catches it. Exit 0 when every kernel compiles.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import groupnorm.triton.group_norm as kernels

SCALARS = {"C", "G", "L", "N", "K", "CHUNK_L", "KP"}
ALL_ON = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True)


def compile_kernel(fn: triton.JITFunction, constexprs: dict, x_dtype: str = "bf16") -> None:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("X", "Y", "DY", "DX"):
            signature[name] = "*" + x_dtype
        elif name == "OFFS":
            signature[name] = "*i32"
        elif name == "eps":
            signature[name] = "fp32"
        elif name in SCALARS or not name.isupper():
            signature[name] = "i32"
        else:
            signature[name] = "*fp32"
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
    )
    assert compiled.asm["cubin"], f"{fn.__name__}: no cubin"


def main() -> int:
    tile = dict(BLOCK_C=8, BLOCK_L=512)
    for act, idx64 in ((2, True), (1, False), (3, False)):
        flags = dict(ALL_ON, ACT=act, IDX64=idx64, **tile)
        compile_kernel(kernels._gn_fwd_fused_kernel, flags)
        compile_kernel(kernels._gn_fwd_normalize_kernel, dict(flags, BLOCK_KP=16))
        compile_kernel(kernels._gn_bwd_partial_kernel, flags)
        for fused in (True, False):
            compile_kernel(
                kernels._gn_bwd_dx_kernel, dict(flags, STATS_GIVEN=not fused, FUSED=fused)
            )
    compile_kernel(kernels._gn_fwd_partial_kernel, dict(IDX64=True, **tile), "fp16")
    compile_kernel(
        kernels._gn_fwd_fused_kernel,
        {**{k: False for k in ALL_ON}, "ACT": 0, "IDX64": False, **tile},
        "fp32",
    )
    compile_kernel(kernels._gn_bwd_param_kernel, dict(ALL_ON, BLOCK=1024))
    print("every kernel compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
