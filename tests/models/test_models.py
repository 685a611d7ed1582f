"""Real model classes from timm, torchvision, MONAI and diffusers (small inputs, random weights,
nothing downloaded): converted or swapped, checked against float64, trained one step, and every
norm module accounted for in the report.

These need the model environment (see README: torch 2.14.1 with torchvision 0.29.1, timm, monai,
diffusers); elsewhere they skip, and under GROUPNORM_REQUIRE_MODEL_LIBS=1 (CI) they fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import GroupNorm, convert_batchnorm, restore_group_norm, swap_group_norm
from groupnorm.convert import GroupNormDropAct
from tests._inputs import make_x, reference
from tests._thirdparty import need, randomize, small_unet_condition, small_vae
from tests._tolerances import assert_matches, to_numpy

Run = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _paths(model: nn.Module, keep: Callable[[nn.Module], bool]) -> set[str]:
    return {p for p, m in model.named_modules(remove_duplicate=False) if keep(m)}


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or "FrozenBatchNorm" in type(m).__name__


def _train_step(model: nn.Module, x: torch.Tensor, run: Run) -> None:
    """One SGD step: finite loss, a finite gradient for every parameter that has one, and one
    for every GroupNorm's weight."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = run(model, x).float().square().mean()
    assert torch.isfinite(loss), loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for path, m in model.named_modules():
        if isinstance(m, GroupNorm) and m.affine:
            assert m.weight.grad is not None, f"{path} got no gradient"
    opt.step()


