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

import warnings
from collections.abc import Iterable
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


def _kept(model: nn.Module) -> list[tuple[nn.Module, str, Any, Any]]:
    """Every module attribute that a forward could change: (module, name, value, a shallow copy
    of a list's or dict's items, else None)."""
    state = []
    for m in model.modules():
        for name, value in vars(m).items():
            if name in _MACHINERY or "hooks" in name:
                continue
            items: list[Any] | dict[Any, Any] | None = None
            if isinstance(value, list):
                items = list(value)
            elif isinstance(value, dict):
                items = dict(value)
            state.append((m, name, value, items))
    return state


def _traced(value: Any) -> bool:
    """A value made by a trace: an fx Proxy, or a fake or functional tensor of torch.export."""
    if isinstance(value, fx.Proxy):
        return True
    return isinstance(value, torch.Tensor) and type(value).__name__ in (
        "FakeTensor",
        "FunctionalTensor",
    )


def _check_kept(model: nn.Module, before: list[tuple[nn.Module, str, Any, Any]], how: str) -> None:
    """Raise :class:`SideEffect` where the trace left a traced value in a module's attributes
    (in it, or in a list or dict it holds), after putting every attribute back as it was."""
    found = []
    for m, name, _, _ in before:
        value = getattr(m, name, None)
        inside = list(value.values()) if isinstance(value, dict) else value
        if _traced(value) or (isinstance(inside, list) and any(map(_traced, inside))):
            found.append(f"{type(m).__name__}.{name}")
    known = {(id(m), name) for m, name, _, _ in before}
    found += [
        f"{type(m).__name__}.{name}"
        for m in model.modules()
        for name, value in vars(m).items()
        if (id(m), name) not in known and _traced(value)
    ]
    if not found:
        return
    for m, name, value, items in before:
        if isinstance(items, list):
            value[:] = items
        elif isinstance(items, dict):
            value.clear()
            value.update(items)
        m.__dict__[name] = value
    raise SideEffect(
        f"the forward keeps a value the {how} made in {', '.join(found)}: it does more than a "
        "trace shows"
    )


def from_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Calls:
    """The module calls of ``model(*args, **kwargs)`` as torch.export records them; raises
    :class:`SideEffect` where the forward keeps a traced tensor in the model."""
    before = _kept(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ep = torch.export.export(model, args, kwargs, strict=False)
    _check_kept(model, before, "torch.export")
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
    before = _kept(model)
    graph = _LeafTracer(leaves).trace(model)
    _check_kept(model, before, "torch.fx trace")
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
