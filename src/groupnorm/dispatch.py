"""A small registry of backends, each declaring what it can serve.

``group_norm`` validates a call once into a :class:`Request`, then asks the registry for a
backend. An explicit ``backend="name"`` that cannot serve the request raises and lists the
backends that can; only ``backend="auto"`` picks, taking the highest-priority backend that
accepts the request (Triton on CUDA when importable, else the composite PyTorch backend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from groupnorm.groups import GroupPlan

if TYPE_CHECKING:
    from groupnorm.stats import GroupStats

__all__ = [
    "FLOAT_DTYPES",
    "Backend",
    "Request",
    "available_backends",
    "register_backend",
    "select_backend",
    "torch_serves",
]


# The input dtypes every backend accepts.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Request(NamedTuple):
    """One validated group-norm call; every tensor is on ``x.device``.

    x: (N, C, *S) floating; weight, bias: (C,) or None; scale, shift: (N, C) or None;
    stats: statistics to normalize with instead of computing them, or None.
    (A NamedTuple: built on every call, it must be cheap.)
    """

    x: torch.Tensor
    plan: GroupPlan
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    activation: str | None
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    stats: GroupStats | None
    return_stats: bool


@dataclass(frozen=True)
class Backend:
    """A way to run a :class:`Request`.

    ``why_not(request)`` returns None when the backend can serve the request, else a short reason.
    ``run(request)`` returns ``(y, stats)``; stats is a GroupStats when ``return_stats`` is set.
    ``available()`` returns None when usable on this machine at all, else the reason it is not.
    ``auto(request)``: whether ``backend="auto"`` may pick it for this request (a backend can
    serve a request when named explicitly yet not be the better choice, e.g. interpreted kernels).
    ``stats(request)``: the statistics alone, where the backend has a cheaper way to them than
    ``run`` with ``return_stats`` (which also writes y). ``auto_on_cpu``: False when ``auto``
    never picks it for a CPU tensor (lets the torch backend's CPU fast path skip the registry).
    """

    name: str
    priority: int
    why_not: Callable[[Request], str | None]
    run: Callable[[Request], tuple[torch.Tensor, GroupStats | None]]
    available: Callable[[], str | None] = lambda: None
    auto: Callable[[Request], bool] = lambda r: True
    stats: Callable[[Request], GroupStats] | None = None
    auto_on_cpu: bool = True

    def stats_of(self, request: Request) -> GroupStats:
        """The statistics of ``request.x`` under ``request.plan`` from this backend."""
        if self.stats is not None:
            return self.stats(request)
        out = self.run(request._replace(return_stats=True))[1]
        assert out is not None, f"backend {self.name!r} returned no statistics"
        return out


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add or replace a backend under its name."""
    _REGISTRY[backend.name] = backend


def torch_serves(backend: str) -> bool:
    """Whether a CPU call with ``backend=`` goes to the torch backend, without asking the
    registered backends one by one."""
    if backend == "torch":
        return True
    return backend == "auto" and all(
        b.name == "torch" or not b.auto_on_cpu for b in _REGISTRY.values()
    )


def available_backends() -> dict[str, str | None]:
    """Every registered backend -> None if usable here, else why it is not."""
    return {name: b.available() for name, b in sorted(_REGISTRY.items())}


def select_backend(request: Request, backend: str = "auto") -> Backend:
    """The backend that will run ``request``; raises ValueError naming the alternatives."""
    if backend != "auto":
        chosen = _REGISTRY.get(backend)
        if chosen is None:
            raise ValueError(f"unknown backend {backend!r}; registered: {sorted(_REGISTRY)}")
        reason = chosen.available() or chosen.why_not(request)
        if reason is not None:
            able = [
                b.name
                for b in _REGISTRY.values()
                if b.available() is None and b.why_not(request) is None
            ]
            raise ValueError(
                f"backend {backend!r} cannot run this call: {reason}. "
                f"Backends that can: {able} (or backend='auto')"
            )
        return chosen
    for candidate in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        if (
            candidate.auto(request)
            and candidate.available() is None
            and candidate.why_not(request) is None
        ):
            return candidate
    raise ValueError(f"no registered backend can run this call; registered: {sorted(_REGISTRY)}")
