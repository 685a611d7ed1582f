"""Model surgery: ``convert_batchnorm`` (policies, edge cases, a ResNet that trains afterwards),
``WSConv2d``, and ``swap_group_norm`` / ``restore_group_norm`` on plain modules and on real
diffusers models built from small configs with random weights."""

from __future__ import annotations

import collections
import copy
import io
import math
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import groupnorm
from groupnorm import GroupNorm, WSConv2d, convert_batchnorm, restore_group_norm, swap_group_norm
from groupnorm import reference as R
from groupnorm.convert import GroupNormDropAct
from groupnorm.functional import SingleElementGroupWarning, resolve_plan
from groupnorm.groups import GroupPlan
from tests._gloo import free_port
from tests._inputs import make_x, reference
from tests._thirdparty import need, randomize, small_unet_condition, small_vae
from tests._tolerances import assert_matches, to_numpy


def _count(model: nn.Module, cls: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# convert_batchnorm: policies on awkward channel counts


class TwoAwkward(nn.Module):
    """C = 48 and C = 100: 32 divides neither."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 48, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(48)
        self.conv2 = nn.Conv2d(48, 100, 1)
        self.bn2 = nn.BatchNorm2d(100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


# Written out by hand (not computed by groups.py): 32 groups of sizes differing by one, larger
# first; the divisor of C nearest 32 leaving >= 2 channels; for group_size=16, round(C/16) groups.
EXPECTED_SIZES: dict[tuple[str, str], dict[int, tuple[int, ...]]] = {
    ("uneven", "num_groups"): {48: (2,) * 16 + (1,) * 16, 100: (4,) * 4 + (3,) * 28},
    ("choose", "num_groups"): {48: (2,) * 24, 100: (4,) * 25},
    ("uneven", "group_size"): {48: (16,) * 3, 100: (17,) * 4 + (16,) * 2},
    ("choose", "group_size"): {48: (16,) * 3, 100: (20,) * 5},
}


@pytest.mark.parametrize("how", ["num_groups", "group_size"])
@pytest.mark.parametrize("policy", ["uneven", "choose"])
def test_policy_plans_and_outputs(policy: str, how: str) -> None:
    model = randomize(TwoAwkward(), seed=1)
    kw: dict[str, Any] = {"num_groups": 32} if how == "num_groups" else {"group_size": 16}
    out, report = convert_batchnorm(model, policy=policy, **kw)
    want = EXPECTED_SIZES[(policy, how)]
    got = {r.num_channels: r.plan.sizes for r in report.replaced}
    assert got == want
    assert [r.paths for r in report.replaced] == [("bn1",), ("bn2",)]
    for name, C in (("bn1", 48), ("bn2", 100)):
        new, old = getattr(out, name), getattr(model, name)
        assert isinstance(new, GroupNorm) and new.plan.sizes == want[C]
        x = make_x((2, C, 5, 3), torch.float32, seed=C)
        expected, _ = reference(x, GroupPlan(want[C]), old.weight, old.bias, eps=old.eps)
        assert_matches(new(x), expected, torch.float32, what=f"{name} after {policy}")


@pytest.mark.parametrize("inplace", [False, True])
def test_policy_error_lists_every_module_and_changes_nothing(inplace: bool) -> None:
    model = TwoAwkward()
    with pytest.raises(ValueError) as err:
        convert_batchnorm(model, inplace=inplace)
    text = str(err.value)
    assert "bn1" in text and "C=48" in text and "bn2" in text and "C=100" in text
    assert "nothing was changed" in text and "policy='uneven'" in text
    assert type(model.bn1) is nn.BatchNorm2d and type(model.bn2) is nn.BatchNorm2d


def test_uneven_policy_gives_a_small_layer_fewer_groups_and_says_so() -> None:
    # Regression: one layer with C < G (mobilenet_v3's C=16 at G=32) refused the whole model.
    model = nn.Sequential(nn.BatchNorm2d(48), nn.BatchNorm2d(16))
    out, report = convert_batchnorm(model, policy="uneven")
    assert out[0].plan.sizes == (2,) * 16 + (1,) * 16 and out[1].plan.sizes == (2,) * 8
    assert "uneven" in report.replaced[0].reason
    assert "C=16 has fewer channels than 32 groups" in report.replaced[1].reason
    assert "8 is the divisor of 16" in str(report)
    out, report = convert_batchnorm(model, policy="choose")
    assert out[1].plan.sizes == (2,) * 8


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"policy": "silent"}, ValueError, "policy must be one of"),
        ({"num_groups": 8, "group_size": 4}, ValueError, "not both"),
        ({"num_groups": 0}, ValueError, "num_groups must be a positive integer"),
        ({"group_size": 2.5}, TypeError, "group_size must be a positive integer"),
    ],
)
def test_bad_arguments(kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        convert_batchnorm(nn.BatchNorm2d(8), **kw)


def test_not_a_module_and_uninitialized_lazy_batchnorm() -> None:
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        convert_batchnorm(torch.zeros(3))  # type: ignore[arg-type]
    # One module that cannot be converted is skipped, with the reason; the rest is converted.
    lazy = nn.Sequential(nn.LazyBatchNorm2d(), nn.BatchNorm2d(32))
    with pytest.raises(ValueError, match=r"0 \(LazyBatchNorm2d\) is uninitialized.*inplace=True"):
        convert_batchnorm(lazy)
    out, report = convert_batchnorm(lazy, inplace=True)
    assert type(out[0]) is nn.LazyBatchNorm2d and type(out[1]) is GroupNorm
    assert report.skipped[0][0] == "0" and "uninitialized" in report.skipped[0][1]


# ---------------------------------------------------------------------------------------------
# convert_batchnorm: edge cases


def test_every_batchnorm_kind_and_affine_parameters_copied() -> None:
    model = randomize(
        nn.ModuleDict(
            {
                "b1": nn.BatchNorm1d(32),
                "b2": nn.BatchNorm2d(64),
                "b3": nn.BatchNorm3d(32),
                "sync": nn.SyncBatchNorm(64, eps=1e-3),
            }
        ),
        seed=2,
    )
    out, report = convert_batchnorm(model)
    assert {r.kind for r in report.replaced} == {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
    }
    assert _count(out, nn.modules.batchnorm._BatchNorm) == 0
    for name, old in model.items():
        new = out[name]
        assert isinstance(new, GroupNorm) and new.num_groups == 32 and new.eps == old.eps
        assert isinstance(old, nn.modules.batchnorm._BatchNorm)
        assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)
        assert new.weight is not old.weight
    x = make_x((3, 32, 7), torch.float32, seed=3)
    b1 = model["b1"]
    assert isinstance(b1, nn.BatchNorm1d)
    expected, _ = reference(x, GroupPlan((1,) * 32), b1.weight, b1.bias)
    assert_matches(out["b1"](x), expected, torch.float32)
    assert any("BatchNorm1d" in w for w in report.warnings)


def test_batchnorm_without_affine_and_without_running_stats() -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(64, affine=False), nn.BatchNorm2d(64, track_running_stats=False)
    )
    out, report = convert_batchnorm(model)
    assert out[0].affine is False and out[0].weight is None and out[0].bias is None
    assert out[1].affine is True
    assert [r.dropped_running_stats for r in report.replaced] == [True, False]
    x = make_x((2, 64, 3, 3), torch.float32, seed=4)
    expected, _ = reference(x, GroupPlan((2,) * 32))
    assert_matches(out[0](x), expected, torch.float32)


def test_shared_module_converted_once_and_kept_shared() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm2d(64)
            self.again = self.norm  # the same object at a second path
            self.conv = nn.Conv2d(64, 64, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.again(self.conv(self.norm(x)))

    model = Shared()
    out, report = convert_batchnorm(model)
    assert len(report.replaced) == 1 and report.replaced[0].paths == ("norm", "again")
    assert out.norm is out.again and isinstance(out.norm, GroupNorm)
    assert len(list(out.parameters())) == 4  # conv w, b + one norm's w, b


def test_train_eval_mode_kept_per_module() -> None:
    model = nn.Sequential(nn.BatchNorm2d(32), nn.BatchNorm2d(32)).train()
    model[1].eval()
    out, _ = convert_batchnorm(model)
    assert [m.training for m in out.children()] == [True, False]
    out, _ = convert_batchnorm(model.eval())
    assert not any(m.training for m in out.modules())


def test_half_precision_and_device_kept() -> None:
    model = randomize(nn.Sequential(nn.Conv2d(8, 64, 1), nn.BatchNorm2d(64)), seed=5).half()
    out, _ = convert_batchnorm(model)
    assert out[1].weight.dtype == torch.float16
    x = make_x((2, 8, 6, 6), torch.float16, seed=6)
    h = out[0](x)
    expected, _ = reference(h, GroupPlan((2,) * 32), out[1].weight, out[1].bias)
    baseline = F.group_norm(h, 32, out[1].weight, out[1].bias)
    assert_matches(out[1](h), expected, torch.float16, baseline=baseline)
    meta, _ = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(64, device="meta")))
    assert meta[0].weight.device.type == "meta"


def test_already_converted_gives_an_empty_report() -> None:
    once, first = convert_batchnorm(nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32)))
    twice, second = convert_batchnorm(once)
    assert first and not second and second.replaced == [] and second.warnings == []
    assert str(twice) == str(once)


def test_copy_by_default_inplace_on_request_and_root_batchnorm() -> None:
    model = nn.Sequential(nn.BatchNorm2d(32))
    out, _ = convert_batchnorm(model)
    assert out is not model and type(model[0]) is nn.BatchNorm2d
    same, _ = convert_batchnorm(model, inplace=True)
    assert same is model and isinstance(model[0], GroupNorm)
    root, report = convert_batchnorm(nn.BatchNorm2d(32))
    assert isinstance(root, GroupNorm) and report.replaced[0].paths == ("",)


def test_batchnorm_subclass_is_reported_not_converted() -> None:
    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(super().forward(x))

    out, report = convert_batchnorm(nn.Sequential(BatchNormAct(32), nn.BatchNorm2d(32)))
    assert type(out[0]) is BatchNormAct and isinstance(out[1], GroupNorm)
    assert report.skipped[0][0] == "0" and "subclass" in report.skipped[0][1]


def test_ddp_wrapped_model_refused() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built into this torch")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(
            nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32))
        )
        for fn in (convert_batchnorm, swap_group_norm):
            with pytest.raises(TypeError, match="before wrapping"):
                fn(ddp)
            with pytest.raises(TypeError, match="submodule 'inner'"):
                fn(nn.ModuleDict({"inner": ddp}))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# A small ResNet with BatchNorm: convert, train one step


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 48, 2))
        self.head = nn.Linear(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("ws", [False, True], ids=["gn", "gn+ws"])
def test_small_resnet_converts_and_trains(ws: bool) -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    bns = _count(model, nn.BatchNorm2d)
    out, report = convert_batchnorm(model, num_groups=8, weight_standardize=ws)
    assert _count(out, nn.modules.batchnorm._BatchNorm) == 0
    assert _count(out, GroupNorm) == len(report.replaced) == bns == 9
    assert any("rebuild any optimizer" in w for w in report.warnings)
    if ws:
        # Every conv here is registered right before its norm: all 9 become WSConv2d.
        assert _count(out, WSConv2d) == len(report.ws_convs) == 9
        assert "layers.1.shortcut.0" in report.ws_convs and "stem.0" in report.ws_convs
    else:
        assert _count(out, WSConv2d) == 0
    x = make_x((4, 3, 16, 16), torch.float32, seed=7)
    target = torch.tensor([1, 3, 5, 7])
    opt = torch.optim.SGD(out.parameters(), lr=0.05)
    before = F.cross_entropy(out(x), target)
    before.backward()
    opt.step()
    after = F.cross_entropy(out(x), target)
    assert after.item() < before.item()


# ---------------------------------------------------------------------------------------------
# WSConv2d


def _standardized_np(w: torch.Tensor, eps: float) -> np.ndarray:
    v = to_numpy(w)
    flat = v.reshape(v.shape[0], -1)
    mean = flat.mean(1, keepdims=True)
    var = ((flat - mean) ** 2).mean(1, keepdims=True)
    return ((flat - mean) / np.sqrt(var + eps)).reshape(v.shape)


@pytest.mark.parametrize("groups, padding_mode", [(1, "zeros"), (2, "reflect")])
def test_wsconv2d_matches_standardized_conv(
    groups: int, padding_mode: Literal["zeros", "reflect"]
) -> None:
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups, padding_mode=padding_mode)
    ws = WSConv2d.from_conv(conv)
    assert torch.equal(ws.weight, conv.weight) and ws.weight is not conv.weight
    assert ws.state_dict().keys() == conv.state_dict().keys()
    x = make_x((2, 8, 7, 5), torch.float32, seed=9)
    # Expected: the filters standardized in NumPy float64, then torch's own float64 conv; the
    # baseline: torch's float32 conv with those filters exactly rounded to float32.
    w64 = torch.from_numpy(_standardized_np(conv.weight, ws.ws_eps))
    conv64 = copy.deepcopy(conv).double()
    expected = conv64._conv_forward(x.double(), w64, conv64.bias)
    with torch.no_grad():
        baseline = conv._conv_forward(x, w64.float(), conv.bias)
        assert_matches(ws(x), to_numpy(expected), torch.float32, baseline=baseline)


@pytest.mark.slow
def test_wsconv2d_gradcheck_and_scale_invariance() -> None:
    torch.manual_seed(10)
    # eps far below any filter variance: the invariance below is then exact up to rounding.
    ws = WSConv2d(3, 4, 3, padding=1, ws_eps=1e-30).double()
    x = make_x((2, 3, 4, 4), torch.float64, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, w: F.conv2d(a, groupnorm.ws.standardize_weight(w, 1e-30)), (x, ws.weight)
    )
    with torch.no_grad():
        y1 = ws(x)
        ws.weight.mul_(7.5).add_(3.0)  # a filter's scale and offset do not matter
        y2 = ws(x)
    assert_matches(y2, to_numpy(y1), torch.float64, reduction=27)
    with pytest.raises(ValueError, match="ws_eps must be > 0"):
        WSConv2d(3, 4, 3, ws_eps=0.0)


# ---------------------------------------------------------------------------------------------
# swap_group_norm / restore_group_norm on plain modules


def _seq() -> nn.Sequential:
    return randomize(
        nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.GroupNorm(32, 64),
            nn.SiLU(),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
        ),
        seed=12,
    )


def test_swap_sequential_fuses_and_matches_torch() -> None:
    model = _seq().double()
    out, report = swap_group_norm(model)
    assert (
        report.swapped == ["1", "3"]
        and report.proof == "torch.fx symbolic trace, in training and eval mode"
    )
    assert [(f.norm, f.activation) for f in report.fused] == [("1", "2"), ("3", "4")]
    assert out[1].activation == "silu" and isinstance(out[2], nn.Identity)
    assert out[3].activation == "relu" and isinstance(out[4], nn.Identity)
    assert out[1].weight is not model[1].weight  # a copy by default ...
    assert type(model[1]) is nn.GroupNorm  # ... and the argument is untouched
    x = make_x((2, 3, 6, 5), torch.float64, seed=13)
    assert_matches(out(x), to_numpy(model(x)), torch.float64, reduction=2 * 30)


def test_swap_keeps_parameters_and_restore_keeps_training() -> None:
    model = _seq()
    original_weight = model[1].weight
    out, report = swap_group_norm(model, inplace=True)
    assert out is model and model[1].weight is original_weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the swapped model
    x = make_x((2, 3, 6, 5), torch.float32, seed=14)
    model(x).square().mean().backward()
    opt.step()
    trained = model[1].weight.detach().clone()
    model.eval()
    restored = restore_group_norm(model, report)
    assert type(restored[1]) is nn.GroupNorm and type(restored[2]) is nn.SiLU
    assert torch.equal(restored[1].weight, trained) and not restored[1].training
    with pytest.raises(ValueError, match="already been restored"):
        restore_group_norm(model, report)


def test_restore_refuses_another_model() -> None:
    model = _seq()
    _, report = swap_group_norm(model)
    with pytest.raises(ValueError, match="belongs to another model"):
        restore_group_norm(model, report)


def test_swap_without_fusion_shared_norm_and_subclasses() -> None:
    class MyNorm(nn.GroupNorm):
        pass

    shared = nn.GroupNorm(4, 16)
    model = nn.Sequential(shared, nn.SiLU(), shared, MyNorm(4, 16))
    out, report = swap_group_norm(model)
    assert report.fused == [] and report.swapped == ["0", "2"] and out[0] is out[2]
    # The shared norm's second call feeds MyNorm, not an activation.
    assert (
        report.not_fused[0][0] == "0"
        and "call 2 of 2 goes to 3 (MyNorm)" in (report.not_fused[0][1])
    )
    assert report.skipped[0][0] == "3" and type(out[3]) is MyNorm
    plain, report = swap_group_norm(_seq(), fuse_activation=False)
    assert report.fused == [] and isinstance(plain[2], nn.SiLU)
    root, report = swap_group_norm(nn.GroupNorm(4, 16))
    assert isinstance(root, GroupNorm) and type(restore_group_norm(root, report)) is nn.GroupNorm


def test_modules_with_hooks_or_patched_forward_are_left_alone() -> None:
    seen: list[torch.Size] = []
    model = _seq()
    model[3].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    out, report = swap_group_norm(model)
    assert report.swapped == ["1"] and type(out[3]) is nn.GroupNorm
    assert report.skipped == [("3", "GroupNorm has hooks registered on it")]
    assert [f.norm for f in report.fused] == ["1"]
    out(make_x((1, 3, 4, 4), torch.float32, seed=28))
    assert seen == [torch.Size([1, 64, 4, 4])]  # the hook still runs, on the kept module
    model = _seq()
    model.forward = lambda x: nn.Sequential.forward(model, x)  # an offloading-style wrapper
    _, report = swap_group_norm(model)
    assert report.fused == [] and "forward replaced on the instance" in report.not_fused[0][1]
    assert "no trace is trusted" in report.proof
    bn = nn.Sequential(nn.BatchNorm2d(32))
    bn[0].register_forward_pre_hook(lambda m, args: None)
    converted, conversion = convert_batchnorm(bn)
    assert (
        type(converted[0]) is nn.BatchNorm2d
        and not conversion
        and "hooks" in conversion.skipped[0][1]
    )


class NormReadTwice(nn.Module):
    """forward(x) = seq(x) + seq[0](x): the norm's output also goes past the SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x) + self.seq[0](x)


@pytest.mark.parametrize("traced_by", ["fx", "export"])
def test_regression_fusion_where_the_norm_output_is_read_twice(traced_by: str) -> None:
    # Fusing seq[0] + seq[1] (a Sequential pair) changed this model's output by 2.89 and the
    # report said fused=1. The trace shows the second read, so nothing is fused, and why.
    model = randomize(NormReadTwice(), seed=29).double()
    x = make_x((2, 8, 5, 4), torch.float64, seed=30)
    kw: dict[str, Any] = {"example_inputs": x} if traced_by == "export" else {}
    out, report = swap_group_norm(model, **kw)
    assert report.fused == [] and report.swapped == ["seq.0"]
    assert report.proof.startswith("torch.export" if traced_by == "export" else "torch.fx")
    [(path, why)] = report.not_fused
    assert path == "seq.0" and why.startswith("call 2 of 2 goes to ")
    assert isinstance(out.seq[1], nn.SiLU)
    assert_matches(out(x), to_numpy(model(x)), torch.float64, reduction=2 * 20)


class DropoutBetween(nn.Module):
    """MONAI's ADN layout: norm, Dropout(p=0), activation; and a time-embedding-like second use
    of one SiLU (diffusers ResnetBlock2D's layout) that can move into the Linear it feeds."""

    def __init__(self) -> None:
        super().__init__()
        self.adn = nn.Sequential(nn.GroupNorm(4, 8), nn.Dropout(0.0), nn.SiLU())
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.SiLU()
        self.proj = nn.Linear(3, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.adn(x)))
        return h + self.proj(self.act(t))[:, :, None, None]


