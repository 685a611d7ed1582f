"""``GroupNorm``: a drop-in subclass of ``torch.nn.GroupNorm``; ``GroupNormAct`` with a fused
activation.

The subclass keeps torch's signature, defaults, ``state_dict`` keys (``weight``, ``bias``) and
repr, so an ``nn.GroupNorm`` checkpoint loads unchanged and gives the same output. What it adds is
keyword-only: ``group_size=``, ``group_sizes=``, ``uneven=True``, ``activation=``, ``backend=``,
``process_group=`` (the input is one rank's spatial shard; see :mod:`groupnorm.distributed`).
"""

# No `from __future__ import annotations`: torch.fx keeps forward's annotations as its graph's
# input types, and string ones made traced graphs fail to pickle and to script.
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from groupnorm import dispatch
from groupnorm.activations import check_activation
from groupnorm.backends.shifted import shifted_group_norm
from groupnorm.backends.torch_ops import plan_index
from groupnorm.functional import (
    check_backend_name,
    check_eps,
    check_planned_input,
    group_norm,
    group_norm_planned,
    resolve_plan,
    traced_quietly,
)
from groupnorm.groups import GroupPlan, runs_of

__all__ = ["GroupNorm", "GroupNormAct"]

# torch 2.13 added nn.GroupNorm(..., *, bias=True); older releases lack it, and there we drop
# the bias ourselves.
_TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.GroupNorm.__init__).parameters


