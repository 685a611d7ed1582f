"""ONNX: models holding our GroupNorm export with ``torch.onnx.export`` (the default dynamo
exporter) and run in onnxruntime with the outputs of PyTorch and of the float64 reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from groupnorm import GroupNorm, GroupNormAct, swap_group_norm
from groupnorm.groups import GroupPlan
from tests._inputs import make_x, rand, reference
from tests._tolerances import assert_matches, to_numpy

ort = pytest.importorskip("onnxruntime", reason="onnxruntime comes with the dev extra")
pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")

pytestmark = [
    pytest.mark.slow,  # every export traces and compiles a graph: seconds each
    pytest.mark.filterwarnings(
        # torch 2.13's torch.export deep-copies a pytree LeafSpec, and that copy trips torch's
        # own deprecation check of `isinstance(treespec, LeafSpec)`; nothing of ours is involved.
        r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
    ),
]


def _export(model: nn.Module, *args: torch.Tensor, **kwargs: Any) -> Any:
    """``model`` (eval mode) exported with the dynamo exporter: the ONNXProgram."""
    program = torch.onnx.export(model.eval(), args, dynamo=True, verbose=False, **kwargs)
    assert program is not None
    return program


def _run(program: Any, *args: torch.Tensor) -> np.ndarray:
    """The program's first output in onnxruntime on ``args``."""
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return np.asarray(session.run(None, feeds)[0])


def _onnx_run(model: nn.Module, *args: torch.Tensor) -> np.ndarray:
    """Export ``model`` (eval mode) and run it in onnxruntime on ``args``."""
    return _run(_export(model, *args), *args)


def _norm(kind: str, C: int) -> GroupNorm:
    norm = {
        "standard": lambda: GroupNorm(32, C),
        "uneven": lambda: GroupNorm(32, C, uneven=True),
        "fused_silu": lambda: GroupNormAct(8, C),
        "uneven_fused": lambda: GroupNorm(
            num_channels=C, group_sizes=[20, 14, 14], activation="silu"
        ),
    }[kind]()
    with torch.no_grad():
        norm.weight.copy_(rand((C,), torch.float32, seed=C) * 0.5 + 1)
        norm.bias.copy_(rand((C,), torch.float32, seed=C + 1))
    return norm


@pytest.mark.parametrize(
    "kind, C, sizes",
    [
        ("standard", 64, (2,) * 32),
        ("uneven", 48, (2,) * 16 + (1,) * 16),
        ("fused_silu", 64, (8,) * 8),
        ("uneven_fused", 48, (20, 14, 14)),
    ],
)
def test_group_norm_round_trip(kind: str, C: int, sizes: Sequence[int]) -> None:
    norm = _norm(kind, C)
    x = make_x((2, C, 5, 7), torch.float32, seed=1, loc=3.0)
    got = _onnx_run(norm, x)
    activation = norm.activation
    expected, _ = reference(
        x, GroupPlan(tuple(sizes)), norm.weight, norm.bias, activation=activation
    )
    assert_matches(torch.from_numpy(got), expected, torch.float32, what=f"onnxruntime {kind}")
    with torch.no_grad():
        eager = norm(x)
    assert_matches(torch.from_numpy(got), to_numpy(eager), torch.float32, what="vs PyTorch")


def test_eager_calls_after_export_use_real_tensors() -> None:
    # Regression: the plan's index tensors were cached while tracing, so the cache held fake
    # tensors and the next eager call failed ("not supported for tensor subclasses").
    norm = _norm("uneven", 48)
    _onnx_run(norm, make_x((1, 48, 3, 3), torch.float32, seed=2))
    x = make_x((2, 48, 4, 6), torch.float32, seed=3)
    expected, _ = reference(x, norm.plan, norm.weight, norm.bias)
    with torch.no_grad():
        assert_matches(norm(x), expected, torch.float32)


