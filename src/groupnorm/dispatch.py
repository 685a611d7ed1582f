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
    "run_plain",
    "select_backend",
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


# fast(x, plan, weight, bias, eps, activation) -> y, or None for the validated path.
FastPath = Callable[
    [torch.Tensor, GroupPlan, torch.Tensor | None, torch.Tensor | None, float, str | None],
    torch.Tensor | None,
]


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
    never picks it for a CPU tensor. ``fast(x, plan, weight, bias, eps, activation)``: a plain
    call (no scale, shift, statistics in or out, mask or process group) in one step, with the
    arguments as the user gave them, unchecked but for two things :func:`run_plain` has made sure
    of: x is a plain ``torch.Tensor`` and torch.compile is not tracing; it returns None for
    anything it does not serve that way, and the validated path then decides.
    """

    name: str
    priority: int
    why_not: Callable[[Request], str | None]
    run: Callable[[Request], tuple[torch.Tensor, GroupStats | None]]
    available: Callable[[], str | None] = lambda: None
    auto: Callable[[Request], bool] = lambda r: True
    stats: Callable[[Request], GroupStats] | None = None
    auto_on_cpu: bool = True
    fast: FastPath | None = None

    def stats_of(self, request: Request) -> GroupStats:
        """The statistics of ``request.x`` under ``request.plan`` from this backend."""
        if self.stats is not None:
            return self.stats(request)
        out = self.run(request._replace(return_stats=True))[1]
        assert out is not None, f"backend {self.name!r} returned no statistics"
        return out


_REGISTRY: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []
# The backend auto asks first on a CPU tensor and on any other, kept with the registry:
# run_plain's lookup is on every call.
_FIRST: dict[bool, Backend | None] = {True: None, False: None}


def register_backend(backend: Backend) -> None:
    """Add or replace a backend under its name."""
    _REGISTRY[backend.name] = backend
    _BY_PRIORITY[:] = sorted(_REGISTRY.values(), key=lambda b: -b.priority)
    _FIRST[True] = next((b for b in _BY_PRIORITY if b.auto_on_cpu), None)
    _FIRST[False] = _BY_PRIORITY[0]


def run_plain(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    backend: str,
) -> torch.Tensor | None:
    """A plain call's output from the fast path of the backend that would serve it, or None.

    ``backend="auto"`` asks the highest-priority backend that auto may give x's device to (a
    CPU tensor skips those with ``auto_on_cpu=False``); a named one is asked itself. Only that
    one is asked: when it declines, or has no fast path, the validated path chooses (and raises
    what is wrong). A fast path serves only calls :func:`select_backend` would give its backend.
    Under torch.compile every call takes the validated path (which records no dead reads of
    x's attributes into the graph).
    """
    if (
        type(x) is not torch.Tensor
        or x.layout is not torch.strided
        or x.is_nested
        or torch.compiler.is_compiling()
    ):
        return None
    if weight is None and bias is not None:
        return None  # the validated path gives it a weight of ones (torch's backward needs one)
    for p in (weight, bias):
        if p is not None and (
            not isinstance(p, torch.Tensor) or p.layout is not torch.strided or p.is_nested
        ):
            return None  # the validated path says what they must be
    if backend != "auto" and not isinstance(backend, str):
        return None  # the validated path says what backend must be
    b = _FIRST[x.is_cpu] if backend == "auto" else _REGISTRY.get(backend)
    if b is None or b.fast is None:
        return None
    return b.fast(x, plan, weight, bias, eps, activation)


def available_backends() -> dict[str, str | None]:
    """Every registered backend -> None if usable here, else why it is not."""
    return {name: b.available() for name, b in sorted(_REGISTRY.items())}


class BackendRefused(ValueError):
    """The backend a call named cannot run it (unavailable here, or not for this call): the
    call is not served, which is no fault of the backend's numbers."""


def select_backend(request: Request, backend: str = "auto") -> Backend:
    """The backend that will run ``request``; raises ValueError naming the alternatives
    (:class:`BackendRefused` where the named backend cannot run it)."""
    if backend != "auto":
        chosen = _REGISTRY.get(backend) if isinstance(backend, str) else None
        if chosen is None:
            raise ValueError(f"unknown backend {backend!r}; registered: {sorted(_REGISTRY)}")
        reason = chosen.available() or chosen.why_not(request)
        if reason is not None:
            able = [
                b.name
                for b in _REGISTRY.values()
                if b.available() is None and b.why_not(request) is None
            ]
            raise BackendRefused(
                f"backend {backend!r} cannot run this call: {reason}. "
                f"Backends that can: {able} (or backend='auto')"
            )
        return chosen
    for candidate in _BY_PRIORITY:
        if (
            candidate.auto(request)
            and candidate.available() is None
            and candidate.why_not(request) is None
        ):
            return candidate
    raise ValueError(f"no registered backend can run this call; registered: {sorted(_REGISTRY)}")
