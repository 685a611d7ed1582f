"""Which GroupNorm -> activation pairs may be fused, and why each other GroupNorm is not.

Fusing makes the norm compute the activation and puts ``nn.Identity`` where the activation
module was, so it is right only where that activation receives this norm's output and nothing
else, and the norm's output goes nowhere else. Two kinds of proof are accepted:

* a trace (:mod:`groupnorm.convert.trace`): every call of the norm feeds one call of one
  activation module, and every call of that module takes a fused norm's output; a call of it on
  anything else must feed a single leaf module, which then applies the activation itself (a
  forward pre-hook), or nothing is fused;
* without a trace, the pinned forwards of a few diffusers classes (``_RULES``), read by hand and
  fingerprinted, so that another version of a forward is not trusted.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import nn

from groupnorm.convert import _walk
from groupnorm.convert.layers import fusible_activation
from groupnorm.convert.trace import Calls


@dataclass(frozen=True)
class FusedPair:
    """A GroupNorm now computing its activation itself, and the activation module removed.

    ``moved_to``: modules that used the same activation elsewhere and now apply it themselves
    (a forward pre-hook), listed so that nothing is hidden. ``rule``: what proved the pair."""

    norm: str
    activation: str
    rule: str
    moved_to: tuple[str, ...] = ()


@dataclass
class Plan:
    """The fusion decided for one model: norm id -> activation name, the activation modules
    to replace by nn.Identity, the modules that take a pre-hook, and why others were not."""

    pairs: list[FusedPair] = field(default_factory=list)
    norm_acts: dict[int, str] = field(default_factory=dict)
    removed: dict[int, nn.Module] = field(default_factory=dict)
    pre_act: dict[int, tuple[nn.Module, str]] = field(default_factory=dict)
    why_not: dict[int, str] = field(default_factory=dict)


_FUNCTIONS: dict[str, Callable[[Any], Any]] = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class ActivationPreHook:
    """A forward pre-hook (``with_kwargs=True``) applying ``activation`` to a module's only
    input, given by position or by name: where an activation module removed by fusion was also
    applied to the input of a module whose forward takes one argument (:func:`one_input`).

    A class, not a closure, so that ``torch.save(model)`` pickles it (and
    :func:`groupnorm.safe_globals` allows it to ``torch.load(weights_only=True)``)."""

    activation: str

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        act = _FUNCTIONS[self.activation]
        if args:
            return (act(args[0]), *args[1:]), kwargs
        (name, value), *rest = kwargs.items()
        return args, {name: act(value), **dict(rest)}


def one_input(m: nn.Module) -> bool:
    """Whether ``m``'s forward takes exactly one argument (no defaults, no ``*args`` or
    ``**kwargs``): then whatever it is called with is that input, by position or by name, and
    an activation moved into it (:class:`ActivationPreHook`) applies to exactly that."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


# ---------------------------------------------------------------------------------------------
# proof by a trace


def by_trace(
    calls: Calls, root: nn.Module, norms: dict[int, nn.Module], paths: dict[int, list[str]]
) -> Plan:
    """Fuse what the trace shows to be safe; every norm not fused gets a reason."""
    plan = Plan()
    of = calls.of(root)
    module_of = {
        k: root.get_submodule(c.path) for k, c in calls.calls.items() if _has(root, c.path)
    }
    act_of: dict[int, int] = {}  # norm id -> activation module id
    for norm_id, norm in norms.items():
        decided = _norm_feeds_one_activation(calls, of, module_of, norm_id, norm, paths)
        if isinstance(decided, str):
            plan.why_not[norm_id] = decided
        else:
            act_of[norm_id] = id(decided)

    # Each norm feeds one activation, so dropping an activation's norms affects no other.
    moves: dict[int, dict[int, nn.Module]] = {}
    for act_id in set(act_of.values()):
        covered = _activation_calls_covered(calls, of, module_of, act_id, act_of, norms)
        if isinstance(covered, dict):
            moves[act_id] = covered
            continue
        for norm_id in [n for n, a in act_of.items() if a == act_id]:
            plan.why_not[norm_id] = covered
            del act_of[norm_id]

    for norm_id, act_id in act_of.items():
        act = next(module_of[k] for k in of[act_id])
        name = fusible_activation(act)
        assert name is not None
        moved = moves.get(act_id, {})
        moved_paths = tuple(p for m in moved.values() for p in paths[id(m)])
        for norm_path in paths[norm_id]:
            plan.pairs.append(
                FusedPair(norm_path, ", ".join(paths[act_id]), calls.how, moved_paths)
            )
        plan.norm_acts[norm_id] = name
        plan.removed[act_id] = act
        for m in moved.values():
            plan.pre_act[id(m)] = (m, name)
    return plan


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _users(calls: Calls, keys: list[str], module_of: dict[str, nn.Module]) -> str:
    named = [
        f"{calls.describe(k)} ({type(module_of[k]).__name__})" if k in module_of else k
        for k in keys
    ]
    return ", ".join(named) or "nothing"