def test_swapped_diffusers_resnet_block_round_trip() -> None:
    pytest.importorskip("diffusers", reason="diffusers comes with the dev extra")
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(4)
    block = ResnetBlock2D(in_channels=32, out_channels=48, temb_channels=16, groups=8).eval()
    swapped, report = swap_group_norm(block)
    # norm1 and norm2 fused, the time embedding's SiLU moved into time_emb_proj's pre-hook.
    assert len(report.fused) == 2 and report.fused[0].moved_to == ("time_emb_proj",)
    x = make_x((2, 32, 6, 6), torch.float32, seed=5)
    temb = make_x((2, 16), torch.float32, seed=6)
    got = _onnx_run(swapped, x, temb)
    with torch.no_grad():
        expected = block.double()(x.double(), temb.double())
    assert_matches(torch.from_numpy(got), to_numpy(expected), torch.float32)


def test_converted_model_with_weight_standardization_round_trip() -> None:
    from groupnorm import WSConv2d, convert_batchnorm

    torch.manual_seed(7)
    bn_model = nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1),
        nn.BatchNorm2d(48),
        nn.ReLU(),
        nn.Conv2d(48, 16, 3, padding=1),
        nn.BatchNorm2d(16),
    )
    model, report = convert_batchnorm(
        bn_model, policy="uneven", num_groups=12, weight_standardize=True
    )
    # 12 groups: even for C = 48, uneven for C = 16; both convs standardized.
    assert [r.plan.is_even for r in report.replaced] == [True, False]
    assert isinstance(model[0], WSConv2d) and isinstance(model[3], WSConv2d)
    x = make_x((2, 3, 9, 7), torch.float32, seed=8)
    got = _onnx_run(model, x)
    with torch.no_grad():
        eager = model(x)
    assert_matches(torch.from_numpy(got), to_numpy(eager), torch.float32)


def _export_nodes(model: nn.Module, x: torch.Tensor) -> list[str]:
    return [node.op_type for node in _export(model, x).model_proto.graph.node]


def test_regression_onnx_graph_is_compact() -> None:
    # The pivot was a gather through the plan's `first` index: five nodes per layer before the
    # subtraction (Slice, Slice, Transpose, GatherND, Transpose): 11 nodes for nn's 5, and 22
    # with two runs of groups, each run's normalization with its own Reshape, multiply-add and
    # Reshape around the InstanceNormalization. Then the runs were two Slices, each with its
    # own pivot (14 nodes with one Split); then one gather of all pivots between two Reshapes
    # (13), one Split, and weight and bias as one BatchNormalization; now the pivots are
    # gathered from the channels' means, without Reshapes. A run of one-channel groups needs
    # no Reshape either. An even layer's pivot is its first channel's mean (one ReduceMean).
    x = make_x((2, 48, 5, 7), torch.float32, seed=9)
    assert len(_export_nodes(nn.GroupNorm(8, 48), x)) == 5
    even = _export_nodes(GroupNorm(8, 48), x)
    assert even.count("InstanceNormalization") == 1 and len(even) <= 8, even
    uneven = _export_nodes(GroupNorm(10, 48, uneven=True), x)
    assert uneven.count("InstanceNormalization") == 2 and len(uneven) <= 12, uneven
    assert uneven.count("Split") == 1 and uneven.count("Gather") == 1, uneven
    assert uneven[:3] == ["ReduceMean", "Gather", "Sub"], uneven
    ones = _export_nodes(GroupNorm(32, 48, uneven=True), x)
    assert ones.count("InstanceNormalization") == 2 and len(ones) <= 10, ones


@pytest.mark.parametrize("kind", ["standard", "uneven"])
def test_onnx_holds_the_tolerance_at_a_large_offset(kind: str) -> None:
    # |mean| / std = 1e6: onnxruntime's float32 statistics of x itself would lose every digit;
    # the exported graph normalizes each group minus its first channel's mean.
    C = 48 if kind == "uneven" else 64
    norm = _norm(kind, C)
    x = make_x((2, C, 6, 5), torch.float32, seed=10, loc=1e4, std=1e-2)
    got = _onnx_run(norm, x)
    expected, _ = reference(x, norm.plan, norm.weight, norm.bias)
    assert_matches(torch.from_numpy(got), expected, torch.float32, what=f"onnxruntime {kind}")