@pytest.mark.parametrize("traced_by", ["fx", "export"])
def test_fusion_reasons_and_an_activation_moved_into_its_only_consumer(traced_by: str) -> None:
    model = randomize(DropoutBetween(), seed=31).double().eval()
    x, t = make_x((2, 8, 4, 4), torch.float64, seed=32), make_x((2, 3), torch.float64, seed=33)
    kw: dict[str, Any] = {"example_inputs": (x, t)} if traced_by == "export" else {}
    out, report = swap_group_norm(model, **kw)
    assert [(f.norm, f.activation, f.moved_to) for f in report.fused] == [
        ("norm", "act", ("proj",))
    ]
    assert report.not_fused == [
        (
            "adn.0",
            "its output goes to adn.1 (Dropout), not to exactly one nn.SiLU, nn.ReLU or "
            "nn.GELU module",
        )
    ]
    assert isinstance(out.act, nn.Identity) and out.norm.activation == "silu"
    assert_matches(out(x, t), to_numpy(model(x, t)), torch.float64, reduction=2 * 16)
    restored = restore_group_norm(out, report)
    assert isinstance(restored.act, nn.SiLU) and not restored.proj._forward_pre_hooks


def test_an_activation_also_applied_elsewhere_is_not_fused() -> None:
    class TwoUses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.act = nn.GroupNorm(2, 8), nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.norm(x)) + self.act(x) * 2

    model = randomize(TwoUses(), seed=34)
    out, report = swap_group_norm(model)
    assert (
        report.fused == []
        and "act is also applied to the model's input x" in (report.not_fused[0][1])
    )
    x = make_x((2, 8, 3, 3), torch.float32, seed=35)
    assert_matches(out(x), to_numpy(model.double()(x.double())), torch.float32)