def _norm_feeds_one_activation(
    calls: Calls,
    of: dict[int, list[str]],
    module_of: dict[str, nn.Module],
    norm_id: int,
    norm: nn.Module,
    paths: dict[int, list[str]],
) -> nn.Module | str:
    """The activation module every call of the norm feeds, and only it; or why not."""
    keys = of.get(norm_id, [])
    if not keys:
        return f"not called in the {calls.how}, so nothing is known of what uses its output"
    act: nn.Module | None = None
    for key in keys:
        users = calls.calls[key].users
        user = module_of.get(users[0]) if len(users) == 1 else None
        if user is None or fusible_activation(user) is None:
            what = "its output" if len(keys) == 1 else f"call {keys.index(key) + 1} of {len(keys)}"
            went = _users(calls, users, module_of)
            return f"{what} goes to {went}, not to exactly one nn.SiLU, nn.ReLU or nn.GELU module"
        if act is not None and user is not act:
            return "its calls feed different activation modules"
        act = user
    assert act is not None
    if (why := _walk.patched(norm) or _walk.patched(act)) is not None:
        return why
    return act


def _activation_calls_covered(
    calls: Calls,
    of: dict[int, list[str]],
    module_of: dict[str, nn.Module],
    act_id: int,
    act_of: dict[int, int],
    norms: dict[int, nn.Module],
) -> dict[int, nn.Module] | str:
    """The modules the activation must move into (a pre-hook) so that it can become Identity,
    or why it cannot: each of its calls takes a fused norm's output, or feeds one leaf module
    whose every call takes such an activation call's output."""
    path = calls.calls[of[act_id][0]].path
    moves: dict[int, nn.Module] = {}
    loose: set[str] = set()
    for key in of[act_id]:
        producers = calls.calls[key].producers
        src = module_of.get(producers[0]) if len(producers) == 1 else None
        if src is not None and act_of.get(id(src)) == act_id:
            continue
        if getattr(module_of[key], "inplace", False) and not _read_once(calls, producers, key):
            # In place it also rewrites that input for its other readers (the caller's, for a
            # model input), which a pre-hook applying it later would miss.
            return (
                f"{path} is in place and also applied to {_users(calls, producers, module_of)}, "
                "which may be read elsewhere: it cannot move into a pre-hook"
            )
        users = calls.calls[key].users
        target = module_of.get(users[0]) if len(users) == 1 else None
        if (
            target is None
            or target._modules
            or id(target) in norms
            or _walk.patched(target)
            or not one_input(target)
        ):
            came, went = _users(calls, producers, module_of), _users(calls, users, module_of)
            return (
                f"{path} is also applied to {came}, and its result goes to {went}, not to a "
                "single plain module of one input that could apply it"
            )
        moves[id(target)] = target
        loose.add(key)
    for target_id in moves:
        for key in of[target_id]:
            if not set(calls.calls[key].producers) <= loose:
                return (
                    f"{path} is also applied where {calls.calls[key].path} takes it, and that "
                    "module is called on other inputs too"
                )
    return moves


def _read_once(calls: Calls, producers: list[str], key: str) -> bool:
    """Whether the activation call ``key`` takes one module call's output that nothing else
    reads, so that rewriting it in place matters to no one."""
    source = calls.calls.get(producers[0]) if len(producers) == 1 else None
    return source is not None and source.users == [key]


# ---------------------------------------------------------------------------------------------
# proof by pinned forwards