@pytest.mark.parametrize("kind", ["standard", "uneven"])
def test_export_with_dynamic_batch_and_spatial_sizes(kind: str) -> None:
    # The rows of the export form take their length from the traced sizes: symbolic here.
    from torch.export import Dim

    C = 48 if kind == "uneven" else 64
    norm = _norm(kind, C)
    x = make_x((2, C, 6, 5), torch.float32, seed=11, loc=3.0)
    dims = ({0: Dim("n", max=64), 2: Dim("h", max=512), 3: Dim("w", max=512)},)
    program = _export(norm, x, dynamic_shapes=dims)
    for shape in [(2, C, 6, 5), (3, C, 7, 9)]:
        other = make_x(shape, torch.float32, seed=12, loc=3.0)
        got = _run(program, other)
        expected, _ = reference(other, norm.plan, norm.weight, norm.bias)
        assert_matches(torch.from_numpy(got), expected, torch.float32, what=f"{shape}")


@pytest.mark.parametrize(
    "shape, dynamic",
    [((2, 48, 6, 5), (0,)), ((2, 48, 6, 5), (0, 2, 3)), ((3, 48), (0,)), ((2, 48, 7), (0,))],
)
def test_regression_uneven_onnx_export_runs_a_batch_of_zero(
    shape: tuple[int, ...], dynamic: tuple[int, ...]
) -> None:
    """The one-op translation of an uneven layer reshaped each run to [0, G, -1]: onnxruntime
    cannot infer -1 from 0 elements, so an export with a dynamic batch failed on N = 0
    ("requested shape:{0,1,-1}"), which the ATen form ran. Batches of 3 and 0, static and
    dynamic positions."""
    from torch.export import Dim

    norm = _norm("uneven", 48)
    x = make_x(shape, torch.float32, seed=13, loc=3.0)
    names = {0: "n", 2: "h", 3: "w"}
    dims = ({d: Dim(names[d], max=512) for d in dynamic},)
    program = _export(norm, x, dynamic_shapes=dims)
    for n in (3, 0):
        other = make_x((n, *shape[1:]), torch.float32, seed=14, loc=3.0)
        got = _run(program, other)
        assert got.shape == other.shape
        if n:
            expected, _ = reference(other, norm.plan, norm.weight, norm.bias)
            assert_matches(torch.from_numpy(got), expected, torch.float32, what=f"{n}")


@pytest.mark.parametrize(
    "shape, G",
    [((5, 48), 10), ((3, 48, 7), 32), ((2, 48, 3, 4, 5), 32), ((2, 48, 3, 4, 5), 10)],
)
def test_uneven_export_of_every_rank(shape: tuple[int, ...], G: int) -> None:
    # The uneven export form gathers the pivots from the channels' means (from x itself for
    # (N, C)) and skips the Reshapes of a run of one-channel groups (G = 32 here), which needs
    # spatial dimensions: (N, C) takes the rows of every run. Each group sits at its own
    # offset, 1e3 apart, with std 1e-2: a pivot taken from another group would lose every
    # digit.
    norm = GroupNorm(G, 48, uneven=True)
    with torch.no_grad():
        norm.weight.copy_(rand((48,), torch.float32, seed=13) * 0.5 + 1)
        norm.bias.copy_(rand((48,), torch.float32, seed=14))
    group = torch.repeat_interleave(torch.arange(G), torch.tensor(norm.plan.sizes))
    offset = (1e3 * (group + 1)).reshape((48,) + (1,) * (len(shape) - 2))
    x = make_x(shape, torch.float32, seed=15, std=1e-2) + offset
    got = _onnx_run(norm, x)
    expected, _ = reference(x, norm.plan, norm.weight, norm.bias)
    assert_matches(torch.from_numpy(got), expected, torch.float32, what=f"{shape}, G={G}")


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1, 1)], ids=["NC", "NC11"])
@pytest.mark.filterwarnings("ignore::groupnorm.SingleElementGroupWarning")
def test_regression_uneven_export_with_one_element_groups(shape: tuple[int, ...]) -> None:
    """Groups (2, 1) with one position per channel: the one-channel group is one element. The
    export form normalized each run with F.instance_norm, which refuses one position per
    instance ("Expected more than 1 spatial element when training"), so torch.export and the
    ONNX export raised where nn.GroupNorm exports; the one-element group normalizes to 0."""
    norm = GroupNorm(2, 3, uneven=True)
    with torch.no_grad():
        norm.weight.copy_(rand((3,), torch.float32, seed=2) + 1)
        norm.bias.copy_(rand((3,), torch.float32, seed=3))
    x = make_x(shape, torch.float32, seed=4, loc=3.0)
    expected, _ = reference(x, GroupPlan((2, 1)), norm.weight, norm.bias)
    assert_matches(torch.export.export(norm.eval(), (x,)).module()(x), expected, torch.float32)
    assert_matches(torch.from_numpy(_onnx_run(norm, x)), expected, torch.float32)


