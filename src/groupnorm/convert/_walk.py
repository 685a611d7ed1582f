"""The walk shared by the surgery functions: paths of (shared) modules, replacing a module at
every path, and the checks that say a module cannot be replaced without changing what runs."""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import inspect
import textwrap
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from groupnorm.functional import check_flag


def paths_by_module(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every path it is reachable at (a shared module has several)."""
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    return paths


def split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check_model(model: object, what: str) -> nn.Module:
    """``model`` as a Module, or a TypeError; DistributedDataParallel anywhere is refused."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{what} got a TorchScript module (from torch.jit.script or torch.jit.trace), whose "
            f"submodules are compiled and cannot be replaced: call {what} on the eager model, "
            "then script or trace the result"
        )
    for path, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise TypeError(
                f"{what} got a model holding a TorchScript module at {path!r}, whose submodules "
                f"are compiled and cannot be replaced: call {what} on its eager form"
            )
        if isinstance(m, nn.parallel.DistributedDataParallel):
            where = "the model" if not path else f"submodule {path!r}"
            raise TypeError(
                f"{what} got a model in which {where} is wrapped in DistributedDataParallel. DDP "
                "has already registered the parameters it all-reduces, so replacing modules "
                f"underneath it would desynchronize it. Call {what} on the plain model before "
                f"wrapping: ddp = DistributedDataParallel({what}(model)[0], ...)."
            )
    return model


def uninitialized(m: nn.Module) -> bool:
    """Whether ``m`` is a lazy module whose shapes are not known yet."""
    lazy = isinstance(m, nn.modules.lazy.LazyModuleMixin)
    return lazy and bool(m.has_uninitialized_params())  # type: ignore[operator]


def _computed_tensor(m: nn.Module) -> str | None:
    """The name of a tensor attribute of ``m`` that autograd computed (not a leaf), or None:
    what pruning (``torch.nn.utils.prune``) and the old ``weight_norm`` leave as ``weight``
    between forwards, and what torch refuses to deep-copy."""
    for name, value in vars(m).items():
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            return name
    return None


def target_of(model: nn.Module, inplace: bool, what: str) -> nn.Module:
    """``model`` itself, or a deep copy: one with an uninitialized lazy module, or a tensor
    attribute autograd computed (pruning's, weight_norm's), cannot be copied (torch refuses),
    which is said before anything is done."""
    if check_flag("inplace", inplace):
        return model
    for path, m in model.named_modules():
        where = f"{path or 'the model'} ({type(m).__name__})"
        if uninitialized(m):
            raise ValueError(
                f"{what} works on a copy of the model, and {where} is uninitialized, which torch "
                "cannot copy: run one forward first, or pass inplace=True to change the model "
                "itself"
            )
        computed = _computed_tensor(m)
        if computed is not None:
            raise ValueError(
                f"{what} works on a copy of the model, and {where}.{computed} is a tensor "
                "computed by autograd (torch.nn.utils.prune or weight_norm leave one), which "
                "torch cannot copy: pass inplace=True to change the model itself, or make the "
                "change permanent first (prune.remove, remove_weight_norm)"
            )
    return copy.deepcopy(model)


@contextlib.contextmanager
def replacing(what: str, path: str, m: nn.Module) -> Iterator[None]:
    """Names the module whose replacement was being built in a ValueError raised inside (an
    eps or a shape GroupNorm refuses)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(
            f"{what} cannot replace {path or 'the model'} ({type(m).__name__}): {e}"
        ) from None


def factory_kwargs(m: nn.Module) -> dict[str, Any]:
    """device and dtype of the module's first floating tensor (None, None when it has none)."""
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": None, "dtype": None}


def patched(m: nn.Module) -> str | None:
    """Why ``m`` cannot be replaced or fused without changing what runs, or None.

    Hooks and a forward replaced on the instance (as offloading wrappers do) belong to this
    object and would not move to its replacement; a hook on a norm would see a fused output."""
    if "forward" in m.__dict__:
        return f"{type(m).__name__} has its forward replaced on the instance"
    if any((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)):
        return f"{type(m).__name__} has hooks registered on it"
    return None


def replace_everywhere(
    root: nn.Module,
    paths: list[str],
    new: nn.Module,
    undo: list[tuple[nn.Module, str, nn.Module, nn.Module]] | None = None,
) -> nn.Module:
    """Put ``new`` at every path (the root path "" replaces the root: returned). ``undo`` gets
    ``(parent, name, old, new)`` per replacement; for the root, ``(new root, "", old root,
    new root)``."""
    for path in paths:
        if path == "":
            if undo is not None:
                undo.append((new, "", root, new))
            root = new
            continue
        parent_path, name = split(path)
        parent = root.get_submodule(parent_path)
        if undo is not None:
            undo.append((parent, name, getattr(parent, name), new))
        setattr(parent, name, new)
    return root


def forward_fingerprint(cls: type) -> str | None:
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


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"