@dataclass(frozen=True)
class _Rule:
    """A model class whose forward was read and shown to apply ``act`` right after ``norm``.

    ``pairs(module)`` returns the (norm, act) attribute pairs to fuse and the attributes of
    modules whose *input* is the only other use of ``act`` (the SiLU moves into them), or a
    reason not to fuse. ``fingerprints`` are :func:`_walk.forward_fingerprint` of the verified
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
RULES = (
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
_RULE_BY_CLASS = {(r.module, r.name): r for r in RULES}


def by_pinned_forwards(
    root: nn.Module, norms: dict[int, nn.Module], paths: dict[int, list[str]], no_trace: str
) -> Plan:
    """Fuse what the pinned forwards prove; every other norm gets ``no_trace`` or the rule's
    reason as why it was not fused."""
    plan = Plan()
    for path, m in root.named_modules():
        rule = _RULE_BY_CLASS.get((type(m).__module__, type(m).__name__))
        if rule is None:
            continue
        why = _fuse_by_rule(root, m, rule, path, norms, paths, plan)
        if why is not None:
            for child in m.children():
                if id(child) in norms:
                    plan.why_not.setdefault(id(child), f"{type(m).__name__} at {path}: {why}")
    for norm_id in norms:
        if norm_id not in plan.norm_acts:
            plan.why_not.setdefault(norm_id, no_trace)
    return plan


def _fuse_by_rule(
    root: nn.Module,
    m: nn.Module,
    rule: _Rule,
    path: str,
    norms: dict[int, nn.Module],
    paths: dict[int, list[str]],
    plan: Plan,
) -> str | None:
    cls = type(m).__name__
    if _walk.forward_fingerprint(type(m)) not in rule.fingerprints:
        return (
            f"{cls}.forward is not the version that was verified for fusion "
            "(diffusers 0.42.1); swapped without fusing"
        )
    if (why := _walk.patched(m)) is not None:
        return why
    decided = rule.pairs(m)
    if isinstance(decided, str):
        return decided
    pairs, moved = decided
    norm_attrs, acts = [n for n, _ in pairs], sorted({a for _, a in pairs})
    for attr in norm_attrs:
        if id(getattr(m, attr)) not in norms:
            return f"{attr} is {type(getattr(m, attr)).__name__}, not a plain nn.GroupNorm"
    for attr in acts:
        if type(getattr(m, attr)) is not nn.SiLU:
            return f"{attr} is {type(getattr(m, attr)).__name__}, not nn.SiLU"
    for attr in norm_attrs + acts + moved:
        sub = getattr(m, attr)
        if len(paths[id(sub)]) > 1:
            return f"{attr} is shared ({paths[id(sub)]}): its other uses were not verified"
        if (why := _walk.patched(sub)) is not None:
            return f"{attr}: {why}"
    if moved and any(getattr(m, attr).inplace for attr in acts):
        return (
            f"{', '.join(acts)} is in place: moved into a pre-hook of {', '.join(moved)}, it "
            "would no longer rewrite the input it rewrites"
        )
    for attr in moved:
        if not one_input(getattr(m, attr)):
            return f"{attr}'s forward does not take exactly one input, so SiLU cannot move into it"
    if (why := _named_around(root, path, norm_attrs + acts + moved)) is not None:
        return why
    moved_paths = tuple(_walk.join(path, attr) for attr in moved)
    for norm, act in pairs:
        plan.pairs.append(
            FusedPair(_walk.join(path, norm), _walk.join(path, act), cls, moved_paths)
        )
        plan.norm_acts[id(getattr(m, norm))] = "silu"
    for attr in acts:
        plan.removed[id(getattr(m, attr))] = getattr(m, attr)
    for attr in moved:
        plan.pre_act[id(getattr(m, attr))] = (getattr(m, attr), "silu")
    return None


def _named_around(root: nn.Module, path: str, attrs: list[str]) -> str | None:
    """Why the pinned forward of the module at ``path`` does not prove its fusion in ``root``:
    the forward of a module enclosing it (torch's containers aside) names one of ``attrs``, and
    so may call that module itself, around the forward that was read; or that forward's source
    cannot be read. None where neither. (What those forwards call in turn is not read.)"""
    names = re.compile(r"\.(" + "|".join(map(re.escape, attrs)) + r")\b")
    parts = path.split(".") if path else []
    for depth in range(len(parts)):
        forward = type(root.get_submodule(".".join(parts[:depth]))).forward
        if forward.__module__.split(".")[0] == "torch":
            continue
        try:
            source = inspect.getsource(forward)
        except (OSError, TypeError):
            return (
                f"the source of {forward.__qualname__}, around it, cannot be read: its calls "
                f"of {', '.join(attrs)} were not verified"
            )
        if (hit := names.search(source)) is not None:
            return (
                f"{forward.__qualname__}, around it, names .{hit.group(1)} (this block's or "
                "another's): a call of it there was not verified"
            )
    return None