def test_regression_onnx_even_export_with_an_outlier_first_element() -> None:
    """The even export form's pivot was each group's first element; onnxruntime's
    InstanceNormalization of x minus an outlier first element (17 deviations out) missed the
    float32 bound (2.2x): its statistics lose accuracy as a group's mean moves from 0 faster
    than torch's kernel does. The pivot is now the mean of the group's first channel."""
    norm = GroupNorm(1, 1, affine=False)
    x = rand((2, 1, 32, 32), torch.float32, seed=1)
    x[:, 0, 0, 0] = 20.0  # the group's first element
    expected, _ = reference(x, GroupPlan((1,)))
    program = _export(norm, rand((2, 1, 32, 32), torch.float32, seed=2))
    assert_matches(torch.from_numpy(_run(program, x)), expected, torch.float32)


@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_regression_bfloat16_export_runs_in_onnxruntime(kind: str) -> None:
    """The pivot's mean, asked in float32 of bfloat16 x, exported as a bfloat16 ReduceMean and a
    Cast, which onnxruntime has no kernel for (NOT_IMPLEMENTED); uneven plans failed so, and
    then even ones. x is cast to float32 once, first (nn.GroupNorm's bfloat16 graph does not
    load in onnxruntime at all)."""
    onnx = pytest.importorskip("onnx")
    norm = (GroupNorm(3, 6) if kind == "even" else GroupNorm(4, 6, uneven=True)).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(rand((6,), torch.bfloat16, seed=3) + 1)
        norm.bias.copy_(rand((6,), torch.bfloat16, seed=4))
    x = make_x((2, 6, 4, 4), torch.bfloat16, seed=5, loc=3.0)

    class Float(nn.Module):  # numpy has no bfloat16: y leaves the graph as float32
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return y.float()

    program = _export(nn.Sequential(norm, Float()), x)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        x.view(torch.int16).numpy(), onnx.TensorProto.BFLOAT16
    )
    out = session.run_with_ort_values(None, {session.get_inputs()[0].name: feed})[0]
    got = torch.from_numpy(out.numpy())
    assert torch.equal(got, got.bfloat16().float())  # y was rounded to bfloat16 in the graph
    expected, _ = reference(x, norm.plan, norm.weight, norm.bias)
    rounded = torch.from_numpy(expected).to(torch.bfloat16)
    assert_matches(got, expected, torch.bfloat16, baseline=rounded)


