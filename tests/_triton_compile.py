"""Compile the Triton kernels for an H100/H200 (sm_90) without a GPU, as a real launch would.

The launchers run on CPU tensors of the wanted shape and layout with every ``kernel[grid](...)``
recorded instead of run (:func:`capture`). Each recorded launch is then specialized by the very
binder Triton uses at launch time (pointers 16-byte aligned, ints divisible by 16, ints equal to
1 become constants: what makes 128-bit accesses possible) for an sm_90 target, and compiled down
to PTX and a cubin with Triton's bundled ptxas (:func:`compile_launch`). The cubin's resource
usage (``cuobjdump -res-usage``) gives registers and local memory (spills); the PTX gives the
width of every global load and store.

``python -m tests._triton_compile`` compiles the kernels of a few representative launches and
prints one line per kernel; exit 0 when every kernel compiles. ``--limits`` and ``--loops``
audit the on-chip kernels at their limits and the loop kernels on the spec's shapes (the tests
run both); ``--sweep`` audits the loop kernels over a wider grid of group widths, epilogues and
regimes (not run by the tests). Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import groupnorm.triton.group_norm as kernels
from groupnorm.groups import make_plan

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    name: str
    fn: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    name: str
    registers: int
    local_bytes: int  # stack + local memory: spills
    global_ops: frozenset[str]  # e.g. {"ld.global.v4.b32", "st.global.b16"}
    num_warps: int

    @property
    def vector_loads(self) -> bool:
        return any(op.startswith("ld.global.v4") for op in self.global_ops)

    @property
    def vector_stores(self) -> bool:
        return any(op.startswith("st.global.v4") for op in self.global_ops)


KERNEL_NAMES = [n for n in dir(kernels) if n.startswith("_gn_") and n.endswith("_kernel")]


class _Recorder:
    def __init__(self, name: str, fn: Any, launches: list[Launch]) -> None:
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.launches.append(Launch(self.name, self.fn, tuple(grid), args, kwargs))

        return record


def capture(run: Callable[[], Any], sm_count: int = H100_SMS) -> list[Launch]:
    """The launches ``run()`` makes through the launchers, recorded, not executed; the device
    is taken to have ``sm_count`` SMs (an H100 by default)."""
    launches: list[Launch] = []
    saved = {n: getattr(kernels, n) for n in KERNEL_NAMES}
    saved_sm = kernels._sm_count
    try:
        for n, fn in saved.items():
            setattr(kernels, n, _Recorder(n, fn, launches))
        kernels._sm_count = lambda device: sm_count  # type: ignore[assignment]
        run()
    finally:
        for n, fn in saved.items():
            setattr(kernels, n, fn)
        kernels._sm_count = saved_sm
    return launches


def launches_of(
    shape: tuple[int, ...],
    G: int,
    *,
    channels_last: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    backward: bool = False,
    affine: bool = True,
    scale_shift: bool = False,
    activation: str | None = None,
    regime: str = "auto",
    sm_count: int = H100_SMS,
    stats_given: bool = False,
) -> list[Launch]:
    """Launches of one forward (or one backward) call on uninitialised CPU tensors; a backward
    from given statistics (``stats_given``) gets a float32 x's rstd in float64, as autograd's
    backward passes it."""
    x = torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    C = shape[1]
    sizes = make_plan(C, G, uneven=C % G != 0).sizes
    w = torch.empty(C) if affine else None
    s = torch.empty(shape[0], C, dtype=dtype) if scale_shift else None

    def run() -> None:
        if not backward:
            kernels._forward(x, w, w, s, s, sizes, 1e-5, activation, None, regime)
            return
        stats = torch.zeros(shape[0], G)
        wide = stats_given and dtype == torch.float32
        rstd = stats.double() if wide else stats
        kernels._backward(
            torch.empty_like(x), x, w, w, s, s, sizes, stats, stats, rstd,
            activation, stats_given, regime, False, 1e-5,
        )  # fmt: skip

    return capture(run, sm_count)


def _specialize(launch: Launch) -> tuple[dict, dict, dict, Any]:
    backend = make_backend(TARGET)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, launch.kwargs, bound, spec, options
    )
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch) -> Compiled:
    """Compile one recorded launch for sm_90 with the launch's own specialization."""
    signature, constexprs, attrs, options = _specialize(launch)
    compiled = triton.compile(
        ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=TARGET,
        options=options.__dict__,
    )
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert found, f"{launch.name}: no resource usage in\n{usage}"
    regs, stack, local = (int(v) for v in found.groups())
    ops = frozenset(re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx))
    return Compiled(launch.name, regs, stack + local, ops, options.num_warps)


