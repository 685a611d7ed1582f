"""Which module call feeds which, read from a trace of the model's forward.

Fusion needs one fact the module tree does not hold: that an activation module is the only
consumer of a norm's output. A trace records every call of every module and where each call's
output goes. Two traces are read, both into :class:`Calls`:

* ``torch.export`` (non-strict) on an example input: the forward as it runs on that input,
  every module call recorded in each node's ``nn_module_stack`` (a module called twice has two
  calls); branches the input does not take are not seen;
* ``torch.fx.symbolic_trace`` without an input: the forward for every input, where the code has
  no branch on values (fx refuses code that has).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import (
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    MutableSequence,
    MutableSet,
)
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn


@dataclass
class Call:
    """One call of the module at ``path``: what produced its inputs and what uses its output.

    Entries are keys of other calls in :class:`Calls`, or descriptions of what is not a module
    call (an op in the parent's forward, the model's input or output)."""

    path: str
    producers: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)


@dataclass
class Calls:
    """Every recorded module call, by key; ``how`` says which trace recorded them."""

    how: str
    calls: dict[str, Call]

    def of(self, root: nn.Module) -> dict[int, list[str]]:
        """id(module) -> keys of its calls (a shared module's calls come through any path)."""
        by_module: dict[int, list[str]] = {}
        for key, call in self.calls.items():
            try:
                m = root.get_submodule(call.path)
            except AttributeError:
                continue
            by_module.setdefault(id(m), []).append(key)
        return by_module

    def describe(self, entry: str) -> str:
        call = self.calls.get(entry)
        return entry if call is None else (call.path or "<root>")


def _add_unique(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack)) if stack else None


class SideEffect(Exception):
    """The forward kept a traced value in a module's attributes: it does more than the trace
    shows (a feature cache, say), and a fused output would be kept there too."""


# A module's own machinery, not its state.
_MACHINERY = {"_parameters", "_buffers", "_modules", "training"}
# How far into the lists, tuples, dicts, sets and plain objects a module holds a forward's kept
# values are looked for, and how many containers (and items a level) at most: a model may hold
# large configs.
_DEPTH = 4
_MOST = 10_000


# Objects with a __dict__ that hold code, not state.
_NOT_STATE = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
)


def _state(m: nn.Module) -> dict[str, Any]:
    """The attributes of ``m`` that a forward could change."""
    return {k: v for k, v in vars(m).items() if k not in _MACHINERY and "hooks" not in k}


def _contents(value: Any) -> tuple[Any, list[Any]] | None:
    """(a shallow copy of what a mutable container, plain object or unregistered module holds,
    or None for tuples and frozensets; its items to look into), or None for anything else."""
    if isinstance(value, nn.Module):  # held in a list, say, so not among model.modules()
        state = _state(value)
        return state, list(state.values())
    if isinstance(value, (tuple, frozenset)):
        return None, list(value)
    if isinstance(value, MutableMapping):
        return dict(value), [*value.keys(), *value.values()]
    if isinstance(value, MutableSequence):  # lists, deques
        return list(value), list(value)
    if isinstance(value, MutableSet):
        return set(value), list(value)
    if isinstance(value, (torch.Tensor, fx.Proxy, *_NOT_STATE)):
        return None
    if type(value).__module__ == "builtins":
        return None
    fields = _fields(value)
    return None if fields is None else (fields, list(fields.values()))


def _fields(value: Any) -> dict[str, Any] | None:
    """An object's attributes: its __dict__ and its __slots__ that are set; None where it has
    neither."""
    slots = [n for c in type(value).__mro__ for n in getattr(c, "__slots__", ()) if n != "__dict__"]
    if not slots and not hasattr(value, "__dict__"):
        return None
    fields = {n: getattr(value, n) for n in slots if n != "__weakref__" and hasattr(value, n)}
    return fields | dict(getattr(value, "__dict__", {}))