def _exported_ops(program: Any) -> list[str]:
    """The call_function targets of an ONNXProgram's exported program."""
    graph = program.exported_program.graph
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize(
    "shape, G, affine",
    [
        ((2, 48, 5, 7), 10, "both"),
        ((2, 48, 5, 7), 32, "weight"),
        ((3, 48, 7), 10, "bias"),
        ((5, 48), 10, "none"),
        ((2, 48, 3, 4, 5), 32, "both"),
    ],
)
def test_regression_uneven_onnx_export_records_one_op_per_layer(
    shape: tuple[int, ...], G: int, affine: str
) -> None:
    """An uneven layer's ATen form (about 17 ops: the pivot, a split, per run a reshape,
    instance_norm and reshape, a cat, a batch_norm) cost torch.onnx.export 2.6x nn.GroupNorm's
    time for the study's ResNet-20: each op decomposed, translated and optimized on its own.
    An ONNX export now records one op, ``groupnorm::uneven_onnx``, translated to the same final
    nodes at once; its eager implementation (the ATen form) runs the exported program."""
    norm = GroupNorm(G, 48, uneven=True, affine=affine != "none")
    if affine in ("weight", "bias"):
        setattr(norm, "bias" if affine == "weight" else "weight", None)
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.copy_(rand((48,), torch.float32, seed=16) * 0.5 + 1)
        if norm.bias is not None:
            norm.bias.copy_(rand((48,), torch.float32, seed=17))
    x = make_x(shape, torch.float32, seed=18, loc=3.0)
    program = _export(norm, x)
    assert _exported_ops(program)[-1:] == ["groupnorm.uneven_onnx.default"], _exported_ops(program)
    assert "aten.instance_norm.default" not in _exported_ops(program)
    nodes = [node.op_type for node in program.model_proto.graph.node]
    runs = len(norm.plan.runs)
    ones = sum(1 for _, _, size in norm.plan.runs if size == 1) if len(shape) > 2 else 0
    assert nodes.count("InstanceNormalization") == runs, nodes
    assert nodes.count("Reshape") == 2 * (runs - ones), nodes
    assert nodes.count("Split") == 1 and nodes.count("Gather") == 1, nodes
    assert nodes.count("BatchNormalization") == (affine != "none"), nodes
    pivot = ["ReduceMean", "Gather", "Sub"] if len(shape) > 2 else ["Gather", "Sub"]
    assert nodes[: len(pivot)] == pivot, nodes
    expected, _ = reference(x, norm.plan, norm.weight, norm.bias)
    assert_matches(torch.from_numpy(_run(program, x)), expected, torch.float32, what="ort")
    with torch.no_grad():
        eager = program.exported_program.module()(x)
    assert_matches(eager, expected, torch.float32, what="exported program")
    # Even plans keep their form.
    assert "groupnorm.uneven_onnx.default" not in _exported_ops(_export(GroupNorm(8, 48), x))


@pytest.mark.parametrize("failure", [ImportError, AttributeError, TypeError])
def test_uneven_onnx_export_falls_back_to_the_aten_form(
    monkeypatch: pytest.MonkeyPatch, failure: type[Exception]
) -> None:
    """Where torch's private torchlib registry cannot take the translation (moved, renamed,
    changed signature), an uneven layer exports in its ATen form, as before the op."""
    from groupnorm.backends import _onnx

    def fail() -> bool:
        raise failure("no registry")

    monkeypatch.setattr(_onnx, "register", fail)
    norm = _norm("uneven", 48)
    x = make_x((2, 48, 5, 7), torch.float32, seed=19, loc=3.0)
    program = _export(norm, x)
    ops = _exported_ops(program)
    assert "groupnorm.uneven_onnx.default" not in ops and "aten.instance_norm.default" in ops
    expected, _ = reference(x, norm.plan, norm.weight, norm.bias)
    assert_matches(torch.from_numpy(_run(program, x)), expected, torch.float32)
    # Registered, but the export's registry does not hold it: the ATen form too.
    monkeypatch.setattr(_onnx, "register", lambda: False)
    assert "groupnorm.uneven_onnx.default" not in _exported_ops(_export(norm, x))


def test_uneven_onnx_op_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """GROUPNORM_ONNX_OP=0 keeps the ATen form where the private hooks would take but fail."""
    norm = _norm("uneven", 48)
    x = make_x((2, 48, 5, 7), torch.float32, seed=20, loc=3.0)
    assert "groupnorm.uneven_onnx.default" in _exported_ops(_export(norm, x))
    monkeypatch.setenv("GROUPNORM_ONNX_OP", "0")
    program = _export(norm, x)
    assert "groupnorm.uneven_onnx.default" not in _exported_ops(program)
    expected, _ = reference(x, norm.plan, norm.weight, norm.bias)
    assert_matches(torch.from_numpy(_run(program, x)), expected, torch.float32)