def _convert(model: nn.Module, x: torch.Tensor, run: Run = lambda m, x: m(x)) -> Any:
    """convert_batchnorm(policy='uneven'): every BatchNorm-like module in replaced or skipped,
    BN+act modules keep their act and drop, each converted norm's output equals the float64
    reference on the input it saw, and one training step."""
    before = _paths(model, _is_batchnorm)
    acts = {
        p: (repr(m.drop), repr(m.act))
        for p, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "act")
    }
    out, report = convert_batchnorm(model, policy="uneven")
    replaced = {p for r in report.replaced for p in r.paths}
    assert replaced | {p for p, _ in report.skipped} == before
    assert not _paths(out, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm)) - {
        p for p, _ in report.skipped
    }
    for path, (drop, act) in acts.items():
        new = out.get_submodule(path)
        assert isinstance(new, GroupNormDropAct) and (repr(new.drop), repr(new.act)) == (drop, act)

    seen: list[tuple[GroupNorm, torch.Tensor, torch.Tensor]] = []
    hooks = [
        # Copies: an inplace ReLU after the norm overwrites its output.
        m.register_forward_hook(lambda m, args, y: seen.append((m, args[0].clone(), y.clone())))
        for m in out.modules()
        if isinstance(m, GroupNorm)
    ]
    out.eval()
    with torch.no_grad():
        run(out, x)
    for h in hooks:
        h.remove()
    assert len(seen) >= len(report.replaced)
    for m, inp, y in seen:
        expected, _ = reference(inp, m.plan, m.weight, m.bias, m.eps)
        if isinstance(m, GroupNormDropAct):  # eval: drop is the identity; act in float64
            expected = to_numpy(m.act(torch.from_numpy(expected)))
        assert_matches(y, expected, torch.float32, reduction=inp[0].numel() // m.num_groups)
    _train_step(out, x, run)
    return report


def _swap(
    model: nn.Module, x: torch.Tensor, run: Run = lambda m, x: m(x), **kw: Any
) -> groupnorm.SwapReport:
    """swap_group_norm: every GroupNorm-like module swapped or skipped, every swapped one fused
    or given a reason, outputs equal to the original's (float64 against float64, float32 against
    float64), restore gives the original classes back, and one training step."""
    before = _paths(model, lambda m: isinstance(m, nn.GroupNorm))
    out, report = swap_group_norm(model, **kw)
    assert set(report.swapped) | {p for p, _ in report.skipped} == before
    decided = {f.norm for f in report.fused} | {p for p, _ in report.not_fused}
    assert decided == set(report.swapped), decided ^ set(report.swapped)
    with torch.no_grad():
        model64 = copy.deepcopy(model).double().eval()
        expected = to_numpy(run(model64, x.double()))
        kw64 = {**kw, "example_inputs": _double(kw["example_inputs"])} if kw else kw
        assert_matches(
            run(swap_group_norm(model64, **kw64)[0], x.double()),
            expected,
            torch.float64,
            reduction=4096,
        )
        assert_matches(run(out.eval(), x), expected, torch.float32, reduction=4096)
    _train_step(out, x, run)
    restored = restore_group_norm(out, report)
    assert not any(isinstance(m, GroupNorm) for m in restored.modules())
    return report


def _double(inputs: tuple[torch.Tensor, ...] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


# ---------------------------------------------------------------------------------------------
# timm


@pytest.mark.parametrize(
    "name", ["efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "cspresnet50"]
)
def test_timm_batchnorm_act_models_convert(name: str) -> None:
    timm = need("timm")
    torch.manual_seed(40)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10), seed=41)
    bn_act = sum(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    report = _convert(model, make_x((2, 3, 64, 64), torch.float32, seed=42))
    assert bn_act > 0 and sum(r.kind == "BatchNormAct2d" for r in report.replaced) == bn_act
    assert report.skipped == []


def test_timm_resnet50_gn_swaps_with_same_outputs() -> None:
    timm = need("timm")
    torch.manual_seed(43)
    model = randomize(timm.create_model("resnet50_gn", pretrained=False, num_classes=10), 44)
    report = _swap(model.eval(), make_x((2, 3, 64, 64), torch.float32, seed=45))
    assert len(report.swapped) == 53 and report.skipped == []
    # Fused: the stem's bn1 -> act1 and, in each of 16 Bottlenecks, bn1 -> act1 and
    # bn2 -> drop_block (Identity, traced through) -> act2. Not: bn3 and downsample, which feed
    # the residual add.
    assert (
        report.proof == "torch.fx symbolic trace, in training and eval mode"
        and len(report.fused) == 1 + 16 * 2
    )
    assert all("goes to the op add" in why for _, why in report.not_fused)


def test_timm_group_norm_act_keeps_its_activation() -> None:
    timm = need("timm")
    torch.manual_seed(46)
    model = randomize(
        timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10), seed=47
    )
    report = _swap(model.eval(), make_x((2, 3, 64, 64), torch.float32, seed=48))
    acts = [p for p, m in model.named_modules() if type(m).__name__ == "GroupNormAct"]
    assert acts and {f.norm for f in report.fused if f.rule == "GroupNormAct"} == set(acts)


@pytest.mark.parametrize("factory", ["num_groups_keyword", "positional"])
def test_timm_norm_layer_factories_accept_ours(factory: str) -> None:
    timm = need("timm")
    layer = (
        partial(groupnorm.GroupNorm, num_groups=8)
        if factory == "num_groups_keyword"
        else partial(groupnorm.GroupNorm, 32)
    )
    torch.manual_seed(49)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, norm_layer=layer)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is GroupNorm for m in norms)
    # timm drops a partial's positional arguments (it rebinds keywords only), so
    # partial(GroupNorm, 32) reaches us as GroupNorm(C): 32 groups, GroupNorm's default.
    assert {m.num_groups for m in norms} == {8 if factory == "num_groups_keyword" else 32}
    _train_step(model, make_x((2, 3, 32, 32), torch.float32, seed=50), lambda m, x: m(x))
    if factory == "positional":
        return  # efficientnet_b0 has C=16, which timm's GroupNormAct cannot split in 32
    # Models built on timm's norm+act layers map our class to timm's GroupNormAct; swap those.
    eff = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10, norm_layer=layer)
    out, report = swap_group_norm(eff)
    assert report.swapped and not any(
        isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm) for m in out.modules()
    )


# ---------------------------------------------------------------------------------------------
# torchvision


