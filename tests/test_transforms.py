"""The torch path under torch's transforms and tracers, where nn.GroupNorm works: each result is
checked against the float64 reference (inputs with a large offset, so an inexact float32 mean
would show), and against eager where both run."""

from __future__ import annotations

import subprocess
import sys
import warnings
from functools import partial
from typing import Any, Literal

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import groupnorm
from groupnorm import reference as R
from groupnorm.backends import shifted
from groupnorm.functional import resolve_plan
from tests._dropped import dropped_reference
from tests._inputs import make_x, rand, reference
from tests._tolerances import assert_matches, to_numpy

PLANS: dict[str, dict[str, Any]] = {
    "even": {"num_groups": 4},
    "uneven": {"num_groups": 5, "uneven": True},
}


def _x(shape: tuple[int, ...] = (3, 12, 5, 4), layout: str = "nchw", seed: int = 0) -> torch.Tensor:
    return make_x(shape, torch.float32, layout, seed=seed, loc=300.0, std=0.5)


def _expected(x: torch.Tensor, plan_kw: dict, **kw: object):
    return reference(x, resolve_plan(x.shape[1], **plan_kw), **kw)[0]  # type: ignore[arg-type]


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_vmap(plan_name: str) -> None:
    plan_kw = PLANS[plan_name]
    x = _x()
    w = torch.randn(12)
    y = torch.vmap(lambda s: groupnorm.group_norm(s[None], weight=w, **plan_kw)[0])(x)
    assert_matches(y, _expected(x, plan_kw, weight=w), torch.float32)


def test_regression_fx_symbolic_trace_of_the_function() -> None:
    """A model calling groupnorm.group_norm failed under torch.fx.symbolic_trace ("x must be a
    torch.Tensor, got Proxy"), where F.group_norm records one node. Ours does too, with the
    arguments given."""
    weight = rand((12,), torch.float32, 3)

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return groupnorm.group_norm(x, 5, weight, uneven=True, activation="silu") + 1

    graph_module = torch.fx.symbolic_trace(Model())
    calls = [n for n in graph_module.graph.nodes if n.target is groupnorm.group_norm]
    assert len(calls) == 1 and calls[0].kwargs == {"uneven": True, "activation": "silu"}
    x = _x(seed=7)
    expected = _expected(x, {"num_groups": 5, "uneven": True}, weight=weight)
    assert_matches(graph_module(x), R.activation_forward(expected, "silu") + 1, torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_regression_jit_script_without_affine_takes_any_channel_count() -> None:
    """Without affine parameters nn.GroupNorm, and our eager module, normalize any channel
    count num_groups divides; the scripted module indexed with the plan of construction and
    failed ("INDICES element is out of DATA bounds")."""
    scripted = torch.jit.script(groupnorm.GroupNorm(4, 12, affine=False))
    for C in (12, 8, 20):
        x = _x(shape=(2, C, 3, 5), seed=C)
        assert_matches(scripted(x), _expected(x, {"num_groups": 4}), torch.float32)


# forward_ad loads its decompositions through torch.jit.script on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_regression_torch_func_of_the_parameters_with_x_captured(
    plan_name: str, layout: str, dtype: torch.dtype
) -> None:
    """grad, vmap and jvp over weight and bias (an ensemble of norms, x from a frozen layer)
    sent the parameters' wrappers to the fused kernel or its autograd Function ("Cannot access
    data pointer of Tensor that doesn't have storage"), and a channels-last uneven vmap copied
    its batched y into an unbatched tensor. Each now matches the float64 reference."""
    plan_kw = PLANS[plan_name]
    x = make_x((3, 12, 5, 4), dtype, layout, seed=4, loc=300.0, std=0.5)
    plan = resolve_plan(12, **plan_kw)
    w, b = rand((2, 12), dtype, 5), rand((2, 12), dtype, 6)
    y = torch.func.vmap(lambda w, b: groupnorm.group_norm(x, weight=w, bias=b, **plan_kw))(w, b)
    for k in range(2):
        assert_matches(y[k], reference(x, plan, w[k], b[k])[0], dtype)
    module = groupnorm.GroupNorm(num_channels=12, activation="silu", **plan_kw).to(dtype)
    params: dict[str, torch.Tensor] = dict(module.named_parameters())
    dy = rand(tuple(x.shape), dtype, 7)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (torch.func.functional_call(module, p, (x,)) * dy).sum()

    grads = torch.func.grad(loss)(params)
    cache = reference(x, plan, module.weight, module.bias, activation="silu")[1]
    expected = R.group_norm_backward(to_numpy(dy), cache)
    count = x.numel() // 12
    assert_matches(grads["weight"], expected.dgamma, dtype, reduction=count, what="dweight")
    assert_matches(grads["bias"], expected.dbeta, dtype, reduction=count, what="dbias")
    tangent = rand((12,), dtype, 8)
    dy_dw = torch.func.jvp(
        lambda w: groupnorm.group_norm(x, weight=w, **plan_kw), (module.weight,), (tangent,)
    )[1]
    # y is linear in the weight: its tangent is xhat times the weight's tangent.
    xhat = reference(x, plan)[0]
    assert_matches(dy_dw, xhat * to_numpy(tangent)[:, None, None], dtype)


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_meta_and_fake_tensors(plan_name: str) -> None:
    plan_kw = PLANS[plan_name]
    x = _x(layout="channels_last").to("meta")
    y = groupnorm.group_norm(x, activation="silu", **plan_kw)
    assert y.device.type == "meta" and y.shape == x.shape and y.stride() == x.stride()
    m = groupnorm.GroupNorm(**plan_kw, num_channels=12, device="meta")
    assert m(x).shape == x.shape
    with FakeTensorMode():
        fx = torch.empty(3, 12, 5, 4).to(memory_format=torch.channels_last)
        fy = groupnorm.group_norm(fx, **plan_kw)
        assert fy.shape == fx.shape and fy.stride() == fx.stride()


