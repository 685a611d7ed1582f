"""BatchNorm -> GroupNorm for whole models, one decision per module, each in the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from groupnorm.convert import _walk
from groupnorm.convert.known import KNOWN_BATCHNORMS, Known, recognize
from groupnorm.convert.layers import GroupNormDropAct, act_and_drop, why_not_fused
from groupnorm.functional import check_flag
from groupnorm.groups import (
    GroupPlan,
    choose_num_groups,
    divisors,
    groups_of_size,
    make_plan,
    positive_int,
)
from groupnorm.modules import GroupNorm
from groupnorm.ws import WSConv2d

__all__ = ["ConversionReport", "Replacement", "convert_batchnorm"]

POLICIES = ("uneven", "choose", "error")

# Exact types: a subclass may do more than normalize (timm's BatchNormAct2d also applies an
# activation), so only the classes listed in known.py are converted besides these.
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Replacement:
    """One BatchNorm module (possibly shared, so possibly several paths) and what replaced it.

    ``act``: for a BatchNorm with its own activation (timm's ``BatchNormAct2d``), what was kept
    of it; empty for a plain BatchNorm."""

    paths: tuple[str, ...]
    kind: str
    num_channels: int
    plan: GroupPlan
    reason: str
    affine: bool
    dropped_running_stats: bool
    act: str = ""

    def describe(self) -> str:
        where = ", ".join(p or "<root>" for p in self.paths)
        act = f" + {self.act}" if self.act else ""
        return (
            f"{where}: {self.kind}(C={self.num_channels}) -> {self.plan.describe()}{act} "
            f"({self.reason})"
        )


@dataclass
class ConversionReport:
    """What :func:`convert_batchnorm` did. Empty (``not report``) when there was nothing to do."""

    replaced: list[Replacement] = field(default_factory=list)
    ws_convs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.replaced or self.ws_convs)

    def __str__(self) -> str:
        lines = [f"converted {len(self.replaced)} BatchNorm module(s) to GroupNorm"]
        lines += [f"  {r.describe()}" for r in self.replaced]
        if self.ws_convs:
            lines.append(f"{len(self.ws_convs)} Conv2d -> WSConv2d: {', '.join(self.ws_convs)}")
        lines += [f"skipped {path}: {why}" for path, why in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _plan_for(
    C: int, num_groups: int | None, group_size: int | None, policy: str
) -> tuple[GroupPlan, str] | str:
    """The plan for C channels, with why; or the reason it cannot be made under ``policy``."""
    asked = f"group_size={group_size}" if group_size is not None else f"num_groups={num_groups}"
    if group_size is not None and group_size <= C and C % group_size == 0:
        return make_plan(C, group_size=group_size), f"{asked} divides {C}"
    G = groups_of_size(C, group_size) if group_size is not None else num_groups
    assert G is not None
    if group_size is None and G <= C and C % G == 0:
        return make_plan(C, G), f"{asked} divides {C}"
    if policy == "choose" or (policy == "uneven" and G > C):
        choice = choose_num_groups(C, target=G)
        why = f"policy={policy!r}: "
        if G > C:
            why += f"C={C} has fewer channels than {G} groups, so this module gets fewer groups: "
        return make_plan(C, choice.num_groups), why + choice.reason
    if policy == "uneven":
        return make_plan(C, G, uneven=True), f"policy='uneven': {asked} does not divide {C}"
    return f"{asked} does not divide C={C} (divisors of {C}: {divisors(C)})"


def _check_convert_args(
    num_groups: int | None, group_size: int | None, policy: str
) -> tuple[int | None, int | None]:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if num_groups is not None and group_size is not None:
        raise ValueError("give num_groups= or group_size=, not both")
    if num_groups is None and group_size is None:
        num_groups = 32
    return (
        None if num_groups is None else positive_int("num_groups", num_groups),
        None if group_size is None else positive_int("group_size", group_size),
    )


def _preceding_conv(root: nn.Module, path: str, C: int) -> str | None:
    """The path of a Conv2d (or subclass) with C output channels registered just before
    ``path`` in the same parent (the conv -> bn layout of nn.Sequential, torchvision and timm
    ResNets)."""
    if not path:
        return None
    parent_path, name = _walk.split(path)
    siblings = root.get_submodule(parent_path)._modules
    names = list(siblings)
    i = names.index(name)
    if i == 0:
        return None
    prev = siblings[names[i - 1]]
    if isinstance(prev, nn.Conv2d) and prev.out_channels == C:
        return _walk.join(parent_path, names[i - 1])
    return None


def _describe_act(act: nn.Module, drop: nn.Module) -> str:
    kept = f"{act!r}" if type(drop) is nn.Identity else f"{drop!r}, {act!r}"
    why = why_not_fused(act, drop)
    return f"{kept} kept" + (f" ({why})" if why else " (computed fused)")


def _classify(m: nn.Module) -> Known | None | str:
    """None for a plain BatchNorm, the table entry for a known BN+act class, or why not."""
    if type(m) in _BATCHNORMS:
        return None
    known = recognize(m, KNOWN_BATCHNORMS)
    if known is None:
        return (
            f"{type(m).__name__} is a BatchNorm subclass that groupnorm does not know; its "
            "forward may do more than normalize, so it is left as it is"
        )
    return known


def _frozen_batchnorms(model: nn.Module) -> list[tuple[str, str]]:
    # timm's and torchvision's FrozenBatchNorm2d are fixed affine maps, not _BatchNorm
    # subclasses: listed, so that the report accounts for every BatchNorm-like module.
    return [
        (path, f"{type(m).__name__} is a frozen BatchNorm (a fixed affine map); left as it is")
        for path, m in model.named_modules()
        if "FrozenBatchNorm" in type(m).__name__
        and not isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def convert_batchnorm(
    model: nn.Module,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    policy: str = "error",
    weight_standardize: bool = False,
    inplace: bool = False,
) -> tuple[nn.Module, ConversionReport]:
    """Replace every BatchNorm1d/2d/3d and SyncBatchNorm in ``model`` by :class:`GroupNorm`,
    and timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` by :class:`GroupNormDropAct`
    (GroupNorm, then the very ``drop`` and ``act`` modules they held).

    Groups: ``num_groups=G`` (32 when neither is given) or ``group_size=S`` channels per group.
    ``policy`` says what happens where G does not divide a module's C (or S does not):

    * ``"error"`` (default): a ValueError that lists every such module, raised before anything
      is changed;
    * ``"uneven"``: G groups whose sizes differ by at most one channel (``uneven=True``; with
      ``group_size=S``, G is C / S rounded, as ``GroupNorm(group_size=S, uneven=True)`` has it);
      a module with fewer than G channels gets :func:`groupnorm.choose_num_groups`'s G instead;
    * ``"choose"``: :func:`groupnorm.choose_num_groups` picks the divisor of C closest to G.

    Every module gets its own decision, stated in the report (``report.replaced`` with the
    reason, ``report.skipped``): a module that cannot be converted (an unknown BatchNorm
    subclass, one with hooks, an uninitialized lazy one) is skipped, never the whole model.

    Affine parameters are copied (BatchNorm without affine gives ``GroupNorm(affine=False)``;
    a weight or bias set to None stays None),
    eps is kept; running statistics are dropped, since GroupNorm normalizes every sample by its
    own statistics in training and eval alike. ``weight_standardize=True`` also turns each
    plain ``Conv2d`` registered just before a converted norm (same parent, C output channels)
    into :class:`groupnorm.WSConv2d`, copying its weights.

    Returns ``(model, report)``: a converted deep copy (``inplace=False``) or ``model`` itself.
    The new modules have new parameters: rebuild optimizers made from the old ones.
    """
    model = _walk.check_model(model, "convert_batchnorm")
    num_groups, group_size = _check_convert_args(num_groups, group_size, policy)
    check_flag("weight_standardize", weight_standardize)
    target = _walk.target_of(model, inplace, "convert_batchnorm")
    paths = _walk.paths_by_module(target)
    report = ConversionReport()

    # Decide everything before touching anything.
    todo: list[tuple[nn.modules.batchnorm._BatchNorm, GroupPlan, str, bool]] = []
    problems: list[str] = []
    for path, m in target.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        kind = _classify(m)
        why = kind if isinstance(kind, str) else _walk.patched(m)
        if _walk.uninitialized(m):
            # It becomes a plain BatchNorm at its first forward.
            why = (
                f"{type(m).__name__} is uninitialized (run one forward first so that its "
                "channel count is known)"
            )
        if why is not None:
            report.skipped.append((path, why))
            continue
        decided = _plan_for(m.num_features, num_groups, group_size, policy)
        if isinstance(decided, str):
            problems.append(f"{path or '<root>'}: {type(m).__name__}: {decided}")
        else:
            todo.append((m, *decided, kind is not None))
    if problems:
        raise ValueError(
            f"convert_batchnorm cannot convert {len(problems)} module(s) with policy={policy!r}; "
            "nothing was changed:\n  " + "\n  ".join(problems) + "\nPass policy='uneven' "
            "(groups differing by one channel) or policy='choose' (a G that divides C), or "
            "another num_groups/group_size."
        )
    report.skipped += _frozen_batchnorms(target)

    convs: dict[int, nn.Conv2d] = {}
    if weight_standardize:
        for m, _, _, _ in todo:
            for p in paths[id(m)]:
                conv_path = _preceding_conv(target, p, m.num_features)
                if conv_path is None:
                    continue
                conv = target.get_submodule(conv_path)
                assert isinstance(conv, nn.Conv2d)  # _preceding_conv's type check
                if isinstance(conv, WSConv2d):
                    continue  # standardized already
                # Pruning and the old weight_norm keep the weight under other names and
                # recompute it in a forward pre-hook: a hook, as _walk.patched says.
                why = _walk.patched(conv)
                if why is None and type(conv) is not nn.Conv2d:
                    why = (
                        f"{type(conv).__name__} is not a plain Conv2d (a parametrization, as "
                        "torch.nn.utils.parametrizations.weight_norm makes, or a subclass "
                        "computes its weight its own way)"
                    )
                if why is None and conv.weight[0].numel() == 1:
                    why = (
                        "each filter has one weight, which standardizing makes 0 (the output "
                        "would no longer depend on the input)"
                    )
                if why is None:
                    convs[id(conv)] = conv
                elif (conv_path, f"not weight-standardized: {why}") not in report.skipped:
                    report.skipped.append((conv_path, f"not weight-standardized: {why}"))

    # Every new module is built before the first replacement: a module that cannot be built
    # (an eps or a weight shape GroupNorm refuses) leaves an inplace model untouched.
    built = []
    for m, plan, reason, with_act in todo:
        args = (plan.num_groups, m.num_features, m.eps, m.affine)
        kw = {"uneven": not plan.is_even, **_walk.factory_kwargs(m)}
        act, drop = act_and_drop(m)
        with _walk.replacing("convert_batchnorm", paths[id(m)][0], m):
            new = (
                GroupNormDropAct(*args, act=act, drop=drop, **kw)
                if with_act
                else GroupNorm(*args, **kw)
            )
        if m.affine:
            for name in ("weight", "bias"):
                old_p, new_p = getattr(m, name), getattr(new, name)
                if old_p is None:  # set to None after construction; torch's forward takes it
                    setattr(new, name, None)
                    continue
                with torch.no_grad():
                    new_p.copy_(old_p)
                new_p.requires_grad_(old_p.requires_grad)
        new.train(m.training)
        built.append((m, plan, reason, with_act, act, drop, new))
    standardized = {conv_id: WSConv2d.from_conv(conv) for conv_id, conv in convs.items()}
    for m, plan, reason, with_act, act, drop, new in built:
        target = _walk.replace_everywhere(target, paths[id(m)], new)
        report.replaced.append(
            Replacement(
                tuple(paths[id(m)]),
                type(m).__name__,
                m.num_features,
                plan,
                reason,
                m.affine,
                m.track_running_stats,
                _describe_act(act, drop) if with_act else "",
            )
        )
    for conv_id, ws in standardized.items():
        target = _walk.replace_everywhere(target, paths[conv_id], ws)
        report.ws_convs.extend(paths[conv_id])

    if any(r.dropped_running_stats for r in report.replaced):
        report.warnings.append(
            "running statistics (running_mean, running_var, num_batches_tracked) were dropped: "
            "GroupNorm normalizes each sample by its own statistics, in training and eval alike, "
            "so a trained model's outputs change and it needs fine-tuning"
        )
    ones = [r for r in report.replaced if r.kind == "BatchNorm1d" and r.plan.min_size == 1]
    for r in ones:
        # An MLP's BatchNorm1d(32) with the default 32 groups: every output is the bias.
        report.warnings.append(
            f"{', '.join(p or '<root>' for p in r.paths)}: BatchNorm1d(C={r.num_channels}) -> "
            f"{r.plan.describe()}: on (N, C) inputs a one-channel group is one element, "
            "normalized to 0, so its output is the bias whatever the input; choose "
            "group_size >= 2 (or fewer groups)"
        )
    if any(r.kind == "BatchNorm1d" and r not in ones for r in report.replaced):
        report.warnings.append(
            "BatchNorm1d on (N, C) inputs becomes a normalization over each group's features "
            "within a sample (no spatial extent): check that groups hold several channels"
        )
    if report:
        report.warnings.append(
            "the replaced modules have new parameters: rebuild any optimizer (and LR scheduler) "
            "that was made from the old model's parameters"
        )
    return target, report