def _reachable(values: Iterable[Any], seen: set[int]) -> Iterator[tuple[Any, Any, Any]]:
    """(value, its copy or None, its items) for each container and plain object reachable from
    ``values`` within _DEPTH levels and not in ``seen`` (which collects them), at most _MOST,
    and of each level's items the first _MOST."""
    level = list(values)
    for _ in range(_DEPTH):
        below: list[Any] = []
        for value in level:
            got = _contents(value)
            if got is None or id(value) in seen or len(seen) >= _MOST:
                continue
            seen.add(id(value))
            yield value, got[0], got[1]
            below.extend(got[1][: _MOST - len(below)])
        level = below


Kept = tuple[list[tuple[nn.Module, dict[str, Any]]], list[tuple[Any, Any]]]


def _kept(model: nn.Module) -> Kept:
    """What a forward could change in the model: each module's attributes, and a shallow copy
    of each container and plain object they hold (to put back after a trace)."""
    modules = [(m, _state(m)) for m in model.modules()]
    held = [v for _, attrs in modules for v in attrs.values()]
    return modules, [(v, copy) for v, copy, _ in _reachable(held, set()) if copy is not None]


def _traced(value: Any) -> bool:
    """A value made by a trace: an fx Proxy, or a fake or functional tensor of torch.export."""
    if isinstance(value, fx.Proxy):
        return True
    return isinstance(value, torch.Tensor) and type(value).__name__ in (
        "FakeTensor",
        "FunctionalTensor",
    )


def _same(now: Any, copy: Any) -> bool:
    """Whether a container, object or module still holds exactly (by identity) what ``copy``
    holds."""
    if isinstance(copy, dict):
        held = _state(now) if isinstance(now, nn.Module) else now
        held = held if isinstance(held, Mapping) else (_fields(held) or {})
        return held.keys() == copy.keys() and all(held[k] is v for k, v in copy.items())
    if isinstance(copy, set):
        return now == copy
    return len(now) == len(copy) and all(a is b for a, b in zip(now, copy, strict=True))


def _put_back(before: Kept) -> None:
    """Every module attribute as it was (those a forward added removed), then the contents of
    every container, object and unregistered module they held."""
    modules, held = before
    for m, attrs in modules:
        _put_back_state(m, attrs)
    for value, copy in held:
        if _same(value, copy):
            continue  # untouched: a frozen container (diffusers' FrozenDict) is left alone
        if isinstance(value, nn.Module):
            _put_back_state(value, copy)
        elif isinstance(value, MutableSequence):
            value.clear()
            value.extend(copy)
        elif isinstance(value, MutableMapping):
            value.clear()
            value.update(copy)
        elif isinstance(value, MutableSet):
            value.clear()
            value |= copy
        else:
            for name in (_fields(value) or {}).keys() - copy.keys():
                delattr(value, name)
            for name, v in copy.items():
                object.__setattr__(value, name, v)


def _put_back_state(m: nn.Module, attrs: dict[str, Any]) -> None:
    for name in _state(m).keys() - attrs.keys():
        del m.__dict__[name]
    m.__dict__.update(attrs)


@contextlib.contextmanager
def _put_back_after(model: nn.Module) -> Iterator[None]:
    """The model as it was before the block (a trace) once it ends, successfully or not: a
    trace that fails part way (fx at a branch on values) may have kept values already."""
    before = _kept(model)
    try:
        yield
    finally:
        _put_back(before)


def _traced_in(model: nn.Module) -> list[str]:
    """The module attributes that hold a traced value: in them, or in the lists, tuples, dicts,
    sets, objects and unregistered modules they hold."""
    found = []
    seen: set[int] = set()  # a container two attributes hold is searched once
    for m in model.modules():
        for name, value in _state(m).items():
            inside = (v for _, _, items in _reachable([value], seen) for v in items)
            if _traced(value) or any(map(_traced, inside)):
                found.append(f"{type(m).__name__}.{name}")
    return found


def _raise_if_kept(found: list[str], how: str) -> None:
    """Raise :class:`SideEffect` where the trace left a traced value in the model
    (``found``: :func:`_traced_in`'s names)."""
    if found:
        raise SideEffect(
            f"the forward keeps a value the {how} made in {', '.join(dict.fromkeys(found))}: it "
            "does more than a trace shows"
        )