@pytest.mark.parametrize(
    "name, bns", [("resnet50", 53), ("mobilenet_v3_large", 46), ("efficientnet_b0", 49)]
)
def test_torchvision_models_convert(name: str, bns: int) -> None:
    tv = need("torchvision")
    torch.manual_seed(51)
    model = randomize(getattr(tv.models, name)(weights=None, num_classes=10), seed=52)
    report = _convert(model, make_x((2, 3, 64, 64), torch.float32, seed=53))
    assert len(report.replaced) == bns and report.skipped == []
    if name != "resnet50":  # C=16 < 32 groups: fewer groups for that layer, and said so
        assert any("fewer channels than 32 groups" in r.reason for r in report.replaced)


# ---------------------------------------------------------------------------------------------
# MONAI, 3-D


def test_monai_segresnet_swaps_and_fuses_the_shared_activation() -> None:
    nets = need("monai.networks.nets")
    torch.manual_seed(54)
    model = randomize(
        nets.SegResNet(
            spatial_dims=3,
            init_filters=8,
            in_channels=1,
            out_channels=2,
            blocks_down=(1, 2),
            blocks_up=(1,),
        ),
        seed=55,
    )
    report = _swap(model.eval(), make_x((1, 1, 16, 16, 16), torch.float32, seed=56))
    # ResBlock applies one ReLU after norm1 and after norm2: both fused, the ReLU removed.
    assert len(report.fused) == len(report.swapped) and report.not_fused == []


def test_monai_unet_reports_the_dropout_between_norm_and_activation() -> None:
    nets = need("monai.networks.nets")
    unet = partial(
        nets.UNet,
        spatial_dims=3,
        in_channels=1,
        out_channels=4,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
    )
    torch.manual_seed(57)
    model = randomize(unet(norm=("group", {"num_groups": 4}), act="relu"), seed=58)
    x = make_x((1, 1, 16, 16, 16), torch.float32, seed=59)
    report = _swap(model.eval(), x)
    assert report.fused == [] and report.not_fused
    assert all("(Dropout), not to exactly one" in why for _, why in report.not_fused)
    _convert(randomize(unet(norm="batch"), seed=60), x)


def test_monai_dynunet_converts() -> None:
    nets = need("monai.networks.nets")
    torch.manual_seed(61)
    model = nets.DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        norm_name="batch",
        filters=[8, 16, 32],
    )
    report = _convert(randomize(model, 62), make_x((1, 1, 16, 16, 16), torch.float32, seed=63))
    assert len(report.replaced) == 10


# ---------------------------------------------------------------------------------------------
# diffusers: the trace on an example input proves what the pinned forwards do


def test_diffusers_autoencoder_kl_trace_proves_the_pinned_fusion() -> None:
    diffusers = need("diffusers")
    vae = small_vae(diffusers, seed=64)
    x = make_x((1, 3, 32, 32), torch.float32, seed=66)
    run: Run = lambda m, x: m(x).sample  # noqa: E731
    pinned = swap_group_norm(vae)[1]
    traced = _swap(vae, x, run, example_inputs=x)
    assert traced.proof == "torch.export on the example input, in training and eval mode"
    assert {f.norm for f in traced.fused} == {f.norm for f in pinned.fused}


def test_diffusers_unet2d_condition_trace_proves_the_pinned_fusion() -> None:
    diffusers = need("diffusers")
    unet = small_unet_condition(diffusers, seed=67)
    context = make_x((2, 5, 16), torch.float32, seed=69)
    t = torch.tensor([4, 4])
    run: Run = lambda m, x: m(x, t, context.to(x.dtype)).sample  # noqa: E731
    x = make_x((2, 4, 8, 8), torch.float32, seed=70)
    pinned = swap_group_norm(unet)[1]
    traced = _swap(unet, x, run, example_inputs=(x, t, context))
    assert traced.proof == "torch.export on the example input, in training and eval mode"
    as_pairs = {(f.norm, f.moved_to) for f in traced.fused}
    assert as_pairs == {(f.norm, f.moved_to) for f in pinned.fused}
    assert np.all([f.moved_to for f in traced.fused if ".resnets." in f.norm])
