"""torch.nn.GroupNorm (and timm's subclasses) -> ours, fusing the activation after a norm
where :mod:`groupnorm.convert.fusion` proves it safe; restore_group_norm undoes it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from groupnorm.convert import _walk, fusion, trace
from groupnorm.convert.fusion import FusedPair
from groupnorm.convert.known import KNOWN_GROUPNORMS, Known, recognize
from groupnorm.convert.layers import GroupNormDropAct, act_and_drop, why_not_fused
from groupnorm.functional import check_flag
from groupnorm.modules import GroupNorm

__all__ = ["FusedPair", "SwapReport", "restore_group_norm", "swap_group_norm"]


@dataclass
class SwapReport:
    """What :func:`swap_group_norm` did; pass it to :func:`restore_group_norm` to undo.

    Every swapped norm is in ``fused`` or in ``not_fused`` with the reason; ``proof`` says what
    the fusion decisions rest on (a trace, or the pinned forwards of known classes)."""

    swapped: list[str] = field(default_factory=list)
    fused: list[FusedPair] = field(default_factory=list)
    not_fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    proof: str = ""
    _undo: list[tuple[nn.Module, str, nn.Module, nn.Module]] = field(
        default_factory=list, repr=False
    )
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)
    _restored: bool = field(default=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.swapped)

    def __str__(self) -> str:
        lines = [
            f"swapped {len(self.swapped)} GroupNorm module(s); fused the activation into "
            f"{len(self.fused)}"
        ]
        if self.proof:
            lines.append(f"fusion decided by: {self.proof}")
        for f in self.fused:
            moved = f" (now applied by {', '.join(f.moved_to)})" if f.moved_to else ""
            lines.append(f"  fused {f.norm} + {f.activation} [{f.rule}]{moved}")
        lines += [f"not fused {path}: {why}" for path, why in self.not_fused]
        lines += [f"skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _ours(old: nn.Module, activation: str | None) -> GroupNorm:
    """Our GroupNorm holding ``old``'s very Parameter objects (so an optimizer built on them
    stays valid and :func:`restore_group_norm` keeps what was trained); a timm GroupNormAct's
    ``drop`` and ``act`` come along in a :class:`GroupNormDropAct`."""
    assert isinstance(old, nn.GroupNorm)
    args = (old.num_groups, old.num_channels, old.eps, old.affine)
    kw = _walk.factory_kwargs(old)
    act, drop = act_and_drop(old)
    new = (
        GroupNormDropAct(*args, act=act, drop=drop, **kw)
        if hasattr(old, "act")
        else GroupNorm(*args, activation=activation, **kw)
    )
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    new.train(old.training)
    return new


def _with_act(path: str, m: nn.Module) -> FusedPair | str:
    """A timm GroupNormAct computes its own activation: fused, or why it stays a module."""
    why = why_not_fused(*act_and_drop(m))
    return FusedPair(path, _walk.join(path, "act"), type(m).__name__) if why is None else why


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _plan(
    target: nn.Module,
    norms: dict[int, nn.Module],
    paths: dict[int, list[str]],
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None,
) -> tuple[fusion.Plan, str]:
    # torch.compile's wrapper replaces its forward on the instance with the compiled forward
    # of the module it wraps: the code a trace of that module shows.
    compiled = sys.modules.get("torch._dynamo.eval_frame")
    if compiled is not None and isinstance(target, compiled.OptimizedModule):
        target = target._orig_mod
    # A trace follows the class's forward: one replaced on an instance would not be the code
    # that was traced. Nor does it show hooks: one on a module whose output is a norm's (a
    # parent block returning it, an Identity after it) would see the fused output, and tracing
    # would run it. Hooks on norms and convs are not such: their output is their own op's
    # (a hooked norm is skipped, not fused), and fx does not run them (leaves).
    for path, m in target.named_modules():
        why = _walk.patched(m)
        if why is not None and ("forward" in m.__dict__ or not isinstance(m, trace.ONE_OP)):
            failed = f"{path or '<root>'}: {why}, which no trace shows, so no trace is trusted"
            return _pinned(target, norms, paths, failed)
    failed = ""
    if example_inputs is not None or example_kwargs is not None:
        args = () if example_inputs is None else _as_args(example_inputs)
        try:
            plan, how = _in_every_mode(
                target, lambda: trace.from_export(target, args, example_kwargs), norms, paths
            )
            return plan, how
        except trace.SideEffect as e:
            return _keeps_values(norms, e, "torch.export on the example input")
        except Exception as e:  # export's failures have no common base class
            failed = (
                f"torch.export failed on the example input ({type(e).__name__}: {_first_line(e)}); "
            )
    try:
        plan, how = _in_every_mode(
            target, lambda: trace.from_fx(target, norms.values()), norms, paths
        )
        return plan, failed + how
    except trace.SideEffect as e:
        return _keeps_values(norms, e, failed + "torch.fx symbolic trace")
    except Exception as e:  # fx raises TraceError, TypeError, ... on data-dependent code
        failed += f"torch.fx could not trace the model ({type(e).__name__}: {_first_line(e)})"
    return _pinned(target, norms, paths, failed)


def _keeps_values(
    norms: dict[int, nn.Module], e: trace.SideEffect, how: str
) -> tuple[fusion.Plan, str]:
    """Nothing fused: the forward keeps values in the model, where a fused norm's output
    could land (nor is another trace, or a pinned forward, asked: neither would see it)."""
    return fusion.Plan(why_not=dict.fromkeys(norms, str(e))), how


def _in_every_mode(
    target: nn.Module,
    record: Callable[[], trace.Calls],
    norms: dict[int, nn.Module],
    paths: dict[int, list[str]],
) -> tuple[fusion.Plan, str]:
    """The fusion a trace proves with every module in training mode and in eval mode (a
    forward may branch on ``self.training``, and a trace sees one branch), and in the modes the
    modules are in now where those are mixed (a frozen part in eval mode, the rest training):
    where the traces differ, nothing from them is fused. Each module's mode is put back
    afterwards."""
    modes = [(m, m.training) for m in target.modules()]
    mixed = len({training for _, training in modes}) > 1
    try:
        plans = []
        for training in ((None,) if mixed else ()) + (True, False):
            if training is not None:
                target.train(training)
            calls = record()
            plans.append(fusion.by_trace(calls, target, norms, paths))
    finally:
        for m, training in modes:
            m.training = training
    present = " and the modules' present mixed modes" if mixed else ""
    if any(
        (p.norm_acts, set(p.removed), set(p.pre_act))
        != (plans[-1].norm_acts, set(plans[-1].removed), set(plans[-1].pre_act))
        for p in plans
    ):
        why = (
            f"the {calls.how} differs between training and eval mode{present} (the forward "
            "branches on self.training), so what a norm's output feeds depends on the mode"
        )
        return fusion.Plan(why_not=dict.fromkeys(norms, why)), calls.how
    return plans[-1], f"{calls.how}, in training and eval mode{present}"


def _pinned(
    target: nn.Module, norms: dict[int, nn.Module], paths: dict[int, list[str]], failed: str
) -> tuple[fusion.Plan, str]:
    no_trace = (
        f"no trace of the model ({failed}) and no pinned forward covers this norm; pass "
        "example_inputs= so that a trace can show what its output feeds"
    )
    return fusion.by_pinned_forwards(target, norms, paths, no_trace), (
        f"{failed}; the pinned forwards of known diffusers classes"
    )


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:120]


def swap_group_norm(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    fuse_activation: bool = True,
    inplace: bool = False,
) -> tuple[nn.Module, SwapReport]:
    """Replace every ``torch.nn.GroupNorm`` in ``model`` by :class:`groupnorm.GroupNorm`, and
    timm's ``GroupNorm``, ``GroupNorm1`` and ``GroupNormAct`` (subclasses whose forward was read,
    see :mod:`groupnorm.convert.known`) by ours, a GroupNormAct keeping its activation.

    Same groups, eps and the same Parameter objects, so the outputs are the same (to float
    rounding). With ``fuse_activation=True`` a GroupNorm whose output provably goes only into
    an ``nn.SiLU``, ``nn.ReLU`` or ``nn.GELU`` module computes that activation itself and the
    activation module becomes ``nn.Identity``. The proof is a trace of the model: torch.export
    on ``model(*example_inputs, **example_kwargs)`` when an example input is given (a tuple
    holds the positional inputs; anything else is the one positional input) (it covers
    the branches that input takes), else torch.fx's symbolic trace, else (a model fx cannot
    trace, with no example input) only the pinned forwards of diffusers' ``ResnetBlock2D``,
    VAE ``Encoder`` / ``Decoder`` and ``UNet2DModel`` / ``UNet2DConditionModel``. A trace is
    taken in training and in eval mode and must prove the same; hooks on modules other than
    norms and convs, and a forward that keeps a traced value in the model, rule traces out
    (docs/adoption.md); a ``torch.compile``'d model is traced as the module it wraps.
    ``report.fused`` and ``report.not_fused`` say, per norm, what was fused and why not.

    Other subclasses of ``nn.GroupNorm`` are left alone and listed in ``report.skipped``.
    Returns ``(model, report)``, a swapped deep copy unless ``inplace=True``; undo with
    :func:`restore_group_norm`.
    """
    model = _walk.check_model(model, "swap_group_norm")
    check_flag("fuse_activation", fuse_activation)
    # Keyword inputs by name (any other example is the model's one positional input, a dict
    # or list of tensors included, as torch.export takes them).
    if example_kwargs is not None and not (
        isinstance(example_kwargs, dict) and all(isinstance(k, str) for k in example_kwargs)
    ):
        raise TypeError(
            "example_kwargs must be a dict of the model's keyword inputs by name, got "
            f"{type(example_kwargs).__name__}"
        )
    target = _walk.target_of(model, inplace, "swap_group_norm")
    paths = _walk.paths_by_module(target)
    report = SwapReport()
    plain: dict[int, nn.Module] = {}  # fusion candidates: norms without their own activation
    own_act: dict[int, nn.Module] = {}
    for path, m in target.named_modules():
        if not isinstance(m, nn.GroupNorm) or isinstance(m, GroupNorm) or id(m) in plain:
            continue
        known: Known | str | None = None
        if type(m) is not nn.GroupNorm:
            known = recognize(m, KNOWN_GROUPNORMS) or (
                f"{type(m).__name__} subclasses nn.GroupNorm and may behave differently; "
                "left as it is"
            )
        why = known if isinstance(known, str) else _walk.patched(m)
        if why is not None:
            report.skipped.append((path, why))
        elif isinstance(known, Known) and known.has_act:
            own_act[id(m)] = m
        else:
            plain[id(m)] = m

    if not fuse_activation:
        plan = fusion.Plan(why_not=dict.fromkeys(plain, "fuse_activation=False"))
    else:
        plan, report.proof = _plan(target, plain, paths, example_inputs, example_kwargs)

    # Every new module is built before the first replacement: one that cannot be built (an
    # eps GroupNorm refuses) leaves an inplace model untouched.
    olds = {**plain, **own_act}
    news = {}
    for norm_id, old in olds.items():
        with _walk.replacing("swap_group_norm", paths[norm_id][0], old):
            news[norm_id] = _ours(old, plan.norm_acts.get(norm_id))
    for norm_id, old in olds.items():
        new = news[norm_id]
        target = _walk.replace_everywhere(target, paths[norm_id], new, report._undo)
        report.swapped.extend(paths[norm_id])
        if norm_id in own_act:
            decided = _with_act(paths[norm_id][0], old)
            if isinstance(decided, FusedPair):
                report.fused.append(decided)
            else:
                report.not_fused.append((paths[norm_id][0], decided))
        elif norm_id in plan.why_not:
            report.not_fused += [(p, plan.why_not[norm_id]) for p in paths[norm_id]]
    for act_id, act in plan.removed.items():
        # In the activation's mode: restore_group_norm gives it the mode its stand-in has then.
        identity = nn.Identity().train(act.training)
        target = _walk.replace_everywhere(target, paths[act_id], identity, report._undo)
    report._hooks += [
        m.register_forward_pre_hook(fusion.ActivationPreHook(name), with_kwargs=True)
        for m, name in plan.pre_act.values()
    ]
    report.fused = plan.pairs + report.fused
    return target, report


def restore_group_norm(model: nn.Module, report: SwapReport) -> nn.Module:
    """Undo :func:`swap_group_norm` on the model it returned; returns the restored model.

    The original modules come back with the Parameter objects the swapped ones hold at the
    time of the restore, so training, loading and moving done meanwhile are kept; each takes
    the train/eval mode of the module it replaces.
    """
    if not isinstance(report, SwapReport):
        raise TypeError(
            f"report must be the SwapReport from swap_group_norm, got {type(report).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be the nn.Module swap_group_norm returned, got {type(model).__name__}"
        )
    if report._restored:
        raise ValueError("this SwapReport has already been restored")
    present = {id(m) for m in model.modules()}
    for parent, *_ in report._undo:
        if id(parent) not in present:
            raise ValueError(
                "this report belongs to another model: swap_group_norm returns a swapped copy "
                "unless inplace=True; restore the model it returned"
            )
    # Every module to restore is still the one the swap put there, checked before anything
    # changes: a model changed since is left as it is.
    for parent, name, _, put in report._undo:
        current = parent._modules.get(name) if name else parent
        if current is not put:
            where = f"{type(parent).__name__}.{name}" if name else "the model's root"
            raise ValueError(
                f"{where} is {type(current).__name__ if current is not None else 'gone'} now, "
                "not the module swap_group_norm put there; the model changed since the swap, "
                "so it cannot be restored (nothing was changed)"
            )
    for handle in report._hooks:
        handle.remove()
    for parent, name, old, current in reversed(report._undo):
        old.train(current.training)
        if isinstance(old, nn.GroupNorm) and old.affine:
            # The Parameters the swapped module holds now: new ones where the model was loaded
            # with assign=True, moved off the meta device with to_empty, or given new ones.
            old.weight, old.bias = current.weight, current.bias  # type: ignore[assignment]
        if name:
            setattr(parent, name, old)
        else:
            model = old
    report._restored = True
    return model