def from_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Calls:
    """The module calls of ``model(*args, **kwargs)`` as torch.export records them; raises
    :class:`SideEffect` where the forward keeps a traced tensor in the model."""
    # Looked for as the forward returns too: export itself puts some back (a deque's items, a
    # dict's keys) before it returns.
    found: list[str] = []
    look = model.register_forward_hook(lambda *_: found.extend(_traced_in(model)))
    try:
        with warnings.catch_warnings(record=True) as caught, _put_back_after(model):
            warnings.simplefilter("always")
            ep = torch.export.export(model, args, kwargs, strict=False)
            found += _traced_in(model)
    finally:
        look.remove()
    _raise_if_kept(found, "torch.export")
    # torch.export puts such attributes back itself, and warns "The tensor attribute
    # self.feats[0] was assigned during export" of each.
    kept = []
    for w in caught:
        text = str(w.message)
        if " was assigned during export" in text:
            kept.append(text.split(" was assigned")[0].removeprefix("The tensor attribute "))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if kept:
        raise SideEffect(
            f"the forward keeps a tensor torch.export made in {', '.join(kept)}: it does more "
            "than a trace shows"
        )
    sig = ep.graph_signature
    state = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    state |= set(sig.inputs_to_lifted_tensor_constants)
    calls: dict[str, Call] = {}
    owner: dict[fx.Node, str] = {}
    for node in ep.graph.nodes:
        key = _innermost(node)
        if key is not None and node.op == "call_function":
            owner[node] = key
            calls.setdefault(key, Call(node.meta["nn_module_stack"][key][0]))

    def what(node: fx.Node) -> str:
        if node in owner:
            return owner[node]
        if node.op == "output":
            return "the model's output"
        if node.op == "placeholder":
            return f"the model's input {node.name}"
        return f"the op {node.target}"

    for node, key in owner.items():
        for inp in node.all_input_nodes:
            if owner.get(inp) != key and inp.name not in state:
                _add_unique(calls[key].producers, what(inp))
        for user in node.users:
            if owner.get(user) != key:
                _add_unique(calls[key].users, what(user))
    # An op of the parent's own forward is recorded under the parent's call: name it as such.
    for call in calls.values():
        for entries in (call.producers, call.users):
            for i, e in enumerate(entries):
                if e in calls and _is_ancestor(calls[e].path, call.path):
                    entries[i] = f"an op in the forward of {calls[e].path or '<root>'}"
    return Calls("torch.export on the example input", calls)


def _is_ancestor(parent: str, path: str) -> bool:
    return parent == "" or path.startswith(parent + ".")


# Modules that compute one op on their input, subclasses included (ours, timm's): leaves, so
# that fx need not trace their forwards, whose argument checks branch on shapes.
ONE_OP = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd)


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with ``leaves`` and every norm and conv as leaf modules, and
    nn.Identity traced through (it computes nothing, so it must not stand between a norm and
    its activation)."""

    def __init__(self, leaves: Iterable[nn.Module]) -> None:
        super().__init__()
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Identity:
            return False
        if id(m) in self._leaves or isinstance(m, ONE_OP):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def from_fx(model: nn.Module, leaves: Iterable[nn.Module]) -> Calls:
    """The module calls of ``model``'s forward as torch.fx's symbolic trace records them;
    raises :class:`SideEffect` where the forward keeps a traced value in the model."""
    with _put_back_after(model):
        graph = _LeafTracer(leaves).trace(model)
        found = _traced_in(model)
    _raise_if_kept(found, "torch.fx trace")
    calls: dict[str, Call] = {}

    def what(node: fx.Node) -> str:
        if node.op == "call_module":
            return node.name
        if node.op == "output":
            return "the model's output"
        if node.op == "placeholder":
            return f"the model's input {node.name}"
        return f"the op {getattr(node.target, '__name__', node.target)}"

    for node in graph.nodes:
        if node.op != "call_module":
            continue
        assert isinstance(node.target, str)
        call = calls.setdefault(node.name, Call(node.target))
        for inp in node.all_input_nodes:
            _add_unique(call.producers, what(inp))
        for user in node.users:
            _add_unique(call.users, what(user))
    return Calls("torch.fx symbolic trace", calls)