# ---------------------------------------------------------------------------------------------
# diffusers models from small configs, random weights


@pytest.fixture
def diffusers() -> ModuleType:
    return need("diffusers")


def _resnet_block_cls() -> type[nn.Module]:
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D


def _unet(diffusers: ModuleType, **kw: object) -> nn.Module:
    torch.manual_seed(16)
    return randomize(
        diffusers.UNet2DModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            **kw,
        ).eval(),
        seed=16,
    )


def _check_swap(
    model: nn.Module,
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    fused: int,
) -> None:
    """Swapped outputs equal the original's: float64 against float64 (same computation), and
    float32 against the float64 original at most twice as far off as the float32 original."""
    norms = _count(model, nn.GroupNorm)
    out, report = swap_group_norm(model)
    assert len(report.swapped) == norms and _count(out, GroupNorm) == norms
    assert not any(type(m) is nn.GroupNorm for m in out.modules())
    assert len(report.fused) == fused
    with torch.no_grad():
        model64 = copy.deepcopy(model).double()
        expected = to_numpy(run(model64, x.double()))
        assert_matches(
            run(swap_group_norm(model64)[0], x.double()), expected, torch.float64, reduction=4096
        )
        assert_matches(run(out, x), expected, torch.float32, baseline=run(model, x))
    restored = restore_group_norm(out, report)
    assert _count(restored, GroupNorm) == 0 and _count(restored, nn.GroupNorm) == norms


@pytest.mark.slow
def test_diffusers_autoencoder_kl_swap(diffusers: ModuleType) -> None:
    vae = small_vae(diffusers, seed=15)
    resnets = _count(vae, _resnet_block_cls())
    assert resnets == 10
    # norm1 and norm2 of every ResnetBlock2D, plus encoder and decoder conv_norm_out.
    _check_swap(
        vae,
        lambda m, x: m(x).sample,
        make_x((2, 3, 32, 32), torch.float32, seed=17),
        fused=2 * resnets + 2,
    )


