"""Model surgery: BatchNorm -> GroupNorm, and torch's GroupNorm -> ours (with fused SiLU).

Both functions walk the module tree, decide everything first (so a bad request raises before
any module is touched), then replace modules, keeping device, dtype, train/eval mode and shared
submodules (one object used at several paths stays one object). Each returns the model and a
report of what it did; by default the model is a deep copy and the argument is left as it was.

A model wrapped in DistributedDataParallel is refused: DDP has already registered the
parameters it all-reduces, so surgery underneath it would leave it syncing modules that are no
longer in the forward. Convert first, then wrap.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from groupnorm.groups import GroupPlan, choose_num_groups, divisors, make_plan
from groupnorm.modules import GroupNorm
from groupnorm.ws import WSConv2d

__all__ = [
    "ConversionReport",
    "FusedPair",
    "Replacement",
    "SwapReport",
    "convert_batchnorm",
    "restore_group_norm",
    "swap_group_norm",
]

POLICIES = ("uneven", "choose", "error")

# Exact types only: a subclass (timm's BatchNormAct2d, a GroupNorm with a custom forward) may do
# more than normalize, and replacing it by a plain norm would silently drop that.
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# ---------------------------------------------------------------------------------------------
# the tree


def _paths_by_module(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every path it is reachable at (a shared module has several)."""
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    return paths


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _refuse_ddp(model: nn.Module, what: str) -> None:
    for path, m in model.named_modules():
        if isinstance(m, nn.parallel.DistributedDataParallel):
            where = "the model" if not path else f"submodule {path!r}"
            raise TypeError(
                f"{what} got a model in which {where} is wrapped in DistributedDataParallel. DDP "
                "has already registered the parameters it all-reduces, so replacing modules "
                f"underneath it would desynchronize it. Call {what} on the plain model before "
                f"wrapping: ddp = DistributedDataParallel({what}(model)[0], ...)."
            )


def _check_model(model: object, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} needs a torch.nn.Module, got {type(model).__name__}")
    _refuse_ddp(model, what)
    return model


def _factory_kwargs(m: nn.Module) -> dict[str, Any]:
    """device and dtype of the module's first floating tensor (None, None when it has none)."""
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": None, "dtype": None}


def _patched(m: nn.Module) -> str | None:
    """Why ``m`` cannot be replaced or fused without changing what runs, or None.

    Hooks and a forward replaced on the instance (as offloading wrappers do) belong to this
    object and would not move to its replacement; a hook on a norm would see a fused output."""
    if "forward" in m.__dict__:
        return f"{type(m).__name__} has its forward replaced on the instance"
    if any((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)):
        return f"{type(m).__name__} has hooks registered on it"
    return None


def _replace_everywhere(
    root: nn.Module,
    paths: list[str],
    new: nn.Module,
    undo: list[tuple[nn.Module, str, nn.Module]] | None = None,
) -> nn.Module:
    """Put ``new`` at every path (the root path "" replaces the root: returned). ``undo`` gets
    ``(parent, name, old)`` per replacement; for the root, ``(new root, "", old root)``."""
    for path in paths:
        if path == "":
            if undo is not None:
                undo.append((new, "", root))
            root = new
            continue
        parent_path, name = _split(path)
        parent = root.get_submodule(parent_path)
        if undo is not None:
            undo.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)
    return root


# ---------------------------------------------------------------------------------------------
# BatchNorm -> GroupNorm