@pytest.mark.parametrize("mode", ["real", "symbolic"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_make_fx(plan_name: str, mode: Literal["real", "symbolic"]) -> None:
    plan_kw = PLANS[plan_name]
    x = _x()
    gm = make_fx(lambda t: groupnorm.group_norm(t, **plan_kw), tracing_mode=mode)(x)
    x2 = _x(seed=1)
    assert_matches(gm(x2), _expected(x2, plan_kw), torch.float32)


@pytest.mark.slow  # an export takes about a second here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_torch_export_program_runs_exactly(plan_name: str, layout: str, dtype: torch.dtype) -> None:
    """torch.export records the export form (each group minus a pivot: an even plan's rows
    their first element, an uneven plan's groups the mean of their first channel);
    the exported program, run by torch with another batch size, holds the tolerance table at a
    large offset and keeps x's dtype and layout."""
    from torch.export import Dim

    plan_kw = PLANS[plan_name]
    module = groupnorm.GroupNorm(num_channels=12, activation="silu", **plan_kw).to(dtype)
    x = make_x((3, 12, 5, 4), dtype, layout, seed=2, loc=300.0, std=0.5)
    program = torch.export.export(module.eval(), (x,), dynamic_shapes=({0: Dim("n")},))
    x2 = make_x((2, 12, 5, 4), dtype, layout, seed=3, loc=300.0, std=0.5)
    with torch.no_grad():
        y = program.module()(x2)
    assert y.dtype == dtype and y.stride() == x2.stride()
    plan = resolve_plan(12, **plan_kw)
    expected = reference(x2, plan, module.weight, module.bias, activation="silu")[0]
    assert_matches(y, expected, dtype)


@pytest.mark.slow  # two exports, about a second each
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_regression_half_channels_last_export_with_a_dynamic_spatial_size(
    dtype: torch.dtype,
) -> None:
    """torch.export with a dynamic batch and height failed on a half-precision channels-last x
    ("Expected op to be '==', got <= for s <= 4096/9"): the eager path's check of whether torch's
    kernel is trusted on x's positions ran before the check that declines graph captures, and
    recorded a guard on the symbolic height that export's solver cannot state."""
    from torch.export import Dim

    module = groupnorm.GroupNorm(2, 4).to(dtype).eval()
    x = make_x((2, 4, 3, 9), dtype, "channels_last", seed=4, loc=20.0)
    dims = ({0: Dim("n", min=1, max=64), 2: Dim("s", min=1, max=512)},)
    program = torch.export.export(nn.Sequential(module), (x,), dynamic_shapes=dims)
    x2 = make_x((5, 4, 100, 9), dtype, "channels_last", seed=5, loc=20.0)
    with torch.no_grad():
        y = program.module()(x2)
    assert y.dtype == dtype
    assert_matches(y, reference(x2, resolve_plan(4, 2), module.weight, module.bias)[0], dtype)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_regression_jit_script_of_a_model_holding_groupnorm_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        groupnorm.GroupNorm(5, 12, uneven=True),
        groupnorm.GroupNormAct(4, 12),
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
    assert list(scripted.state_dict()) == list(model.state_dict())
    # The eager model is left as it was (it held a stand-in module after scripting, which
    # ignored a later change of num_groups).
    assert [type(m) for m in model] == [nn.Conv2d, groupnorm.GroupNorm, groupnorm.GroupNormAct]
    model[2].num_groups = 3  # type: ignore[assignment]
    h = model[1](model[0](x)).detach()
    assert_matches(
        model[2](h),
        _expected(h, {"num_groups": 3}, weight=model[2].weight, activation="silu"),
        torch.float32,
    )
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-5)
    h = model[0](x).detach()
    assert_matches(
        torch.jit.script(model[1])(h),
        _expected(h, {"num_groups": 5, "uneven": True}, weight=model[1].weight, bias=model[1].bias),
        torch.float32,
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_regression_jit_trace_passes_its_own_check(plan_name: str) -> None:
    """torch.jit.trace with its default check failed ("Graphs differed across invocations"):
    the pivot was detached only where x required a gradient, which the check's second trace
    does not. Its argument checks also warned TracerWarnings (an error here)."""
    plan_kw = PLANS[plan_name]
    model = nn.Sequential(nn.Conv2d(12, 12, 1), groupnorm.GroupNorm(num_channels=12, **plan_kw))
    traced = torch.jit.trace(model, torch.randn(3, 12, 5, 4))
    x = _x(seed=3)
    h = model[0](x).detach()
    assert_matches(traced(x), _expected(h, plan_kw), torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")
def test_regression_jit_trace_of_a_module_with_an_edited_num_groups_warns_nothing() -> None:
    """The re-plan after ``m.num_groups = 2`` read the parameters' sizes, which torch.jit.trace
    records as tensors: TracerWarnings (an error here)."""
    module = groupnorm.GroupNorm(4, 12)
    module.num_groups = 2
    traced = torch.jit.trace(module, (torch.randn(3, 12, 5, 4),))
    x = _x(seed=7)
    assert_matches(traced(x), _expected(x, {"num_groups": 2}), torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_regression_jit_trace_of_a_module_without_affine_warns_nothing(plan_name: str) -> None:
    """Without affine parameters the module asks, as nn.GroupNorm does, whether x's channel
    count differs from num_channels: under torch.jit.trace that comparison of a traced size
    warned a TracerWarning (an error here) outside the checks traced quietly."""
    plan_kw = PLANS[plan_name]
    module = groupnorm.GroupNorm(num_channels=12, affine=False, **plan_kw)
    traced = torch.jit.trace(module, (torch.randn(3, 12, 5, 4),))
    x = _x(seed=6)
    assert_matches(traced(x), _expected(x, plan_kw), torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_regression_jit_trace_of_the_function_warns_nothing(plan_name: str) -> None:
    """The module's checks ran without torch.jit.trace's TracerWarnings, the function's did
    not: tracing a model that calls groupnorm.group_norm warned at each check that read x's
    sizes (an error here). The trace runs on other sizes and layouts."""
    plan_kw = PLANS[plan_name]
    weight, bias = rand((12,), torch.float32, 1), rand((12,), torch.float32, 2)

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return groupnorm.group_norm(x, weight=weight, bias=bias, **plan_kw)

    traced = torch.jit.trace(Model(), torch.randn(3, 12, 5, 4))
    for x in (_x(seed=4), _x(shape=(2, 12, 7, 3), layout="channels_last", seed=5)):
        assert_matches(traced(x), _expected(x, plan_kw, weight=weight, bias=bias), torch.float32)


def test_regression_fx_symbolic_trace_of_a_model_holding_groupnorm() -> None:
    """torch.fx traced into our forward (torch.nn's modules are leaves to it, ours was not),
    whose checks refused the Proxy: FX-based tools (feature extractors, quantization) failed
    on a model holding our GroupNorm. Each module is now one node whose arguments print."""
    model = nn.Sequential(
        nn.Conv2d(3, 12, 1),
        groupnorm.GroupNorm(4, 12),
        groupnorm.GroupNormAct(5, 12, uneven=True),
    )
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    assert [n.args[1] for n in calls] == [[3, 3, 3, 3], [3, 3, 2, 2, 2]]
    x = _x(shape=(3, 3, 5, 4), seed=5)
    h = model[1](model[0](x)).detach()
    expected = _expected(h, {"num_groups": 5, "uneven": True}, weight=model[2].weight)
    assert_matches(graph_module(x), R.activation_forward(expected, "silu"), torch.float32)
    model[1].process_group = object()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="torch.fx cannot record a GroupNorm with process_group"):
        torch.fx.symbolic_trace(model)


# forward_ad loads its decompositions through torch.jit.script on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forward_mode_ad(layout: str) -> None:
    """jvp against the float64 finite difference of the reference; torch's own kernel has no
    forward derivative for channels-last input on the CPU (its view fails)."""
    import torch.autograd.forward_ad as fwAD

    x = make_x((2, 8, 4, 3), torch.float64, layout, seed=2)
    t = make_x((2, 8, 4, 3), torch.float64, layout, seed=3)
    with fwAD.dual_level():
        y = groupnorm.group_norm(fwAD.make_dual(x, t), 4, activation="silu")
        tangent = fwAD.unpack_dual(y).tangent
    h = 1e-6
    plus = reference(x + h * t, resolve_plan(8, 4), activation="silu")[0]
    minus = reference(x - h * t, resolve_plan(8, 4), activation="silu")[0]
    torch.testing.assert_close(
        tangent, torch.from_numpy((plus - minus) / (2 * h)), rtol=1e-6, atol=1e-7
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("loc", [0.0, 2.0, 50.0])
def test_forward_mode_ad_float32_holds_the_bound(layout: str, loc: float) -> None:
    """float32 tangents of x, weight and bias at offsets past every trust limit, against the
    float64 central difference of the reference at the same values, within the float32 bound
    (a tangent of y sums over each group: dx's reduction)."""
    import torch.autograd.forward_ad as fwAD

    N, C, G = 3, 24, 6
    plan = resolve_plan(C, G)
    for seed in range(4):
        x = make_x((N, C, 8, 8), torch.float32, layout, seed=seed, loc=loc, std=1.0)
        w, b = rand((C,), torch.float32, seed + 1), rand((C,), torch.float32, seed + 2)
        tx = make_x((N, C, 8, 8), torch.float32, layout, seed=seed + 3, loc=0.0, std=1.0)
        tw, tb = rand((C,), torch.float32, seed + 4), rand((C,), torch.float32, seed + 5)
        with fwAD.dual_level():
            duals = (fwAD.make_dual(t, d) for t, d in ((x, tx), (w, tw), (b, tb)))
            tangent = fwAD.unpack_dual(groupnorm.group_norm(next(duals), G, *duals)).tangent
        h = 1e-7
        xd, wd, bd, txd, twd, tbd = (t.double() for t in (x, w, b, tx, tw, tb))
        plus = reference(xd + h * txd, plan, wd + h * twd, bd + h * tbd)[0]
        minus = reference(xd - h * txd, plan, wd - h * twd, bd - h * tbd)[0]
        assert_matches(tangent, (plus - minus) / (2 * h), torch.float32, reduction=C // G * 64)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_compile_dynamic_fullgraph(plan_name: str) -> None:
    """torch.compile(dynamic=True, fullgraph=True) of the module and the function, two batch
    sizes (the second reuses the graph) and a float eps (symbolic under dynamic=True)."""
    plan_kw = PLANS[plan_name]
    torch._dynamo.reset()
    m = groupnorm.GroupNorm(**plan_kw, num_channels=12)
    cm = torch.compile(m, dynamic=True, fullgraph=True)
    cf = torch.compile(
        lambda t, eps: groupnorm.group_norm(t, **plan_kw, eps=eps), dynamic=True, fullgraph=True
    )
    for n in (2, 3):
        x = _x((n, 12, 5, 4), "channels_last", seed=n)
        assert_matches(cm(x), _expected(x, plan_kw), torch.float32)
        assert_matches(cf(x, 1e-3), _expected(x, plan_kw, eps=1e-3), torch.float32)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_compile_uneven_plan_with_varying_channels() -> None:
    torch._dynamo.reset()
    cf = torch.compile(
        lambda t: groupnorm.group_norm(t, 5, uneven=True), dynamic=True, fullgraph=True
    )
    for C in (12, 13, 17):
        x = _x((2, C, 3, 3), seed=C)
        assert_matches(cf(x), _expected(x, {"num_groups": 5, "uneven": True}), torch.float32)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_compile_single_element_groups() -> None:
    """Eager warns about single-element groups; compiled, the warning is skipped, not a break."""
    torch._dynamo.reset()
    cf = torch.compile(lambda t, b: groupnorm.group_norm(t, 8, bias=b), fullgraph=True)
    x, b = torch.randn(2, 8), torch.randn(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", groupnorm.SingleElementGroupWarning)
        torch.testing.assert_close(cf(x, b), b.expand(2, 8))


def _graph_ops(model: nn.Module, x: torch.Tensor, train: bool) -> tuple[int, int]:
    """(ATen ops make_fx records, ops of the FX graph Dynamo captures), forward."""
    model.train(train)
    with torch.set_grad_enabled(train):
        gm = make_fx(model)(x)
        aten = sum(1 for n in gm.graph.nodes if n.op == "call_function")
        counts: list[int] = []

        def backend(g: torch.fx.GraphModule, example: object) -> Any:
            kinds = ("call_function", "call_method", "call_module")
            counts.append(sum(1 for n in g.graph.nodes if n.op in kinds))
            return g.forward

        torch._dynamo.reset()
        torch.compile(model, backend=backend, fullgraph=True)(x)
    return aten, counts[0]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_resnet_graph_within_twice_nn_groupnorm() -> None:
    """Regression: the pivot, gathered per run with repeat_interleave, traced a ResNet to 3x
    nn.GroupNorm's ATen ops. Within 2x at both levels, with and without grad (Dynamo's graph
    holds one op more per layer on a float32 CPU input: the fused kernel's op and the getitem
    of its y)."""
    from groupnorm.study.models import ResNet

    x = torch.randn(2, 3, 16, 16)
    ours_net = ResNet(lambda c: groupnorm.GroupNorm(8, c), blocks=2)
    theirs_net = ResNet(lambda c: nn.GroupNorm(8, c), blocks=2)
    layers = sum(isinstance(m, groupnorm.GroupNorm) for m in ours_net.modules())
    for train in (False, True):
        ours, theirs = _graph_ops(ours_net, x, train), _graph_ops(theirs_net, x, train)
        assert ours[0] <= 2 * theirs[0] and ours[1] <= 2 * theirs[1], (train, ours, theirs)
        assert ours[1] == theirs[1] + layers, (train, ours, theirs)


def test_regression_import_loads_neither_dynamo_nor_triton() -> None:
    """Registering the compiled pivot with torch.compiler.allow_in_graph imported Dynamo, and
    with it Triton, on ``import groupnorm``: 1.3 s, and Triton compiled before a test could
    switch on its interpreter."""
    code = "import sys, groupnorm; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out


def test_regression_compiled_even_pivot_is_not_a_gather() -> None:
    """Inductor inlined the pivot's gather through the plan's first-channel index into every
    reduction as an indirect load per vector iteration: a compiled ResNet-20 training step took
    84 ms against 53 eager. Under torch.compile the pivot is one node of Dynamo's graph (the
    op ``groupnorm::pivot``, no detach left outside it) whose ops an even plan makes the mean of
    a strided slice, repeated (affine loads); an uneven plan's gathers the channels' means, an
    (N, C) tensor, not x. Exact against
    float64, forward and backward (no gradient through the pivot), on bfloat16 x: compiled
    float32 CPU calls take the fused kernel's ops."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(g: torch.fx.GraphModule, example: object) -> Any:
        graphs.append(g)
        return g.forward

    cases: list[tuple[dict[str, Any], int, list[int]]] = [
        ({"num_groups": 4}, 2, [0, 0, 2, 2, 4, 4, 6, 6]),
        ({"num_groups": 3, "uneven": True}, 0, [0, 0, 0, 3, 3, 3, 6, 6]),
    ]
    for kw, size, first in cases:
        graphs.clear()
        torch._dynamo.reset()
        # Half precision: compiled CPU calls that take the pivot path (float32 takes the ops).
        x = make_x((2, 8, 5, 4), torch.bfloat16, "strided", loc=10.0).requires_grad_()
        y = torch.compile(lambda t, kw=kw: groupnorm.group_norm(t, **kw), backend=backend)(x)
        targets = [str(n.target) for n in graphs[0].graph.nodes if n.op != "placeholder"]
        assert targets.count("groupnorm.pivot") == 1, targets
        assert "detach" not in targets and "repeat_interleave" not in targets, targets
        pivot = partial(shifted._compiled_pivot, first=torch.tensor(first), size=size)
        ops = {n.target for n in make_fx(pivot)(x.detach()).graph.nodes}
        assert torch.ops.aten.index.Tensor not in ops, ops
        assert (torch.ops.aten.index_select.default in ops) == (size == 0), ops
        plan = resolve_plan(8, **kw)
        expected, cache = reference(x, plan)
        assert_matches(y, expected, torch.bfloat16)
        dy = rand(tuple(x.shape), torch.bfloat16, 5)
        y.backward(dy)
        grads = R.group_norm_backward(to_numpy(dy), cache)
        reduction = max(plan.sizes) * 20
        assert_matches(x.grad, grads.dx, torch.bfloat16, reduction=reduction, what="dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_regression_a_plain_x_inside_a_torch_func_transform(
    dtype: torch.dtype, layout: str
) -> None:
    """A plain x captured inside torch.func.grad, the transform differentiating something else,
    crashed in the fused CPU kernel ("Cannot access data pointer of Tensor that doesn't have
    storage"): its output, allocated at the transform's level, came back wrapped."""
    x = make_x((2, 8, 3, 3), dtype, layout, seed=5, loc=3.0)
    module = groupnorm.GroupNorm(4, 8).to(dtype)
    plan = resolve_plan(8, 4)
    mask = torch.rand((2, 1, 3, 3), generator=torch.Generator().manual_seed(6)) > 0.3
    calls = {
        "function": (lambda: groupnorm.group_norm(x, 4), reference(x, plan)[0]),
        "module": (lambda: module(x), reference(x, plan)[0]),
        "masked": (
            lambda: groupnorm.group_norm(x, 4, mask=mask),
            to_numpy(dropped_reference(x.double(), plan, mask)),
        ),
    }
    for what, (call, expected) in calls.items():

        def loss(s: torch.Tensor, call: Any = call) -> tuple[torch.Tensor, torch.Tensor]:
            y = call()
            return (s * y.double()).sum(), y

        ds, y = torch.func.grad(loss, has_aux=True)(torch.tensor(1.0, dtype=torch.float64))
        assert_matches(y, expected, dtype, what=what)
        torch.testing.assert_close(ds, y.double().sum())
        y_vmapped = torch.func.vmap(lambda s, call: s * call(), in_dims=(0, None))(
            torch.ones(2, dtype=dtype), call
        )
        assert_matches(y_vmapped[1], expected, dtype, what=f"{what} under vmap")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # jvp's decompositions
def test_regression_nested_torch_func_transforms_leave_no_wrapped_index_behind() -> None:
    """The plan's index tensors were built, and kept, inside the transform that first needed
    them: under grad a factory call returns a tensor wrapped at the transform's level, so after
    grad(grad(...)) every later torch.func call on the plan failed an internal assert ("level
    ... escaped?")."""
    plan = resolve_plan(6, 3)
    plan.index_cache.clear()
    x = make_x((2, 6, 3, 3), torch.float64, seed=7)

    def second(f: Any) -> torch.Tensor:
        inner = torch.func.grad(lambda u: f(u, 3).pow(2).sum())
        return torch.func.grad(lambda t: inner(t).pow(2).sum())(x)

    expected = second(torch.nn.functional.group_norm)  # torch's float64 ops, not ours
    for _ in range(2):
        assert_matches(second(groupnorm.group_norm), to_numpy(expected), torch.float64)
    dx = torch.func.grad(lambda t: groupnorm.group_norm(t, 3).pow(2).sum())(x)
    dx_torch = torch.func.grad(lambda t: torch.nn.functional.group_norm(t, 3).pow(2).sum())(x)
    assert_matches(dx, to_numpy(dx_torch), torch.float64)
    # along a constant shift of every element y does not change
    tangent = torch.func.jvp(lambda t: groupnorm.group_norm(t, 3), (x,), (torch.ones_like(x),))[1]
    assert_matches(tangent, np.zeros(x.shape), torch.float64)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    assert not any(wrapped(t) for t in plan.index_cache[torch.device("cpu")])  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.(save|load)` is deprecated")
@pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level")
def test_regression_fx_graphs_holding_groupnorm_pickle_and_script() -> None:
    """A torch.fx graph of our modules failed to pickle ("'str' object has no attribute
    '__name__'": forward's annotation was the string 'torch.Tensor', modules.py having
    `from __future__ import annotations`) and to script ("Expression of type dots cannot be
    used in a type expression": fx_group_norm's tuple[int, ...]); nn.GroupNorm's do both."""
    import io
    import pickle

    from groupnorm.convert import GroupNormDropAct

    weight, bias = torch.rand(12) + 0.5, torch.randn(12)
    for plan_kw, module in (
        ({"num_groups": 4}, groupnorm.GroupNorm(4, 12)),
        ({"num_groups": 5, "uneven": True}, groupnorm.GroupNormAct(5, 12, uneven=True)),
        ({"num_groups": 4}, GroupNormDropAct(4, 12, act=nn.SiLU())),
    ):
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        x = _x(seed=6)
        expected = _expected(x, plan_kw, weight=weight, bias=bias)
        if module.activation is not None or isinstance(module, GroupNormDropAct):
            expected = R.activation_forward(expected, "silu")
        for root in (module, nn.Sequential(nn.Identity(), module)):
            graph_module = torch.fx.symbolic_trace(root)
            assert_matches(pickle.loads(pickle.dumps(graph_module))(x), expected, torch.float32)
            scripted = torch.jit.script(graph_module)
            assert_matches(scripted(x), expected, torch.float32)
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
            buf.seek(0)
            assert_matches(torch.jit.load(buf)(x), expected, torch.float32)