@pytest.mark.slow
def test_diffusers_vae_batch_one_without_fusion(diffusers: ModuleType) -> None:
    # Regression: after the mid-block attention, diffusers reshapes to (1, C, H, W) with
    # channels-last strides whose batch stride is not H*W*C; torch's kernel refused that layout
    # ("Expected X.is_contiguous(memory_format)") and the swapped VAE raised at batch 1.
    vae = small_vae(diffusers, seed=15)
    out, report = swap_group_norm(vae, fuse_activation=False)
    assert report.fused == []
    x = make_x((1, 3, 32, 32), torch.float32, seed=26)
    with torch.no_grad():
        got = out(x).sample
        expected = to_numpy(copy.deepcopy(vae).double()(x.double()).sample)
        assert_matches(got, expected, torch.float32, baseline=vae(x).sample)
    # The same layout made directly: batch stride C instead of H*W*C.
    base = make_x((1, 7, 5, 32), torch.float32, seed=27).permute(0, 3, 1, 2)
    odd = base.as_strided(base.shape, (32, 1, 5 * 32, 32))
    assert odd.is_contiguous(memory_format=torch.channels_last) and not odd.is_contiguous()
    norm = GroupNorm(8, 32)
    expected, _ = reference(odd, GroupPlan((4,) * 8), norm.weight, norm.bias)
    assert_matches(norm(odd), expected, torch.float32)


@pytest.mark.slow
def test_diffusers_unet_swap_moves_time_activation_into_projection(diffusers: ModuleType) -> None:
    unet = _unet(diffusers)
    resnets = _count(unet, _resnet_block_cls())
    out, report = swap_group_norm(unet)
    moved = {f.moved_to for f in report.fused if f.rule == "ResnetBlock2D"}
    assert len(moved) == resnets and all(
        len(m) == 1 and m[0].endswith("time_emb_proj") for m in moved
    )
    # The pre-hook carries the SiLU the time embedding needs: without it the outputs differ.
    _check_swap(
        unet,
        lambda m, x: m(x, 10).sample,
        make_x((2, 3, 16, 16), torch.float32, seed=18),
        fused=2 * resnets + 1,
    )


@pytest.mark.slow
def test_diffusers_unet_scale_shift_blocks_are_not_fused(diffusers: ModuleType) -> None:
    unet = _unet(diffusers, resnet_time_scale_shift="scale_shift")
    out, report = swap_group_norm(unet)
    assert [f.norm for f in report.fused] == ["conv_norm_out"]
    assert "torch.fx could not trace" in report.proof
    reasons = {path: why for path, why in report.not_fused}
    assert len(reasons) == _count(out, GroupNorm) - 1  # every norm but conv_norm_out
    in_blocks = [why for path, why in reasons.items() if ".resnets." in path]
    assert len(in_blocks) == 2 * _count(unet, _resnet_block_cls()) and all(
        why.endswith(
            "time_embedding_norm='scale_shift' puts a scale and shift between norm2 and the "
            "activation"
        )
        for why in in_blocks
    )
    assert all(
        "no pinned forward covers this norm" in why
        for path, why in reasons.items()
        if ".resnets." not in path
    )
    _check_swap(
        unet, lambda m, x: m(x, 3).sample, make_x((2, 3, 16, 16), torch.float32, seed=19), fused=1
    )


@pytest.mark.slow
def test_diffusers_unet_conditional_swap(diffusers: ModuleType) -> None:
    unet = small_unet_condition(diffusers, seed=20)
    context = make_x((2, 5, 16), torch.float64, seed=21)
    _check_swap(
        unet,
        lambda m, x: m(x, 4, context.to(x.dtype)).sample,
        make_x((2, 4, 8, 8), torch.float32, seed=22),
        fused=2 * _count(unet, _resnet_block_cls()) + 1,
    )


def test_an_unverified_forward_is_swapped_but_not_fused(diffusers: ModuleType) -> None:
    class Changed(_resnet_block_cls()):  # type: ignore[misc]
        # Same class name and module as the verified one, but another forward, with a branch
        # on values so that torch.fx cannot trace it and only the pinned forwards remain.
        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
            out = super().forward(input_tensor, temb)
            return out * 2 if out.sum() > 0 else out

    Changed.__name__, Changed.__module__ = "ResnetBlock2D", "diffusers.models.resnet"
    block = randomize(Changed(in_channels=32, out_channels=32, temb_channels=None, groups=8))
    out, report = swap_group_norm(block)
    assert report.fused == [] and len(report.swapped) == 2
    assert "not the version that was verified" in report.not_fused[0][1]
    x = make_x((2, 32, 4, 4), torch.float32, seed=23)
    with torch.no_grad():
        got = out(x, None)
        expected = to_numpy(block.double()(x.double(), None))
    assert_matches(got, expected, torch.float32)


class _AroundBlock(nn.Module):
    """A ResnetBlock2D, and one of its modules also called by the forward around it, which
    branches on values so that torch.fx cannot trace it and only the pinned forwards remain."""

    def __init__(self) -> None:
        super().__init__()
        block = _resnet_block_cls()(in_channels=16, out_channels=16, temb_channels=8, groups=4)
        self.block = randomize(block)


class _NormAround(_AroundBlock):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.block(x, t) + self.block.norm1(x) if x.sum() > -1e9 else x


class _ProjectionAround(_AroundBlock):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.block(x, t) + self.block.time_emb_proj(t)[:, :, None, None]
        return y if x.sum() > -1e9 else x


@pytest.mark.parametrize("attr", ["norm1", "time_emb_proj"])
def test_regression_a_pinned_forward_proves_nothing_about_calls_around_it(
    diffusers: ModuleType, attr: str
) -> None:
    """ResnetBlock2D's pair was fused from its own forward while the model around it called
    the norm (now activated) or the projection (now activating its input) itself: 0.8-3.6 off
    (found by fuzzing)."""
    x, t = make_x((2, 16, 4, 4), torch.float32, seed=49), make_x((2, 8), torch.float32, seed=50)
    model = (_NormAround() if attr == "norm1" else _ProjectionAround()).eval()
    with torch.no_grad():
        expected = model(x, t)
        out, report = swap_group_norm(model)
        assert report.fused == [] and f"names .{attr}" in report.not_fused[0][1]
        torch.testing.assert_close(out(x, t), expected)


def test_fusion_rules_match_the_installed_diffusers(diffusers: ModuleType) -> None:
    """Fails when diffusers changes a forward that fusion relies on: read the new source, then
    add its fingerprint to groupnorm.convert._RULES."""
    import importlib

    from groupnorm.convert._walk import forward_fingerprint
    from groupnorm.convert.fusion import RULES

    for rule in RULES:
        cls = getattr(importlib.import_module(rule.module), rule.name)
        assert forward_fingerprint(cls) in rule.fingerprints, f"{rule.module}.{rule.name}"


def test_regression_fusion_is_not_proven_past_hooks_a_trace_cannot_see() -> None:
    """A hook on a block returning the norm's output, or on an Identity after the norm, saw
    the fused (activated) output, and fx tracing ran the parent's hook on a Proxy."""
    x = make_x((2, 3, 8, 8), torch.float32, seed=40)
    feats: dict[str, object] = {}
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16)), nn.SiLU())
    model[0].register_forward_hook(lambda m, args, out: feats.__setitem__("f", out))
    model(x)
    before = feats["f"]
    out, report = swap_group_norm(model)
    assert feats["f"] is before and report.fused == [] and "no trace is trusted" in report.proof
    out(x)
    assert isinstance(feats["f"], torch.Tensor) and isinstance(before, torch.Tensor)
    torch.testing.assert_close(feats["f"], before)
    taps: list[torch.Tensor] = []
    model = nn.Sequential(nn.GroupNorm(4, 16), nn.Identity(), nn.SiLU())
    model[1].register_forward_hook(lambda m, args, out: taps.append(out))
    h = make_x((2, 16, 4, 4), torch.float32, seed=41)
    model(h)
    out, report = swap_group_norm(model)
    out(h)
    assert report.fused == [] and "Identity has hooks" in report.not_fused[0][1]
    torch.testing.assert_close(taps[1], taps[0])


class _Cache(nn.Module):
    """Keeps the norm's output (a feature cache): a side effect no trace shows."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.act = nn.GroupNorm(4, 16), nn.SiLU()
        self.feats: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        self.feats.append(h)
        return self.act(h)


class _TrainOnly(nn.Module):
    """Dropout between the norm and the activation in training mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.act = nn.GroupNorm(4, 16), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.training:
            h = F.dropout(h, 0.5)
        return self.act(h)