def fx_group_norm(
    x: torch.Tensor,
    group_sizes: list[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    backend: str,
) -> torch.Tensor:
    """A module's call as torch.fx records it: one node whose arguments print as Python. The
    annotations are ones TorchScript reads (a list, not ``tuple[int, ...]``), so a traced graph
    compiles with torch.jit.script, where this runs as a scripted :class:`GroupNorm` does."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch alone
        return _scripted_sizes(x, group_sizes, weight, bias, eps, activation)
    return group_norm(
        x,
        weight=weight,
        bias=bias,
        eps=eps,
        group_sizes=group_sizes,
        activation=activation,
        backend=backend,
    )


def _scripted_sizes(
    x: torch.Tensor,
    group_sizes: list[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> torch.Tensor:
    """:func:`shifted_group_norm` over explicit sizes: their runs of equal sizes and each
    channel's group's first channel, as :class:`GroupPlan` derives them."""
    runs = runs_of(group_sizes)
    firsts: list[int] = []
    for begin, end, size in runs:
        for channel in range(begin, end):
            firsts.append(channel - (channel - begin) % size)
    first = torch.tensor(firsts, dtype=torch.int64, device=x.device)
    return shifted_group_norm(x, runs, first, weight, bias, eps, activation, None, None)


torch.fx.wrap("fx_group_norm")


class GroupNorm(nn.GroupNorm):
    """Group normalization over (N, C, *S) inputs; see :func:`groupnorm.group_norm`.

    ``GroupNorm(32, 64)`` behaves as ``nn.GroupNorm(32, 64)``. Also accepted:
    ``GroupNorm(num_channels=48, group_size=16)``, ``GroupNorm(32, 48, uneven=True)``,
    ``GroupNorm(num_channels=8, group_size=3, uneven=True)`` (round(8 / 3) = 3 groups: 3, 3, 2),
    ``GroupNorm(num_channels=10, group_sizes=[4, 3, 3])``. ``num_groups`` is then the plan's G.

    Norm-layer factories call ``norm_layer(C)`` with the channels alone (timm does, after
    dropping a partial's positional arguments), so a first positional argument given alone, or
    with ``num_groups=`` as a keyword, is the channel count: ``partial(GroupNorm,
    num_groups=16)(64)`` is ``GroupNorm(16, 64)``, and ``GroupNorm(64)`` has 32 groups (timm's
    GroupNorm default) unless ``group_size=`` or ``group_sizes=`` says otherwise.
    """

    def __init__(
        self,
        groups_or_channels: int | None = None,
        /,
        num_channels: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        num_groups: int | None = None,
        bias: bool = True,
        group_size: int | None = None,
        group_sizes: Sequence[int] | None = None,
        uneven: bool = False,
        activation: str | None = None,
        backend: str = "auto",
        process_group: Any = None,
    ) -> None:
        if groups_or_channels is not None:
            if num_groups is not None and num_channels is not None:
                name = type(self).__name__
                raise TypeError(
                    f"{name} got {groups_or_channels} as its first argument besides "
                    f"num_groups={num_groups} and num_channels={num_channels}: the first is "
                    f"num_groups (num_channels where it is the only one); give each once, e.g. "
                    f"{name}(32, 256)"
                )
            if num_channels is None:
                num_channels = groups_or_channels
            else:
                num_groups = groups_or_channels
        if num_channels is None:  # a missing argument: Python's TypeError, as nn.GroupNorm's
            raise TypeError("num_channels is required, e.g. GroupNorm(32, num_channels=256)")
        defaulted = num_groups is None and group_size is None and group_sizes is None
        if defaulted:
            num_groups = 32
        check_activation(activation)
        check_eps(eps)
        check_backend_name(backend)
        try:
            plan = resolve_plan(
                num_channels,
                num_groups,
                group_size=group_size,
                group_sizes=group_sizes,
                uneven=uneven,
            )
        except ValueError as e:
            if not defaulted:
                raise
            raise ValueError(
                f"GroupNorm got num_channels={num_channels!r} and no num_groups, group_size= or "
                f"group_sizes=, so 32 groups (timm's default): {str(e).rstrip('.')}. Give the "
                "groups, e.g. GroupNorm(num_groups, num_channels)"
            ) from None
        # nn.GroupNorm insists that num_groups divides num_channels; the plan already checked
        # what the user asked for, so build the parameters with one group and set the real G.
        if _TORCH_HAS_BIAS_FLAG:
            super().__init__(1, num_channels, eps, affine, device, dtype, bias=bias)
        else:
            super().__init__(1, num_channels, eps, affine, device, dtype)
            if not bias:
                self.register_parameter("bias", None)
        self.num_groups = plan.num_groups
        self.plan = plan
        self.uneven = uneven
        self.activation = activation
        self.backend = backend
        self.process_group = process_group
        self._explicit_sizes = group_sizes is not None or not plan.is_even
        # group_sizes= are kept for _replan: editing num_channels (which nn.GroupNorm never
        # reads), or num_groups away and back, must not lose them.
        self._group_sizes = plan.sizes if group_sizes is not None else None
        self._planned_for = (self.num_groups, self.num_channels)  # the attributes plan is for
        plan_index(plan, self._device())  # kept with the plan: a compiled forward reads it

    def _replan(self) -> GroupPlan:
        """The plan for changed ``num_groups`` / ``num_channels`` attributes, as if passed to
        the constructor. nn.GroupNorm's forward is ``F.group_norm(x, num_groups, weight,
        bias)``: it reads num_groups on every call and num_channels never. So the channels are
        the affine parameters' where there are some; an affine-free module normalizes any x
        whose channels num_groups divides (:meth:`_plan_of`), so where num_groups does not
        divide num_channels its plan needs num_groups alone (groups of one channel).

        The constructor's ``group_sizes=`` stay the plan while num_groups is their count and
        the affine parameters (where there are some) their sum."""
        channels = self.num_channels
        param = self._affine()
        if isinstance(param, torch.Tensor) and param.dim() == 1:
            channels = param.shape[0]
        sizes = getattr(self, "_group_sizes", None)  # None in a module pickled before it existed
        if (
            sizes is not None
            and len(sizes) == self.num_groups
            and (param is None or channels == sum(sizes))
        ):
            self.plan = resolve_plan(sum(sizes), group_sizes=sizes)
            self._explicit_sizes = True
        else:
            if param is None and not self.uneven and channels % self.num_groups:
                channels = self.num_groups
            self.plan = resolve_plan(channels, self.num_groups, uneven=self.uneven)
            self._explicit_sizes = not self.plan.is_even
        self._planned_for = (self.num_groups, self.num_channels)
        plan_index(self.plan, self._device())
        return self.plan

    def _stale(self) -> bool:
        """Whether the kept plan is not the current attributes': num_groups or num_channels
        changed, or the affine parameters were replaced by ones of another length (forward's
        fast path declines those, so only the validated path and :meth:`_current_plan` ask)."""
        if self._planned_for != (self.num_groups, self.num_channels):
            return True
        param = self._affine()
        return bool(  # a Python bool: torch.jit.trace records the sizes as tensors
            isinstance(param, torch.Tensor)
            and param.dim() == 1
            and param.shape[0] != self.plan.num_channels
        )

    def _affine(self) -> Any:
        """The weight, else the bias, as the module holds it: torch.fx's symbolic trace hands
        a Proxy to ``self.weight``, which says nothing of its length."""
        for name in ("weight", "bias"):
            param = self._parameters[name] if name in self._parameters else getattr(self, name)
            if param is not None:
                return param
        return None

    @torch.jit.unused
    def _current_plan(self) -> GroupPlan:
        """The plan of the current attributes: the kept one, or :meth:`_replan`'s where they
        changed since (:meth:`_stale`)."""
        return self._replan() if self._stale() else self.plan

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted(input, self.activation)
        return self._forward(input, self.activation)

    def _scripted(self, input: torch.Tensor, activation: str | None) -> torch.Tensor:
        """What torch.jit.script compiles: the plan as __prepare_scriptable__ left it, or as
        :meth:`_plan_of` would change it (no affine parameters: any channel count num_groups
        divides, in num_groups groups)."""
        runs = self._script_runs
        first = self._script_first
        if self._regrouped(input, self.num_channels):
            channels = input.shape[1]
            size = channels // self.num_groups
            runs = [(0, channels, size)]
            first = torch.div(torch.arange(channels), size, rounding_mode="floor") * size
        if first.device != input.device:
            first = first.to(input.device)
        return shifted_group_norm(
            input,
            runs,
            first,
            self.weight,
            self.bias,
            self.eps,
            activation,
            None,
            None,
        )

    @torch.jit.unused
    def _forward(self, input: torch.Tensor, activation: str | None) -> torch.Tensor:
        """The eager call, with ``activation`` fused (a subclass may fuse its own)."""
        plan = self.plan  # _current_plan() inlined: one call fewer on every forward
        if self.process_group is None:
            if self._planned_for != (self.num_groups, self.num_channels):
                plan = traced_quietly(self._replan)  # jit.trace records the sizes it reads
            y = dispatch.run_plain(
                input, plan, self.weight, self.bias, self.eps, activation, self.backend
            )
            if y is not None:
                return y
        return self._validated(input, plan, activation)

    @torch.jit.unused
    def _validated(
        self, input: torch.Tensor, plan: GroupPlan, activation: str | None
    ) -> torch.Tensor:
        """What the fast path declined: fx's Proxy, torch.jit.trace, process_group=, and every
        call the validated path checks."""
        if isinstance(input, torch.fx.Proxy):
            # torch.fx.symbolic_trace: one node (torch.nn's modules are leaves to fx, ours is
            # not, and its argument checks cannot read a Proxy's shape).
            if self.process_group is not None:
                raise TypeError(
                    "torch.fx cannot record a GroupNorm with process_group= (its statistics are "
                    "gathered across processes, which a graph node cannot name)"
                )
            plan = self._current_plan()  # the parameters may have been replaced since
            return fx_group_norm(
                input, list(plan.sizes), self.weight, self.bias, self.eps, activation, self.backend
            )
        if self.process_group is not None:
            return self._sharded(input, activation)
        if traced_quietly(self._stale):
            plan = traced_quietly(self._replan)
        plan = traced_quietly(self._plan_of, input, plan)
        return traced_quietly(
            group_norm_planned,
            input,
            plan,
            self.weight,
            self.bias,
            self.eps,
            activation,
            self.backend,
        )

    @torch.jit.unused
    def _sharded(self, input: torch.Tensor, activation: str | None) -> torch.Tensor:
        """process_group=: the plan is made, and x's channels checked against it, where a
        refusal reaches the other ranks (an edited num_groups, an affine-free module's x whose
        channels it does not divide, an x of other channels), which would otherwise wait for
        this rank in their gather."""
        from groupnorm import distributed

        with distributed.refused_together(self.process_group):
            plan = traced_quietly(self._current_plan)
            plan = traced_quietly(self._plan_of, input, plan)
            # Here, not in group_norm: there x's channels are checked against the group_sizes=
            # passed below, which the user never gave.
            traced_quietly(check_planned_input, input, plan, True)
        return group_norm(
            input,
            weight=self.weight,
            bias=self.bias,
            eps=self.eps,
            group_sizes=plan.sizes,
            activation=activation,
            backend=self.backend,
            process_group=self.process_group,
        )

    @torch.jit.unused
    def _plan_of(self, input: torch.Tensor, plan: GroupPlan) -> GroupPlan:
        """``plan``, or as nn.GroupNorm: without affine parameters num_channels is not checked,
        and any channel count num_groups divides is normalized in num_groups groups."""
        if self._regrouped(input, plan.num_channels, divided=False):
            # resolve_plan says what is wrong where num_groups does not divide x's channels
            return resolve_plan(int(input.shape[1]), self.num_groups, uneven=self.uneven)
        return plan

    def _regrouped(self, input: torch.Tensor, planned: int, divided: bool = True) -> bool:
        """Whether x's channel count, not the ``planned`` one, is normalized in num_groups
        groups, as nn.GroupNorm does without affine parameters (any count num_groups divides);
        eager (:meth:`_plan_of`) and scripted (:meth:`_scripted`) calls alike. Asks x last: the
        validated path says what is wrong with an x that is no tensor."""
        return (
            self.weight is None
            and self.bias is None
            and not self._explicit_sizes
            and isinstance(input, torch.Tensor)
            and input.dim() >= 2
            and input.shape[1] != planned
            and (not divided or input.shape[1] % self.num_groups == 0)
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """Before ``torch.jit.script`` compiles this module: the plan is a Python object
        TorchScript cannot compile, so forward's scripted branch reads its runs as int tuples
        and each channel's group's first channel as a tensor (a plain attribute, not a buffer:
        the state_dict stays nn.GroupNorm's). Returns the module itself, because torch puts
        what this returns into the parent module, also in the eager model."""
        if self.process_group is not None:
            raise TypeError(
                "torch.jit.script cannot compile a GroupNorm with process_group= (TorchScript "
                "has no torch.distributed collectives: each rank would normalize its shard "
                "alone); script it without process_group=, or use torch.compile"
            )
        plan = self._current_plan()
        self._script_runs = list(plan.runs)
        self._script_first = torch.tensor(plan.channel_first, dtype=torch.int64)
        return self

    def _device(self) -> torch.device:
        """Where the parameters live (the default device without affine parameters)."""
        param = self._affine()
        return param.device if isinstance(param, torch.Tensor) else torch.empty(0).device

    def extra_repr(self) -> str:
        text = super().extra_repr()
        plan: GroupPlan | None
        try:  # num_groups may have changed since the last forward: the sizes it now means
            plan = self._current_plan()
        except (TypeError, ValueError):  # repr must not raise; the next forward will
            plan = None
        if plan is not None and self._explicit_sizes:
            text += f", group_sizes={list(plan.sizes)}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text


class GroupNormAct(GroupNorm):
    """GroupNorm with the activation fused, default SiLU (the diffusion-model pairing).

    Takes :class:`GroupNorm`'s arguments; only ``activation``'s default differs.
    """

    def __init__(self, *args: Any, activation: str | None = "silu", **kwargs: Any) -> None:
        super().__init__(*args, activation=activation, **kwargs)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        # None is not this class's default: left out, the repr would read as a SiLU's
        return text + ", activation=None" if self.activation is None else text