@dataclass(frozen=True)
class Replacement:
    """One BatchNorm module (possibly shared, so possibly several paths) and what replaced it."""

    paths: tuple[str, ...]
    kind: str
    num_channels: int
    plan: GroupPlan
    reason: str
    affine: bool
    dropped_running_stats: bool

    def describe(self) -> str:
        where = ", ".join(p or "<root>" for p in self.paths)
        return (
            f"{where}: {self.kind}(C={self.num_channels}) -> {self.plan.describe()} ({self.reason})"
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


def _target_groups(C: int, num_groups: int | None, group_size: int | None) -> int:
    if group_size is not None:
        return max(1, round(C / group_size))
    assert num_groups is not None
    return num_groups


def _plan_for(
    C: int, num_groups: int | None, group_size: int | None, policy: str
) -> tuple[GroupPlan, str] | str:
    """The plan for C channels, with why; or the reason it cannot be made under ``policy``."""
    asked = f"group_size={group_size}" if group_size is not None else f"num_groups={num_groups}"
    if group_size is not None and group_size <= C and C % group_size == 0:
        return make_plan(C, group_size=group_size), f"{asked} divides {C}"
    G = _target_groups(C, num_groups, group_size)
    if group_size is None and G <= C and C % G == 0:
        return make_plan(C, G), f"{asked} divides {C}"
    if policy == "choose":
        choice = choose_num_groups(C, target=G)
        return make_plan(C, choice.num_groups), f"policy='choose': {choice.reason}"
    if policy == "uneven" and G <= C:
        return make_plan(C, G, uneven=True), f"policy='uneven': {asked} does not divide {C}"
    if policy == "uneven":
        return (
            f"C={C} is smaller than {G} groups, so uneven groups cannot be formed "
            "(use policy='choose' or fewer groups)"
        )
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
    for name, v in (("num_groups", num_groups), ("group_size", group_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return num_groups, group_size


def _preceding_conv(root: nn.Module, path: str, C: int) -> str | None:
    """The path of a plain Conv2d with C output channels registered just before ``path`` in
    the same parent (the conv -> bn layout of nn.Sequential, torchvision and timm ResNets)."""
    if not path:
        return None
    parent_path, name = _split(path)
    names = list(root.get_submodule(parent_path)._modules)
    i = names.index(name)
    if i == 0:
        return None
    prev = root.get_submodule(parent_path)._modules[names[i - 1]]
    if type(prev) is nn.Conv2d and prev.out_channels == C:
        return f"{parent_path}.{names[i - 1]}" if parent_path else names[i - 1]
    return None


def convert_batchnorm(
    model: nn.Module,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    policy: str = "error",
    weight_standardize: bool = False,
    inplace: bool = False,
) -> tuple[nn.Module, ConversionReport]:
    """Replace every BatchNorm1d/2d/3d and SyncBatchNorm in ``model`` by :class:`GroupNorm`.

    Groups: ``num_groups=G`` (32 when neither is given) or ``group_size=S`` channels per group.
    ``policy`` says what happens where G does not divide a module's C (or S does not):

    * ``"error"`` (default): a ValueError that lists every such module, raised before anything
      is changed;
    * ``"uneven"``: G groups whose sizes differ by at most one channel (``uneven=True``);
    * ``"choose"``: :func:`groupnorm.choose_num_groups` picks the divisor of C closest to G.

    Affine parameters are copied (BatchNorm without affine gives ``GroupNorm(affine=False)``),
    eps is kept; running statistics are dropped, since GroupNorm normalizes every sample by its
    own statistics in training and eval alike. ``weight_standardize=True`` also turns each
    plain ``Conv2d`` registered just before a converted norm (same parent, C output channels)
    into :class:`groupnorm.WSConv2d`, copying its weights.

    Returns ``(model, report)``: a converted deep copy (``inplace=False``) or ``model`` itself.
    The new modules have new parameters: rebuild optimizers made from the old ones.
    """
    model = _check_model(model, "convert_batchnorm")
    num_groups, group_size = _check_convert_args(num_groups, group_size, policy)
    target = model if inplace else copy.deepcopy(model)
    paths = _paths_by_module(target)
    report = ConversionReport()

    # Decide everything before touching anything.
    todo: list[tuple[nn.modules.batchnorm._BatchNorm, GroupPlan, str]] = []
    problems: list[str] = []
    for path, m in target.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if type(m) not in _BATCHNORMS:
            report.skipped.append(
                (
                    path,
                    f"{type(m).__name__} is a BatchNorm subclass with its "
                    "own behaviour; convert it with its library's tools",
                )
            )
            continue
        if (why := _patched(m)) is not None:
            report.skipped.append((path, why))
            continue
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            problems.append(
                f"{path}: {type(m).__name__} is uninitialized (run one forward "
                "first so that its channel count is known)"
            )
            continue
        decided = _plan_for(m.num_features, num_groups, group_size, policy)
        if isinstance(decided, str):
            problems.append(f"{path or '<root>'}: {type(m).__name__}: {decided}")
        else:
            todo.append((m, *decided))
    if problems:
        raise ValueError(
            f"convert_batchnorm cannot convert {len(problems)} module(s) with policy={policy!r}; "
            "nothing was changed:\n  " + "\n  ".join(problems) + "\nPass policy='uneven' "
            "(groups differing by one channel) or policy='choose' (a G that divides C), or "
            "another num_groups/group_size."
        )

    convs: dict[int, nn.Module] = {}
    if weight_standardize:
        for m, _, _ in todo:
            for p in paths[id(m)]:
                conv_path = _preceding_conv(target, p, m.num_features)
                if conv_path is not None:
                    conv = target.get_submodule(conv_path)
                    convs[id(conv)] = conv

    for m, plan, reason in todo:
        new = GroupNorm(
            plan.num_groups,
            m.num_features,
            m.eps,
            m.affine,
            uneven=not plan.is_even,
            **_factory_kwargs(m),
        )
        if m.affine:
            for name in ("weight", "bias"):
                old_p, new_p = getattr(m, name), getattr(new, name)
                with torch.no_grad():
                    new_p.copy_(old_p)
                new_p.requires_grad_(old_p.requires_grad)
        new.train(m.training)
        target = _replace_everywhere(target, paths[id(m)], new)
        report.replaced.append(
            Replacement(
                tuple(paths[id(m)]),
                type(m).__name__,
                m.num_features,
                plan,
                reason,
                m.affine,
                m.track_running_stats,
            )
        )
    for conv_id, conv in convs.items():
        assert isinstance(conv, nn.Conv2d)
        target = _replace_everywhere(target, paths[conv_id], WSConv2d.from_conv(conv))
        report.ws_convs.extend(paths[conv_id])

    if any(r.dropped_running_stats for r in report.replaced):
        report.warnings.append(
            "running statistics (running_mean, running_var, num_batches_tracked) were dropped: "
            "GroupNorm normalizes each sample by its own statistics, in training and eval alike, "
            "so a trained model's outputs change and it needs fine-tuning"
        )
    if any(r.kind == "BatchNorm1d" for r in report.replaced):
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


# ---------------------------------------------------------------------------------------------
# torch.nn.GroupNorm -> ours, fusing GroupNorm -> SiLU where the forward provably does that


@dataclass(frozen=True)
class FusedPair:
    """A GroupNorm now computing SiLU itself, and the SiLU module removed after it.

    ``moved_to``: modules that used the same SiLU elsewhere and now apply it themselves (a
    forward pre-hook), listed so that nothing is hidden.
    """

    norm: str
    activation: str
    rule: str
    moved_to: tuple[str, ...] = ()


@dataclass
class SwapReport:
    """What :func:`swap_group_norm` did; pass it to :func:`restore_group_norm` to undo."""

    swapped: list[str] = field(default_factory=list)
    fused: list[FusedPair] = field(default_factory=list)
    not_fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list, repr=False)
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)
    _restored: bool = field(default=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.swapped)

    def __str__(self) -> str:
        lines = [
            f"swapped {len(self.swapped)} GroupNorm module(s); fused SiLU into {len(self.fused)}"
        ]
        for f in self.fused:
            moved = f" (SiLU now applied by {', '.join(f.moved_to)})" if f.moved_to else ""
            lines.append(f"  fused {f.norm} + {f.activation} [{f.rule}]{moved}")
        lines += [f"not fused {path}: {why}" for path, why in self.not_fused]
        lines += [f"skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _forward_fingerprint(cls: type) -> str | None:
    """A hash of ``cls.forward``'s code (its AST, unparsed: comments, formatting and the
    docstring do not count), or None when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))  # type: ignore[attr-defined]
    except (OSError, TypeError):
        return None
    fn = ast.parse(source).body[0]
    assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        fn.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(fn).encode()).hexdigest()[:16]


def _silu_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (F.silu(args[0]), *args[1:])


@dataclass(frozen=True)
class _Rule:
    """A model class whose forward was read and shown to apply ``act`` right after ``norm``.

    ``pairs(module)`` returns the (norm, act) attribute pairs to fuse and the attributes of
    modules whose *input* is the only other use of ``act`` (the SiLU moves into them), or a
    reason not to fuse. ``fingerprints`` are :func:`_forward_fingerprint` of the verified
    forward; any other forward (another library version) is not fused.
    """

    module: str
    name: str
    fingerprints: frozenset[str]
    pairs: Callable[[nn.Module], tuple[list[tuple[str, str]], list[str]] | str]


def _resnet_block_2d(m: nn.Module) -> tuple[list[tuple[str, str]], list[str]] | str:
    # diffusers ResnetBlock2D.forward (0.42.1), the statements that touch norm/nonlinearity:
    #   hidden_states = self.norm1(hidden_states)
    #   hidden_states = self.nonlinearity(hidden_states)           <- norm1 -> SiLU
    #   ... upsample/downsample, conv1
    #   if self.time_emb_proj is not None:
    #       if not self.skip_time_act:
    #           temb = self.nonlinearity(temb)                     <- the only other use
    #       temb = self.time_emb_proj(temb)[:, :, None, None]
    #   if self.time_embedding_norm == "default": (+ temb); hidden_states = self.norm2(...)
    #   elif self.time_embedding_norm == "scale_shift": norm2, then * (1 + scale) + shift
    #   else: hidden_states = self.norm2(hidden_states)
    #   hidden_states = self.nonlinearity(hidden_states)           <- norm2 -> SiLU
    # So with time_embedding_norm != "scale_shift", both uses on hidden_states follow a norm
    # directly; `nonlinearity` can become Identity once the temb use (when it runs) applies
    # SiLU itself, which a pre-hook on time_emb_proj does: time_emb_proj is called only there.
    if m.time_embedding_norm == "scale_shift":
        return (
            "time_embedding_norm='scale_shift' puts a scale and shift between norm2 and "
            "the activation"
        )
    uses_temb = m.time_emb_proj is not None and not m.skip_time_act
    return [("norm1", "nonlinearity"), ("norm2", "nonlinearity")], (
        ["time_emb_proj"] if uses_temb else []
    )


def _norm_out(m: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    # diffusers Encoder / Decoder (autoencoders/vae.py) and UNet2DModel / UNet2DConditionModel
    # end their forward with
    #   sample = self.conv_norm_out(sample)     (Decoder: the other branch passes latent_embeds,
    #                                            which only a SpatialNorm accepts)
    #   sample = self.conv_act(sample)
    # and use conv_act nowhere else.
    return [("conv_norm_out", "conv_act")], []


# Fingerprints of the forwards read for this, diffusers 0.42.1. A new version's forward must be
# read again before its fingerprint is added here.
_VAE, _UNETS = "diffusers.models.autoencoders.vae", "diffusers.models.unets"
_RULES = (
    _Rule(
        "diffusers.models.resnet",
        "ResnetBlock2D",
        frozenset({"24624aeb812a69ca"}),
        _resnet_block_2d,
    ),
    _Rule(_VAE, "Encoder", frozenset({"97458a98fb36cdad"}), _norm_out),
    _Rule(_VAE, "Decoder", frozenset({"2ad49dec6e933a9e"}), _norm_out),
    _Rule(f"{_UNETS}.unet_2d", "UNet2DModel", frozenset({"bd9be7f8d659ce00"}), _norm_out),
    _Rule(
        f"{_UNETS}.unet_2d_condition",
        "UNet2DConditionModel",
        frozenset({"c38f02369325e0a4"}),
        _norm_out,
    ),
)
_RULE_BY_CLASS = {(r.module, r.name): r for r in _RULES}


@dataclass
class _Fusion:
    pairs: list[FusedPair] = field(default_factory=list)
    norm_ids: set[int] = field(default_factory=set)
    removals: list[tuple[nn.Module, str]] = field(default_factory=list)
    pre_act: list[nn.Module] = field(default_factory=list)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _fuse_sequential(
    seq: nn.Sequential, path: str, paths: dict[int, list[str]], plan: _Fusion, report: SwapReport
) -> None:
    # nn.Sequential.forward (exactly torch's: subclasses may override it) feeds each child's
    # output to the next child and to nothing else.
    names = list(seq._modules)
    for a, b in zip(names, names[1:], strict=False):
        norm, act = seq._modules[a], seq._modules[b]
        if type(norm) is not nn.GroupNorm or type(act) is not nn.SiLU:
            continue
        why = _patched(seq) or _patched(norm) or _patched(act)
        if why is None and len(paths[id(norm)]) > 1:
            why = f"this GroupNorm is also used at {paths[id(norm)]}, where no SiLU may follow it"
        if why is not None:
            report.not_fused.append((_join(path, a), why))
            continue
        plan.pairs.append(FusedPair(_join(path, a), _join(path, b), "nn.Sequential"))
        plan.norm_ids.add(id(norm))
        plan.removals.append((seq, b))


def _fuse_by_rule(
    m: nn.Module,
    rule: _Rule,
    path: str,
    paths: dict[int, list[str]],
    plan: _Fusion,
    report: SwapReport,
) -> None:
    cls = type(m).__name__

    def refuse(why: str) -> None:
        report.not_fused.append((path, why))

    if _forward_fingerprint(type(m)) not in rule.fingerprints:
        return refuse(
            f"{cls}.forward is not the version that was verified for fusion "
            "(diffusers 0.42.1); swapped without fusing"
        )
    if (why := _patched(m)) is not None:
        return refuse(why)
    decided = rule.pairs(m)
    if isinstance(decided, str):
        return refuse(decided)
    pairs, moved = decided
    norms, acts = [n for n, _ in pairs], sorted({a for _, a in pairs})
    for attr in norms:
        if type(getattr(m, attr)) is not nn.GroupNorm:
            return refuse(f"{attr} is {type(getattr(m, attr)).__name__}, not nn.GroupNorm")
    for attr in acts:
        if type(getattr(m, attr)) is not nn.SiLU:
            return refuse(f"{attr} is {type(getattr(m, attr)).__name__}, not nn.SiLU")
    for attr in norms + acts + moved:
        sub = getattr(m, attr)
        if attr not in acts and len(paths[id(sub)]) > 1:
            return refuse(f"{attr} is shared ({paths[id(sub)]}): its other uses were not verified")
        if (why := _patched(sub)) is not None:
            return refuse(f"{attr}: {why}")
    moved_paths = tuple(_join(path, attr) for attr in moved)
    for norm, act in pairs:
        plan.pairs.append(FusedPair(_join(path, norm), _join(path, act), cls, moved_paths))
        plan.norm_ids.add(id(getattr(m, norm)))
    plan.removals += [(m, act) for act in acts]
    plan.pre_act += [getattr(m, attr) for attr in moved]
    return None


def _ours(old: nn.GroupNorm, activation: str | None) -> GroupNorm:
    """Our GroupNorm holding ``old``'s very Parameter objects (so an optimizer built on them
    stays valid and :func:`restore_group_norm` keeps what was trained)."""
    new = GroupNorm(
        old.num_groups,
        old.num_channels,
        old.eps,
        old.affine,
        activation=activation,
        **_factory_kwargs(old),
    )
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    new.train(old.training)
    return new


def swap_group_norm(
    model: nn.Module, *, fuse_activation: bool = True, inplace: bool = False
) -> tuple[nn.Module, SwapReport]:
    """Replace every ``torch.nn.GroupNorm`` in ``model`` by :class:`groupnorm.GroupNorm`.

    Same groups, eps and the same Parameter objects, so the outputs are the same (to float
    rounding). With ``fuse_activation=True`` a GroupNorm whose output provably goes straight
    into an ``nn.SiLU`` computes the SiLU itself and the SiLU module becomes ``nn.Identity``:

    * in a plain ``nn.Sequential``, a GroupNorm child followed by an SiLU child;
    * in diffusers' ``ResnetBlock2D`` (norm1 and norm2 -> ``nonlinearity``; its use on the time
      embedding moves into a forward pre-hook of ``time_emb_proj``), the VAE ``Encoder`` and
      ``Decoder`` and ``UNet2DModel`` / ``UNet2DConditionModel`` (``conv_norm_out ->
      conv_act``), each only when its forward is the one verified (see ``_RULES``).

    Subclasses of ``nn.GroupNorm`` are left alone and listed in ``report.skipped``. Returns
    ``(model, report)``, a swapped deep copy unless ``inplace=True``; undo with
    :func:`restore_group_norm`.
    """
    model = _check_model(model, "swap_group_norm")
    target = model if inplace else copy.deepcopy(model)
    paths = _paths_by_module(target)
    report = SwapReport()
    norms: dict[int, nn.GroupNorm] = {}
    for path, m in target.named_modules():
        if type(m) is nn.GroupNorm and (why := _patched(m)) is not None:
            report.skipped.append((path, why))
        elif type(m) is nn.GroupNorm:
            norms[id(m)] = m
        elif isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm):
            report.skipped.append(
                (
                    path,
                    f"{type(m).__name__} subclasses nn.GroupNorm and may "
                    "behave differently; left as it is",
                )
            )

    plan = _Fusion()
    if fuse_activation:
        for path, m in target.named_modules():
            if type(m) is nn.Sequential:
                _fuse_sequential(m, path, paths, plan, report)
            elif rule := _RULE_BY_CLASS.get((type(m).__module__, type(m).__name__)):
                _fuse_by_rule(m, rule, path, paths, plan, report)

    for norm_id, old in norms.items():
        new = _ours(old, "silu" if norm_id in plan.norm_ids else None)
        target = _replace_everywhere(target, paths[norm_id], new, report._undo)
        report.swapped.extend(paths[norm_id])
    for parent, name in plan.removals:
        report._undo.append((parent, name, getattr(parent, name)))
        setattr(parent, name, nn.Identity())
    report._hooks += [m.register_forward_pre_hook(_silu_pre_hook) for m in plan.pre_act]
    report.fused = plan.pairs
    return target, report


def restore_group_norm(model: nn.Module, report: SwapReport) -> nn.Module:
    """Undo :func:`swap_group_norm` on the model it returned; returns the restored model.

    The original modules come back with the Parameter objects the swapped ones used, so
    training done meanwhile is kept; each takes the train/eval mode of the module it replaces.
    """
    if not isinstance(report, SwapReport):
        raise TypeError(
            f"report must be the SwapReport from swap_group_norm, got {type(report).__name__}"
        )
    if report._restored:
        raise ValueError("this SwapReport has already been restored")
    present = {id(m) for m in model.modules()}
    for parent, _, _ in report._undo:
        if id(parent) not in present:
            raise ValueError(
                "this report belongs to another model: swap_group_norm returns a swapped copy "
                "unless inplace=True; restore the model it returned"
            )
    for handle in report._hooks:
        handle.remove()
    for parent, name, old in reversed(report._undo):
        current = getattr(parent, name) if name else parent
        old.train(current.training)
        if name:
            setattr(parent, name, old)
        else:
            model = old
    report._restored = True
    return model