@pytest.mark.parametrize("traced_by", ["fx", "export"])
def test_regression_fusion_needs_the_same_proof_in_both_modes_and_no_kept_values(
    traced_by: str,
) -> None:
    """A forward keeping the norm's output in a list, or branching on self.training between
    the norm and its activation, was fused from a trace that cannot see either; the cached
    feature was then activated (2.8 off), the training-mode output 0.4 off."""
    x = make_x((2, 16, 4, 4), torch.float32, seed=42)
    example = None if traced_by == "fx" else (x,)
    model = _Cache()
    out, report = swap_group_norm(model, example_inputs=example)
    assert report.fused == [] and "keeps a" in report.not_fused[0][1]
    assert model.feats == [] and out.feats == []  # the trace's values are not left behind
    out(x)
    torch.testing.assert_close(out.feats[0], F.group_norm(x, 4))
    model2 = _TrainOnly().eval()
    out2, report = swap_group_norm(model2, example_inputs=example)
    assert report.fused == [] and "differs between training and eval mode" in report.not_fused[0][1]
    assert not out2.training and not out2.norm.training  # each mode put back
    out2.train()
    model2.train()
    torch.manual_seed(0)
    expected = model2(x)
    torch.manual_seed(0)
    torch.testing.assert_close(out2(x), expected)


class _TwoUses(nn.Module):
    """One SiLU after the norm and on another input, which goes to ``proj``."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.norm, self.act, self.proj = nn.GroupNorm(4, 16), nn.SiLU(), proj

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.act(t)
        p = self.proj(a, a) if isinstance(self.proj, nn.Bilinear) else self.proj(input=a)
        return self.act(self.norm(x)) + p[:, :, None, None]


def test_regression_activation_moves_only_into_modules_of_one_input() -> None:
    """The moved SiLU's pre-hook read args[0]: a module called by keyword raised IndexError,
    and one taking the activation's output twice (Bilinear) got it activated once."""
    x, t = make_x((2, 16, 4, 4), torch.float32, seed=43), make_x((2, 8), torch.float32, seed=44)
    keyword = _TwoUses(nn.Linear(8, 16))
    out, report = swap_group_norm(keyword)
    assert report.fused[0].moved_to == ("proj",)
    torch.testing.assert_close(out(x, t), keyword(x, t))
    twice = _TwoUses(nn.Bilinear(8, 8, 16))
    out, report = swap_group_norm(twice)
    assert report.fused == [] and "a single plain module of one input" in report.not_fused[0][1]
    torch.testing.assert_close(out(x, t), twice(x, t))


class _InPlaceElsewhere(nn.Module):
    """An in-place ReLU after the norm and on a conv's output, which the residual sum reads
    after the ReLU has rewritten it; or on the input ``t``, which the caller holds."""

    def __init__(self, on_input: bool) -> None:
        super().__init__()
        self.on_input = on_input
        self.norm, self.act = nn.GroupNorm(4, 16), nn.ReLU(inplace=True)
        self.conv, self.proj = nn.Conv2d(16, 16, 1), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            return self.act(self.norm(x)) + self.proj(self.act(t))[:, :, None, None]
        c = self.conv(x)
        p = self.conv(self.act(c))
        return self.act(self.norm(x)) + c + p


@pytest.mark.parametrize("traced_by", ["fx", "export"])
@pytest.mark.parametrize("on_input", [False, True])
def test_regression_an_in_place_activation_applied_elsewhere_is_not_moved(
    traced_by: str, on_input: bool
) -> None:
    """The ReLU moved into a pre-hook of the module taking its other output, applied out of
    place there: the conv output it had rewritten was read unrewritten (1.8 off), and the
    caller's tensor was no longer rewritten (found by fuzzing)."""
    x, t = make_x((2, 16, 4, 4), torch.float32, seed=45), make_x((2, 16), torch.float32, seed=46)
    model = _InPlaceElsewhere(on_input)
    t_original, t_swapped = t.clone(), t.clone()
    with torch.no_grad():
        expected = model(x, t_original)
        out, report = swap_group_norm(
            model, example_inputs=None if traced_by == "fx" else (x, t.clone())
        )
        got = out(x, t_swapped)
    assert report.fused == []
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(t_swapped, t_original)