CASES = {
    "SD 8x8 NHWC fwd": dict(shape=(2, 1280, 8, 8), G=32, channels_last=True),
    "SD 8x8 NCHW bwd": dict(shape=(2, 1280, 8, 8), G=32, backward=True),
    "ResNet b32 NCHW fwd": dict(shape=(32, 256, 56, 56), G=32),
    "VAE 512@512 NCHW fwd+bwd (split)": dict(shape=(1, 128, 512, 512), G=32, backward=True),
    "VAE 512@512 NCHW fwd+bwd (wave)": dict(
        shape=(1, 128, 512, 512), G=32, regime="wave", backward=True
    ),
    "SD up-concat NHWC fwd+bwd (wave)": dict(
        shape=(2, 960, 64, 64), G=32, channels_last=True, regime="wave", backward=True
    ),
    "uneven NHWC silu fwd": dict(shape=(2, 10, 4, 6), G=4, channels_last=True, activation="silu"),
    "ResNet b32 NHWC fwd+bwd": dict(
        shape=(32, 256, 56, 56), G=32, channels_last=True, backward=True
    ),
}


def limit_cases() -> dict[str, list[Launch]]:
    """The on-chip kernels at the heuristics' largest tiles (ONCHIP_MAX_SLOTS), every epilogue
    on (GELU, scale, shift, affine), in NCHW and channels-last, on 16-byte rows (8 bf16 or 4 fp32
    channels per group); the float32 backward (float64 inside) from its own statistics and from
    given ones."""
    from groupnorm.triton.heuristics import ONCHIP_MAX_SLOTS

    cases = {}
    limits = [(key, slots, False) for key, slots in ONCHIP_MAX_SLOTS.items()]
    limits += [(("bwd", 4, cl), ONCHIP_MAX_SLOTS["bwd", 4, cl], True) for cl in (False, True)]
    for (direction, size, channels_last), slots, given in limits:
        dtype = torch.bfloat16 if size == 2 else torch.float32
        cg = 16 // size
        L = slots // cg
        name = f"{direction} {dtype} {'NHWC' if channels_last else 'NCHW'} {slots} slots"
        found = launches_of(
            (2, 32 * cg, L // 64, 64),
            32,
            channels_last=channels_last,
            dtype=dtype,
            backward=direction == "bwd",
            scale_shift=True,
            activation="gelu",
            regime="onchip",
            stats_given=given,
        )
        cases[name + (", stats given" if given else "")] = [f for f in found if "onchip" in f.name]
    return cases


def _audit(tag: str, c: Compiled, stores: bool) -> list[str]:
    """Print one compiled kernel's line; its problems: spills, no 128-bit loads (or stores,
    where ``stores``)."""
    print(
        f"{tag} {c.name:26s} warps {c.num_warps:2d} regs {c.registers:3d} "
        f"local {c.local_bytes:4d} B  v4 ld/st {c.vector_loads:d}/{c.vector_stores:d}"
    )
    problems = []
    if c.local_bytes:
        problems.append(f"{tag.strip()}: {c.name} spills {c.local_bytes} B")
    if not c.vector_loads or (stores and not c.vector_stores):
        problems.append(f"{tag.strip()}: {c.name} has no 128-bit loads or stores")
    return problems


def check_limits() -> list[str]:
    """Problems of the on-chip kernels at their limits: spills, scalar global accesses."""
    problems = []
    for name, found in limit_cases().items():
        for launch in found:
            problems += _audit(f"limit {name:30s}", compile_launch(launch), stores=True)
    return problems


# name -> (shape, channels_last, directions, regimes)
LOOP_CASES: dict[str, tuple[tuple[int, ...], bool, tuple[str, ...], tuple[str, ...]]] = {
    # rows of 950 bf16 elements (1900 bytes, not 16-byte multiples): the forward reads flat,
    # the backward's sums read through aligned windows and dx is written flat
    "R50-GN C5 NCHW": ((2, 2048, 25, 38), False, ("fwd", "bwd"), ("auto", "fused", "wave")),
    # channels-last, 8 and 4 channels a group (16 and 8 bytes): runs of 4 and 8 groups (32
    # channels, heuristics.RUN_CHANNELS); the compiler knows the group's channels
    "ResNet b32 NHWC": ((32, 256, 56, 56), True, ("fwd", "bwd"), ("auto", "wave")),
    "FPN P2 NHWC": ((2, 256, 200, 304), True, ("fwd", "bwd"), ("auto", "wave")),
    "VAE 1024 NHWC": ((1, 128, 1024, 1024), True, ("fwd", "bwd"), ("auto",)),
    # 2 channels a group over 3136 positions (8 K tile slots): a bf16 backward on chip, a float32
    # one fused (its float64 tiles do not fit on chip)
    "ResNet b32 layer1 NCHW": ((32, 64, 56, 56), False, ("bwd",), ("auto",)),
    "ResNet b32 layer1 NHWC": ((32, 64, 56, 56), True, ("bwd",), ("auto",)),
    # channels-last, one channel a group: runs of 32 groups, of 8 in a float32 backward
    # (heuristics.EXACT_RUN_GROUPS)
    "InstanceNorm NHWC": ((2, 32, 128, 128), True, ("fwd", "bwd"), ("auto", "fused", "wave")),
    # channels-last, 10 and 30 channels a group (20 and 60 bytes): runs of 4 groups (80 and 240
    # bytes, heuristics.loop_run)
    "SD 2x320x64x64 NHWC": ((2, 320, 64, 64), True, ("fwd", "bwd"), ("auto", "fused", "wave")),
    "SD up-concat 2x960x64x64 NHWC": (
        (2, 960, 64, 64),
        True,
        ("fwd", "bwd"),
        ("auto", "fused", "wave"),
    ),
}


def check_loops() -> list[str]:
    """Problems of the loop regimes' kernels (fused, split, wave) where 128-bit accesses are
    possible (LOOP_CASES, bf16, G = 32; the float32 forward, whose statistics merge in float64,
    without and with GELU; and the float32 backward, which computes in float64, with each
    activation): spills, scalar loads, or scalar stores of y or dx."""
    problems = []
    variants: list[tuple[str, torch.dtype, str | None]] = [
        ("fwd", torch.bfloat16, None),
        ("bwd", torch.bfloat16, None),
        ("fwd", torch.float32, None),
        ("fwd", torch.float32, "gelu"),
    ]
    variants += [("bwd", torch.float32, act) for act in (None, "silu", "gelu", "relu")]
    for name, (shape, channels_last, directions, regimes) in LOOP_CASES.items():
        for regime, (direction, dtype, act) in itertools.product(regimes, variants):
            if direction not in directions:
                continue
            found = launches_of(
                shape,
                32,
                channels_last=channels_last,
                dtype=dtype,
                activation=act,
                regime=regime,
                backward=direction == "bwd",
            )
            problems += _audit_loop_launches(
                f"{name} {regime:5s} {str(dtype)[6:]} {act or ''}", found
            )
    return problems


def _audit_loop_launches(tag: str, found: list[Launch]) -> list[str]:
    """The problems of a call's loop-regime kernels (not the on-chip or parameter kernels);
    stores are audited except in the partial kernels, which write a few sums."""
    problems = []
    for launch in found:
        if "onchip" in launch.name or "param" in launch.name:
            continue
        problems += _audit(tag, compile_launch(launch), "partial" not in launch.name)
    return problems


def check_sweep() -> list[str]:
    """Problems of the loop regimes' kernels over a grid wider than LOOP_CASES (not run by the
    tests: about 1,250 kernels, 20-30 minutes): channels per group 1-128 on 128-bit-aligned rows,
    NCHW and channels-last, every forced regime, bf16 with SiLU, scale and shift, and float32
    backward with each activation, with and without scale and shift."""
    variants: list[tuple[torch.dtype, str, str | None, bool]] = [
        (torch.bfloat16, direction, "silu", True) for direction in ("fwd", "bwd")
    ]
    variants += [
        (torch.float32, "bwd", act, ss)
        for act in (None, "silu", "gelu", "relu")
        for ss in (False, True)
    ]
    variants.append((torch.float32, "fwd", "gelu", True))
    problems = []
    cases = itertools.product(
        (1, 2, 3, 4, 5, 6, 8, 10, 16, 30, 32, 64, 128),
        (False, True),
        ("auto", "fused", "split", "wave"),
        variants,
    )
    for cg, channels_last, regime, (dtype, direction, act, ss) in cases:
        G = 32 if cg <= 32 else 4
        L = max(64 * 64, 2 * 65536 // cg)
        found = launches_of(
            (2, cg * G, 64, L // 64),
            G,
            channels_last=channels_last,
            dtype=dtype,
            activation=act,
            regime=regime,
            backward=direction == "bwd",
            scale_shift=ss,
        )
        layout = "NHWC" if channels_last else "NCHW"
        tag = f"Cg {cg} {layout} {regime} {str(dtype)[6:]} {direction} {act} ss={ss}"
        problems += _audit_loop_launches(tag, found)
    return problems


def main() -> int:
    failed = 0
    if "--sweep" in sys.argv:
        problems = check_sweep()
        print("\n".join(problems) or "no spills, 128-bit accesses over the sweep")
        return 1 if problems else 0
    if "--limits" in sys.argv:
        problems = check_limits()
        print("\n".join(problems) or "no spills, 128-bit accesses at every on-chip limit")
        return 1 if problems else 0
    if "--loops" in sys.argv:
        problems = check_loops()
        print("\n".join(problems) or "no spills, 128-bit accesses in the loop kernels")
        return 1 if problems else 0
    for case, spec in CASES.items():
        kw: dict[str, Any] = dict(spec)
        both = kw.get("backward", False)
        kw["backward"] = False
        found = launches_of(**kw)
        if both:
            found += launches_of(**dict(kw, backward=True))
        for launch in found:
            try:
                c = compile_launch(launch)
            except Exception as e:  # report every kernel, then fail
                failed += 1
                print(f"FAILED {case}: {launch.name}: {type(e).__name__}: {e}")
                continue
            print(
                f"{case:34s} {c.name:26s} warps {c.num_warps:2d} regs {c.registers:3d} "
                f"local {c.local_bytes:5d} B  v4 ld/st {c.vector_loads:d}/{c.vector_stores:d}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
