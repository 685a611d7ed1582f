"""Triton and the kernels module, imported interpreted when there is no CUDA.

Triton decides when a function is decorated (its own ``tl.*`` helpers at ``import triton``,
ours at import of the kernels) whether it is interpreted, from TRITON_INTERPRET. This sets the
variable for those imports only and restores it, so that other test modules see this machine's
backends as they are; the kernel tests set it again while they run (the triton backend serves
CPU tensors only under TRITON_INTERPRET=1). Skips the importing test module without triton.

:func:`count_traffic` counts the bytes each interpreted launch moves to and from each tensor.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set: its functions "
        "are compiled, not interpreted; import tests._triton_interpreted first"
    )

_before = os.environ.get("TRITON_INTERPRET")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    kernels = importlib.import_module("groupnorm.triton.group_norm")
finally:
    if _before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _before


@dataclass
class LaunchTraffic:
    """One interpreted kernel launch: every global access as (addresses, element bytes)."""

    kernel: str
    grid: tuple[int, ...] = ()
    options: dict = field(default_factory=dict)  # the launch's keyword (constexpr) arguments
    loads: list[tuple[np.ndarray, int]] = field(default_factory=list)
    stores: list[tuple[np.ndarray, int]] = field(default_factory=list)
    # Every access in program order: (is_load, addresses, element bytes).
    sequence: list[tuple[bool, np.ndarray, int]] = field(default_factory=list)

    def _bytes(self, accesses: list[tuple[np.ndarray, int]], t: torch.Tensor) -> int:
        lo = t.data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        return sum(int(((a >= lo) & (a < hi)).sum()) * size for a, size in accesses)

    def loaded(self, t: torch.Tensor) -> int:
        """Bytes this launch loaded from t's storage (every access, repeats included)."""
        return self._bytes(self.loads, t)

    def stored(self, t: torch.Tensor) -> int:
        return self._bytes(self.stores, t)

    def reuse_distance(self, t: torch.Tensor) -> int:
        """The LRU stack distance of t's second reads: the most distinct bytes (of any tensor,
        loads and stores) accessed between two loads of one element of t's storage, in program
        order (under the interpreter the programs run one after another). An L2 of more bytes
        than this serves every re-read of t."""
        lo = t.data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        addrs = np.concatenate([a for _, a, _ in self.sequence])
        sizes = np.concatenate([np.full(len(a), s, np.int64) for _, a, s in self.sequence])
        loads = np.concatenate([np.full(len(a), ld) for ld, a, _ in self.sequence])
        # Fenwick tree over access positions: a position holds its address's bytes while it is
        # that address's latest access, so the bytes in (p, i) are the distinct bytes between.
        tree = np.zeros(len(addrs) + 1, np.int64)

        def add(i: int, v: int) -> None:
            i += 1
            while i < len(tree):
                tree[i] += v
                i += i & -i

        def prefix(i: int) -> int:  # sum over positions < i
            total = 0
            while i > 0:
                total += tree[i]
                i -= i & -i
            return int(total)

        latest: dict[int, int] = {}
        worst = 0
        accesses = zip(addrs.tolist(), sizes.tolist(), loads, strict=True)
        for i, (a, size, is_load) in enumerate(accesses):
            p = latest.get(a)
            if p is not None:
                if is_load and lo <= a < hi:
                    worst = max(worst, prefix(i) - prefix(p + 1))
                add(p, -size)
            add(i, size)
            latest[a] = i
        return worst


@contextlib.contextmanager
def count_traffic() -> Iterator[list[LaunchTraffic]]:
    """Record the bytes every interpreted launch loads and stores, per launch (the kernels
    then run as usual). Only meaningful under the interpreter: the list stays empty on a GPU."""
    from triton.runtime import interpreter

    launches: list[LaunchTraffic] = []
    builder = interpreter.InterpreterBuilder
    real_load, real_store = builder.create_masked_load, builder.create_masked_store
    real_call = interpreter.GridExecutor.__call__

    def load(self, ptrs, mask, other, *args):
        size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        addrs = ptrs.data[mask.data].astype(np.uint64)
        launches[-1].loads.append((addrs, size))
        launches[-1].sequence.append((True, addrs, size))
        return real_load(self, ptrs, mask, other, *args)

    def store(self, ptrs, value, mask, *args):
        size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        addrs = ptrs.data[mask.data].astype(np.uint64)
        launches[-1].stores.append((addrs, size))
        launches[-1].sequence.append((False, addrs, size))
        return real_store(self, ptrs, value, mask, *args)

    def call(self, *args, **kwargs):
        launches.append(LaunchTraffic(self.fn.__name__, tuple(self.grid), dict(kwargs)))
        return real_call(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = load, store
    interpreter.GridExecutor.__call__ = call
    try:
        yield launches
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store
        interpreter.GridExecutor.__call__ = real_call