class _InPlaceReadOnce(nn.Module):
    """An in-place SiLU after the norm and on a conv output that nothing else reads."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.act = nn.GroupNorm(4, 16), nn.SiLU(inplace=True)
        self.conv, self.proj = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x)) + self.proj(self.act(self.conv(x)))


@pytest.mark.parametrize("traced_by", ["fx", "export"])
def test_an_in_place_activation_on_an_output_read_once_still_moves(traced_by: str) -> None:
    x = make_x((2, 16, 4, 4), torch.float32, seed=51)
    model = _InPlaceReadOnce()
    with torch.no_grad():
        expected = model(x)
        out, report = swap_group_norm(model, example_inputs=None if traced_by == "fx" else (x,))
        assert [f.moved_to for f in report.fused] == [("proj",)]
        torch.testing.assert_close(out(x), expected)


class _Holder:
    """A plain object a module holds, callable (as diffusers' attention processors are)."""

    def __call__(self) -> None:
        return None


class _Slotted:
    __slots__ = ("h",)


class _KeepsInside(nn.Module):
    """Keeps the norm's output inside what it holds (a tuple it sets, a list in a dict, a deque,
    a plain or callable object, a module in a plain list) or in an attribute it adds; with
    ``branch``, then branches on values, where torch.fx stops."""

    def __init__(self, where: str, branch: bool = False) -> None:
        super().__init__()
        self.where, self.branch = where, branch
        self.norm, self.act = nn.GroupNorm(4, 16), nn.SiLU()
        self.feats: Any = {
            "tuple": (),
            "dict": {"f": []},
            "deque": collections.deque(),
            "object": SimpleNamespace(),
            "callable object": _Holder(),
            "slots object": _Slotted(),
            "module in a list": [nn.Identity()],
        }.get(where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.where == "tuple":
            self.feats = (h,)
        elif self.where == "dict":
            self.feats["f"].append(h)
        elif self.where == "deque":
            self.feats.append(h)
        elif self.where == "module in a list":
            self.feats[0].h = h
        elif self.where in ("object", "callable object", "slots object"):
            self.feats.h = h
        else:
            self.last = h
        if self.branch and h.sum() > 1e9:
            h = h * 2
        return self.act(h)

    def kept(self) -> torch.Tensor | None:
        """What the last forward kept; None before any."""
        f = self.feats
        if self.where in ("tuple", "deque"):
            return f[-1] if f else None
        if self.where == "dict":
            return f["f"][-1] if f["f"] else None
        if self.where == "module in a list":
            return getattr(f[0], "h", None)
        if self.where in ("object", "callable object", "slots object"):
            return getattr(f, "h", None)
        return getattr(self, "last", None)


@pytest.mark.parametrize("traced_by", ["fx", "export"])
@pytest.mark.parametrize(
    "where",
    [
        "tuple",
        "dict",
        "deque",
        "object",
        "callable object",
        "slots object",
        "module in a list",
        "new attribute",
    ],
)
def test_regression_values_kept_inside_what_a_module_holds_are_side_effects(
    traced_by: str, where: str
) -> None:
    """Only values kept directly in an attribute, a list or a dict's values were looked for:
    a norm output kept in a tuple, a dict's list, a deque, an object (with __slots__ too) or an
    unregistered module was fused, and the kept feature activated (2.35 off); an attribute the
    forward added kept the trace's Proxy or fake tensor, and torch.save of the swapped model
    failed (found by fuzzing)."""
    x = make_x((2, 16, 4, 4), torch.float32, seed=47)
    model = _KeepsInside(where)
    out, report = swap_group_norm(model, example_inputs=None if traced_by == "fx" else (x,))
    assert report.fused == [] and "keeps a" in report.not_fused[0][1]
    assert out.kept() is None and model.kept() is None  # the trace's values are not left behind
    torch.save(out, io.BytesIO())
    with torch.no_grad():
        out(x)
    torch.testing.assert_close(out.kept(), F.group_norm(x, 4))


def test_regression_a_trace_that_fails_leaves_no_traced_values_behind() -> None:
    """torch.fx stopped at a branch on values after the forward had kept a Proxy, which stayed
    in the swapped model (found by fuzzing)."""
    out, report = swap_group_norm(_KeepsInside("new attribute", branch=True))
    assert "torch.fx could not trace" in report.proof and out.kept() is None
    torch.save(out, io.BytesIO())


def test_regression_restore_keeps_a_removed_activations_mode() -> None:
    """The Identity put where a fused activation was trained by default, and restore gave the
    activation that mode: an eval-mode model came back with its SiLU training (found by
    fuzzing)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.SiLU()).eval()
    out, report = swap_group_norm(model)
    assert len(report.fused) == 1 and not any(m.training for m in out.modules())
    restored = restore_group_norm(out, report)
    assert not any(m.training for m in restored.modules())


class _MixedModes(nn.Module):
    """Scales the norm's output only while it trains with its encoder frozen (in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.act, self.enc = nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.enc(x))
        if self.training and not self.enc.training:
            h = h * 0.5
        return self.act(h)


def test_regression_a_model_in_mixed_modes_is_traced_in_them_too() -> None:
    """Traced only with every module training and with every module in eval mode, a frozen
    encoder's branch was never seen, and the fused model was 0.19 off (found by fuzzing)."""
    x = make_x((2, 16, 4, 4), torch.float32, seed=48)
    model = _MixedModes()
    model.enc.eval()
    with torch.no_grad():
        expected = model(x)
        out, report = swap_group_norm(model)
        assert report.fused == [] and "present mixed modes" in report.not_fused[0][1]
        assert out.training and not out.enc.training
        torch.testing.assert_close(out(x), expected)


def test_regression_restore_brings_back_the_parameters_held_now() -> None:
    """restore_group_norm put back the Parameters of swap time: weights loaded meanwhile with
    assign=True were lost, and a model built on meta and moved with to_empty kept meta ones."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.SiLU())
    out, report = swap_group_norm(model)
    loaded = {k: torch.randn_like(v) for k, v in out.state_dict().items()}
    out.load_state_dict(loaded, assign=True)
    back = restore_group_norm(out, report)
    assert type(back[1]) is nn.GroupNorm and torch.equal(back[1].weight, loaded["1.weight"])
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.SiLU())
    out, report = swap_group_norm(model)
    back = restore_group_norm(out.to_empty(device="cpu"), report)
    assert {p.device.type for p in back.parameters()} == {"cpu"}


def test_regression_weight_standardization_leaves_hooked_pruned_and_parametrized_convs() -> None:
    """The conv before a BatchNorm was replaced by a WSConv2d without the checks norms get:
    its hooks, its pruning (weight_orig / weight_mask) and its parametrizations were lost."""
    calls: list[int] = []
    hooked = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32))
    hooked[0].register_forward_hook(lambda m, args, out: calls.append(1))
    pruned = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32))
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    parametrized = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32))
    torch.nn.utils.parametrizations.weight_norm(parametrized[0])
    for model in (hooked, pruned, parametrized):
        conv_keys = [k for k in model.state_dict() if k.startswith("0.")]
        # inplace: a pruned conv's weight is not a leaf, which deepcopy refuses.
        out, report = convert_batchnorm(model, weight_standardize=True, inplace=True)
        assert not isinstance(out[0], WSConv2d) and report.ws_convs == []
        assert [k for k in out.state_dict() if k.startswith("0.")] == conv_keys
        if model is not parametrized:  # a ParametrizedConv2d is no plain Conv2d: not a candidate
            assert report.skipped[0] == (
                "0",
                "not weight-standardized: Conv2d has hooks registered on it",
            )
    hooked(make_x((1, 3, 8, 8), torch.float32, seed=45))
    assert calls == [1]


def test_regression_convert_builds_every_module_before_replacing_any() -> None:
    """An inplace conversion that failed on its second BatchNorm (an eps GroupNorm refuses) had
    already replaced the first."""
    model = nn.Sequential(nn.BatchNorm2d(32), nn.BatchNorm2d(32, eps=-1.0))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        convert_batchnorm(model, inplace=True)
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.BatchNorm2d]


def test_regression_proof_says_why_the_example_input_did_not_serve() -> None:
    model = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU())
    _, report = swap_group_norm(model, example_inputs=(torch.randn(2, 8, 4, 4),))  # C = 8
    assert report.proof.startswith("torch.export failed on the example input (RuntimeError: ")
    assert report.proof.endswith("torch.fx symbolic trace, in training and eval mode")


def test_regression_example_kwargs_that_are_no_dict_by_name_are_refused() -> None:
    """example_kwargs that were no dict went to torch.export, failed there, and the report said
    the export failed and fx's trace was used instead: a mistake reported as a fallback. A dict
    or list example input is one positional input, as torch.export takes it (a first version
    of this check refused them)."""
    model = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU())
    for bad_kwargs in ((("x", 1),), {1: torch.randn(2, 16, 4, 4)}):
        with pytest.raises(TypeError, match="example_kwargs must be a dict"):
            swap_group_norm(model, example_kwargs=bad_kwargs)  # type: ignore[arg-type]

    class TakesADict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.act = nn.GroupNorm(4, 16), nn.SiLU()

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.act(self.norm(batch["x"]))

    _, report = swap_group_norm(TakesADict(), example_inputs={"x": torch.randn(2, 16, 4, 4)})
    assert report.proof.startswith("torch.export") and len(report.fused) == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_regression_scripted_models_are_refused_not_reported_empty() -> None:
    """convert_batchnorm and swap_group_norm of a scripted model reported nothing converted
    (an empty report says no BatchNorm is left) while its BatchNorm stayed."""
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32)))
    for surgery in (convert_batchnorm, swap_group_norm):
        with pytest.raises(TypeError, match="TorchScript module"):
            surgery(scripted)  # type: ignore[operator]
        with pytest.raises(TypeError, match="holding a TorchScript module at '1'"):
            surgery(nn.Sequential(nn.ReLU(), scripted))  # type: ignore[operator]


def test_regression_ws_from_conv_takes_conv2d_only_and_keeps_a_ws_eps() -> None:
    """Conv1d became a broken WSConv2d, ConvTranspose2d failed with a tensor-size error, and a
    WSConv2d's own ws_eps was reset to 1e-6."""
    for conv in (nn.Conv1d(3, 8, 3), nn.ConvTranspose2d(3, 8, 3)):
        with pytest.raises(TypeError, match="WSConv2d.from_conv needs an nn.Conv2d"):
            WSConv2d.from_conv(conv)  # type: ignore[arg-type]
    ws = WSConv2d(3, 8, 3, ws_eps=1e-3)
    assert WSConv2d.from_conv(ws).ws_eps == 1e-3
    assert WSConv2d.from_conv(ws, ws_eps=1e-4).ws_eps == 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_regression_weight_standardized_models_script() -> None:
    """torch.jit.script failed on WSConv2d (the tuple of reduction dimensions and the error's
    tuple(shape) are not scriptable), so no model from convert_batchnorm(...,
    weight_standardize=True) could be scripted; ws_eps of inf (every filter 0) or a string
    passed the constructor."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    converted, _ = convert_batchnorm(model, num_groups=4, weight_standardize=True)
    converted.eval()
    x = torch.randn(2, 3, 9, 9)
    scripted = torch.jit.script(converted)
    torch.testing.assert_close(scripted(x), converted(x))  # TorchScript runs the shifted path
    for bad, error in ((float("inf"), ValueError), (0.0, ValueError), ("1e-6", TypeError)):
        with pytest.raises(error, match="ws_eps must be"):
            WSConv2d(3, 8, 3, ws_eps=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", [50.0, 200.0])
def test_regression_filters_far_from_zero_standardize_within_the_bound(ratio: float) -> None:
    """standardize_weight formed w - mean in float32 around 0: filters whose mean was 50
    deviations from 0 came out at up to 6x the float32 bound. Each filter is shifted by its
    first weight now, as GroupNorm by its pivot. (And a LazyConv2d before its first forward got
    a shape error from WSConv2d.from_conv.)"""
    from groupnorm.ws import standardize_weight

    gen = torch.Generator().manual_seed(81)
    w = 0.02 * torch.randn(256, 512, 3, 3, generator=gen) + ratio * 0.02
    rows = w.double().reshape(256, -1)
    centered = rows - rows.mean(1, keepdim=True)
    expected = centered / torch.sqrt((centered**2).mean(1, keepdim=True) + 1e-6)
    assert_matches(
        standardize_weight(w), to_numpy(expected.reshape(w.shape)), torch.float32, reduction=4608
    )
    with pytest.raises(ValueError, match="not initialized yet"):
        WSConv2d.from_conv(nn.LazyConv2d(8, 3))


@pytest.mark.parametrize(
    ("shape", "std"), [((64, 1, 3, 3), 0.01), ((32, 4, 1, 1), 0.05), ((64, 64, 3, 3), 0.005)]
)
def test_regression_float32_weight_standardization_gradient_within_the_bound(
    shape: tuple[int, ...], std: float
) -> None:
    """The float32 gradient of standardize_weight came from float32 statistics and their
    float32 backward: rstd * (dy - mean dy - w_hat * mean(dy * w_hat)) cancels, and small
    filters of small weights reached 10x the float32 bound. Both run in float64 now."""
    from groupnorm.ws import standardize_weight

    gen = torch.Generator().manual_seed(82)
    w = (std * torch.randn(shape, generator=gen)).requires_grad_()
    dy = torch.randn(shape, generator=gen)
    standardize_weight(w).backward(dy)
    w64 = w.detach().double().requires_grad_()
    rows = w64.reshape(shape[0], -1)
    centered = rows - rows.mean(1, keepdim=True)
    expected = centered / torch.sqrt((centered**2).mean(1, keepdim=True) + 1e-6)
    expected.reshape(shape).backward(dy.double())
    assert_matches(w.grad, to_numpy(w64.grad), torch.float32, reduction=rows.shape[1])


def test_regression_no_weight_standardization_of_one_weight_filters() -> None:
    """A depthwise 1x1 conv (one weight per filter) was standardized to all zeros: its output
    no longer depended on its input, silently."""
    model = nn.Sequential(nn.Conv2d(32, 32, 1, groups=32), nn.BatchNorm2d(32))
    out, report = convert_batchnorm(model, weight_standardize=True)
    assert type(out[0]) is nn.Conv2d and report.ws_convs == []
    assert "each filter has one weight" in report.skipped[0][1]


def test_regression_a_compiled_model_is_traced_through_its_wrapper() -> None:
    """torch.compile's OptimizedModule replaces its forward on the instance, so swapping a
    compiled model trusted no trace ("has its forward replaced on the instance") and fused
    nothing. Its forward is the wrapped module's, compiled: that module is traced."""
    gen = torch.Generator().manual_seed(0)
    conv, norm = nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8)
    compiled = torch.compile(nn.Sequential(conv, norm, nn.SiLU()), backend="eager")
    assert isinstance(compiled, nn.Module)
    swapped, report = swap_group_norm(compiled)
    assert [(p.norm, p.activation) for p in report.fused] == [("_orig_mod.1", "_orig_mod.2")]
    x = torch.randn(2, 3, 9, 9, generator=gen)
    with torch.no_grad():
        h = conv(x)
        y = swapped(x)
    expected, _ = reference(h, resolve_plan(8, 4), norm.weight, norm.bias)
    assert_matches(y, expected / (1 + np.exp(-expected)), torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_regression_a_changed_ws_eps_attribute_is_checked() -> None:
    """ws_eps was checked only by the constructor: set to -1 or NaN afterwards, every forward
    gave NaN without an error, eager and scripted. A NumPy ws_eps was refused, though it is a
    real number as a float is."""
    conv = WSConv2d(3, 8, 3, ws_eps=np.float32(1e-5))  # type: ignore[arg-type]
    assert isinstance(conv.ws_eps, float)
    x = torch.randn(2, 3, 9, 9)
    scripted = torch.jit.script(conv)
    for bad in (-1.0, math.nan, 0.0):
        conv.ws_eps = bad
        scripted.ws_eps = bad
        with pytest.raises(ValueError, match=r"ws_eps\) must be > 0 and finite"):
            conv(x)
        with pytest.raises(torch.jit.Error, match=r"ws_eps\) must be > 0 and finite"):
            scripted(x)


def test_regression_converters_take_bools_and_numpy_counts_as_torch_does() -> None:
    """inplace=1, weight_standardize="yes" and fuse_activation=0 were read by truthiness, where
    group_norm's flags (uneven, return_stats) take only bools; a NumPy num_groups was refused,
    though nn.GroupNorm takes one."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    for call in (
        lambda: convert_batchnorm(model, inplace=1),  # type: ignore[arg-type]
        lambda: convert_batchnorm(model, weight_standardize="yes"),  # type: ignore[arg-type]
        lambda: swap_group_norm(model, fuse_activation=0),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match="must be True or False"):
            call()
    converted, report = convert_batchnorm(model, num_groups=np.int64(4))  # type: ignore[arg-type]
    assert report.replaced[0].plan.sizes == (2, 2, 2, 2)
    assert type(converted[1].num_groups) is int


def _drop_act_expected(x: torch.Tensor, G: int, act: nn.Module, m: GroupNormDropAct) -> np.ndarray:
    """act(group_norm(x, G, m's weight and bias)) in float64: the reference, then torch's act."""
    w, b = (None if t is None else to_numpy(t) for t in (m.weight, m.bias))
    y, _ = R.group_norm_forward(to_numpy(x), G, w, b)
    return to_numpy(act.double()(torch.from_numpy(y)))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.Hardswish()], ids=["fused", "module"])
def test_regression_group_norm_drop_act_honours_a_changed_num_groups(act: nn.Module) -> None:
    """GroupNormDropAct's fused call (drop nn.Identity, act one the kernels compute) went to
    the planned function with the plan of construction: num_groups set after kept 4 groups
    (0.43-0.54 off), where the unfused call, GroupNorm and nn.GroupNorm take the new value."""
    x = make_x((2, 8, 4, 4), torch.float32, seed=71)
    m = GroupNormDropAct(4, 8, act=act)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.3)
        m.bias.normal_(0.0, 0.3)
    m.num_groups = 2
    assert_matches(m(x), _drop_act_expected(x, 2, act, m), torch.float32)


def test_regression_group_norm_drop_act_without_affine_takes_any_channel_count() -> None:
    """Without affine parameters nn.GroupNorm normalizes any channel count num_groups divides;
    GroupNormDropAct's fused call refused 12 channels ("expected x with 8 channels")."""
    x = make_x((2, 12, 3, 3), torch.float32, seed=72)
    act = nn.SiLU()
    m = GroupNormDropAct(2, 8, act=act, affine=False)
    assert_matches(m(x), _drop_act_expected(x, 2, act, m), torch.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.Hardswish()], ids=str)
def test_regression_group_norm_drop_act_traces_and_scripts(act: nn.Module) -> None:
    """torch.fx.symbolic_trace failed on the fused call ("x must be a torch.Tensor, got
    Proxy") and torch.jit.script on every GroupNormDropAct (super().forward and the activation
    lookup are not TorchScript), where GroupNorm does both."""
    x = make_x((2, 8, 4, 4), torch.float32, seed=73)
    model = nn.Sequential(GroupNormDropAct(4, 8, act=act, drop=nn.Identity()))
    norm = model[0]
    assert isinstance(norm, GroupNormDropAct)
    expected = _drop_act_expected(x, 4, act, norm)
    assert_matches(torch.fx.symbolic_trace(model)(x), expected, torch.float32, what="fx")
    assert_matches(torch.jit.script(model)(x), expected, torch.float32, what="script")


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("change", ["prune", "weight_norm"])
def test_regression_copying_a_model_with_a_computed_conv_weight_says_what_to_do(
    change: str,
) -> None:
    """A conv pruned with torch.nn.utils.prune, or under the old weight_norm, holds a weight
    that autograd computed; the converters' copy of the model failed inside torch's deepcopy
    ("Only Tensors created explicitly by the user ... support the deepcopy protocol")."""

    def model(norm: nn.Module) -> nn.Sequential:
        conv = nn.Conv2d(3, 16, 3)
        if change == "prune":
            prune.random_unstructured(conv, "weight", 0.5)
        else:
            torch.nn.utils.weight_norm(conv)
        return nn.Sequential(conv, norm)

    convert = lambda m, **kw: convert_batchnorm(m, num_groups=4, **kw)  # noqa: E731
    for call, norm in ((convert, nn.BatchNorm2d(16)), (swap_group_norm, nn.GroupNorm(4, 16))):
        with pytest.raises(ValueError, match=r"0 \(Conv2d\)\.weight is a tensor computed by"):
            call(model(norm))
        out, _ = call(model(norm), inplace=True)
        assert isinstance(out[1], GroupNorm)


def test_regression_swap_builds_every_module_before_replacing_any() -> None:
    """swap_group_norm replaced each GroupNorm as it built ours: an inplace swap that failed on
    the second (an eps ours refuses) had replaced the first, and the error named no module."""
    model = nn.Sequential(nn.GroupNorm(4, 8), nn.GroupNorm(4, 8, eps=-1e-5))
    with pytest.raises(ValueError, match=r"cannot replace 1 \(GroupNorm\): eps must be"):
        swap_group_norm(model, inplace=True)
    assert [type(m) for m in model] == [nn.GroupNorm, nn.GroupNorm]


def test_regression_a_parametrized_conv_before_a_norm_is_reported_not_standardized() -> None:
    """A conv under torch.nn.utils.parametrizations.weight_norm (a ParametrizedConv2d) before a
    converted norm was neither standardized nor listed in report.skipped; an existing WSConv2d
    is standardized already and is neither."""
    from torch.nn.utils import parametrizations

    model = nn.Sequential(
        parametrizations.weight_norm(nn.Conv2d(3, 8, 3)),
        nn.BatchNorm2d(8),
        WSConv2d(8, 8, 3),
        nn.BatchNorm2d(8),
    )
    out, report = convert_batchnorm(model, num_groups=4, weight_standardize=True)
    assert report.ws_convs == []
    assert [path for path, _ in report.skipped] == ["0"]
    assert "ParametrizedConv2d is not a plain Conv2d" in report.skipped[0][1]
    assert type(out[2]) is WSConv2d


@pytest.mark.parametrize("change", ["replaced", "deleted", "another_norm", "renumbered"])
def test_regression_restoring_a_model_changed_since_the_swap_changes_nothing(change: str) -> None:
    """A swapped norm replaced or deleted since the swap: restore_group_norm removed the hooks,
    restored some modules and died with an AttributeError, leaving the model half restored; a
    slot holding another module than the swap's (another norm, a block renumbered into it) was
    restored over it."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8)
    )
    swapped, report = swap_group_norm(model)
    if change == "replaced":
        swapped[4] = nn.Identity()
    elif change == "another_norm":
        swapped[4] = nn.GroupNorm(4, 16)
    elif change == "renumbered":
        del swapped[1]
    else:
        del swapped[4]
    before = [type(m) for m in swapped.children()]
    with pytest.raises(ValueError, match="changed since the swap, so it cannot be restored"):
        restore_group_norm(swapped, report)
    assert [type(m) for m in swapped.children()] == before
    with pytest.raises(TypeError, match="model must be the nn.Module"):
        restore_group_norm(None, report)  # type: ignore[arg-type]


def test_regression_standardize_weight_refuses_what_it_cannot_standardize() -> None:
    """An int weight came back standardized and truncated, a complex one lost its imaginary
    part; a list, an empty weight or a str eps failed inside; eps=True passed."""
    from groupnorm.ws import standardize_weight

    w = torch.randn(4, 2, 3, 3)
    for bad, error, match in (
        (w.int(), TypeError, "weight must be a floating tensor"),
        (w.to(torch.complex64), TypeError, "weight must be a floating tensor"),
        ([[1.0, 2.0]], TypeError, "weight must be a torch.Tensor, got list"),
        (w.to_sparse(), TypeError, "weight must be a dense tensor"),
        (w[:0], ValueError, "weight has no element"),
    ):
        with pytest.raises(error, match=match):
            standardize_weight(bad)  # type: ignore[arg-type]
    for eps in ("1e-6", None, True, torch.tensor(True), torch.ones(2)):
        with pytest.raises(TypeError, match="eps \\(ws_eps\\) must be a real number"):
            standardize_weight(w, eps)  # type: ignore[arg-type]
    as_tensor = standardize_weight(w, torch.tensor(1e-5))  # type: ignore[arg-type]
    torch.testing.assert_close(as_tensor, standardize_weight(w, 1e-5))


@pytest.mark.parametrize("missing", ["weight", "bias"])
def test_regression_a_batchnorm_whose_affine_parameter_was_set_to_none_converts(
    missing: str,
) -> None:
    """BatchNorm2d(32) with ``weight = None`` (torch runs it: affine stays True) made
    convert_batchnorm raise "copy_(): argument 'other' ... must be Tensor, not NoneType"."""
    bn = nn.BatchNorm2d(32)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    setattr(bn, missing, None)
    converted, _ = convert_batchnorm(nn.Sequential(bn), num_groups=8)
    new = converted[0]
    assert getattr(new, missing) is None
    weight = None if bn.weight is None else bn.weight.double()
    bias = None if bn.bias is None else bn.bias.double()
    x = make_x((2, 32, 3, 3), torch.float32)
    expected = F.group_norm(x.double(), 8, weight, bias, bn.eps)
    assert_matches(converted(x), to_numpy(expected), torch.float32)


def test_regression_a_batchnorm1d_in_one_channel_groups_is_named_in_the_report() -> None:
    """An MLP's BatchNorm1d(32) became 32 groups of 1, whose output on (N, C) inputs is the
    bias whatever the input; the report only said "check that groups hold several channels"."""
    model = randomize(nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.BatchNorm1d(8)), 41)
    out, report = convert_batchnorm(model, num_groups=4)
    assert not any("whatever the input" in w for w in report.warnings)
    out, report = convert_batchnorm(model, policy="choose")
    x = make_x((5, 4), torch.float32, seed=42)
    with torch.no_grad(), pytest.warns(SingleElementGroupWarning, match="just beta"):
        assert torch.equal(out[:2](x), out[1].bias.expand(5, 32))  # what the report says
    (warning,) = [w for w in report.warnings if "whatever the input" in w]
    assert warning.startswith("1: BatchNorm1d(C=32) -> 32 groups of 1: on (N, C) inputs")
    assert "group_size >= 2" in warning
    # BatchNorm1d(8) got choose_num_groups' 4 groups of 2: the general hint stays for it.
    assert any("check that groups hold several channels" in w for w in report.warnings)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")
@pytest.mark.parametrize(
    "tracer",
    [
        "fx",
        pytest.param("jit.trace", marks=pytest.mark.slow),  # seconds: TorchScript records
        pytest.param("export", marks=pytest.mark.slow),
    ],
)
def test_regression_weight_standardized_conv_traces(tracer: str) -> None:
    """torch.fx.symbolic_trace of a model holding a WSConv2d failed with "weight must be a
    torch.Tensor, got Proxy" (standardize_weight's checks read fx's Proxy of the weight), where
    a plain nn.Conv2d traces; torch.jit.trace warned a TracerWarning (the weight's element
    count, a traced tensor, compared to 0), an error under warnings-as-errors. The traced
    model runs inputs of other sizes as eager does."""
    gen = torch.Generator().manual_seed(91)
    conv = WSConv2d(3, 8, 3, padding=1, padding_mode="reflect", ws_eps=1e-5)
    model = nn.Sequential(conv, nn.ReLU())
    with torch.no_grad():
        conv.weight.copy_(0.1 * torch.randn(conv.weight.shape, generator=gen) + 0.05)
        conv.bias.copy_(torch.randn(8, generator=gen))
    example = torch.randn(2, 3, 7, 7, generator=gen)
    if tracer == "fx":
        run: Callable[[torch.Tensor], torch.Tensor] = torch.fx.symbolic_trace(model)
    elif tracer == "jit.trace":
        run = torch.jit.trace(model, (example,))
    else:
        run = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("n"), 2: None, 3: None},)
        ).module()
    rows = conv.weight.detach().double().reshape(8, -1)
    centered = rows - rows.mean(1, keepdim=True)
    w_hat = centered / torch.sqrt((centered**2).mean(1, keepdim=True) + 1e-5)
    for x in (example, torch.randn(3, 3, 7, 7, generator=gen)):
        padded = F.pad(x.double(), (1, 1, 1, 1), mode="reflect")
        expected = F.relu(F.conv2d(padded, w_hat.reshape(conv.weight.shape), conv.bias.double()))
        assert_matches(run(x), to_numpy(expected), torch.float32, reduction=27, what=tracer)
