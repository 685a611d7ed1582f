"""CPU: third-party model classes before and after groupnorm's surgery, with what was done.

For each model (random weights, small input): the modules converted (BatchNorm -> GroupNorm,
policy='uneven') or swapped (GroupNorm -> ours), fused and skipped, and the forward time of the
original and of the result, eval mode, no grad. Samples alternate between the two (see
cpu_standard.py); the table gives medians. Needs the model environment (./dev test-models
builds it: torch 2.14.1, torchvision, timm, monai, diffusers).

    .venv-models/bin/python benchmarks/adoption.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from cpu_standard import save, small_input_args
from torch import nn

import groupnorm
from groupnorm import bench

SAMPLES = 10
Build = Callable[[], tuple[nn.Module, tuple[Any, ...], str]]


def _timm(name: str, how: str) -> Build:
    def build() -> tuple[nn.Module, tuple[Any, ...], str]:
        import timm

        return timm.create_model(name, num_classes=10), (torch.randn(2, 3, 64, 64),), how

    return build


def _tv(name: str) -> Build:
    def build() -> tuple[nn.Module, tuple[Any, ...], str]:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=10)
        return model, (torch.randn(2, 3, 64, 64),), "convert"

    return build


def _monai(name: str) -> Build:
    def build() -> tuple[nn.Module, tuple[Any, ...], str]:
        from monai.networks import nets

        x = (torch.randn(1, 1, 32, 32, 32),)
        if name == "SegResNet":
            return nets.SegResNet(spatial_dims=3, init_filters=8, out_channels=2), x, "swap"
        if name == "UNet":
            model = nets.UNet(
                3, 1, 4, (8, 16, 32), (2, 2), num_res_units=1, norm=("group", {"num_groups": 4})
            )
            return model, x, "swap"
        model = nets.DynUNet(
            3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], norm_name="batch", filters=[8, 16, 32]
        )
        return model, x, "convert"

    return build


def _diffusers(name: str) -> Build:
    def build() -> tuple[nn.Module, tuple[Any, ...], str]:
        import diffusers

        if name == "AutoencoderKL":
            vae = diffusers.AutoencoderKL(
                block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=16,
            )
            return vae, (torch.randn(1, 3, 64, 64),), "swap"
        unet = diffusers.UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=16,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        return unet, (torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 5, 16)), "swap"

    return build


MODELS: dict[str, Build] = {
    "timm efficientnet_b0": _timm("efficientnet_b0", "convert"),
    "timm mobilenetv3_large_100": _timm("mobilenetv3_large_100", "convert"),
    "timm regnety_002": _timm("regnety_002", "convert"),
    "timm cspresnet50": _timm("cspresnet50", "convert"),
    "timm resnet50_gn": _timm("resnet50_gn", "swap"),
    "torchvision resnet50": _tv("resnet50"),
    "torchvision mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "torchvision efficientnet_b0": _tv("efficientnet_b0"),
    "MONAI SegResNet (3-D)": _monai("SegResNet"),
    "MONAI UNet (3-D, GroupNorm)": _monai("UNet"),
    "MONAI DynUNet (3-D)": _monai("DynUNet"),
    "diffusers AutoencoderKL": _diffusers("AutoencoderKL"),
    "diffusers UNet2DConditionModel": _diffusers("UNet2DConditionModel"),
}


def _reasons(pairs: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, why in pairs:
        counts[why] = counts.get(why, 0) + 1
    return counts


def run() -> list[dict[str, Any]]:
    rows = []
    for label, build in MODELS.items():
        torch.manual_seed(0)
        model, args, how = build()
        model.eval()
        row: dict[str, Any] = {
            "model": label,
            "surgery": how,
            "input": [list(a.shape) for a in args],
        }
        if how == "convert":
            new, rep = groupnorm.convert_batchnorm(model, policy="uneven")
            row |= {
                "converted": len(rep.replaced),
                "fused": sum("computed fused" in r.act for r in rep.replaced),
                "fewer_groups": sum("fewer channels" in r.reason for r in rep.replaced),
                "skipped": _reasons(rep.skipped),
            }
        else:
            new, srep = groupnorm.swap_group_norm(model)
            row |= {
                "swapped": len(srep.swapped),
                "fused": len(srep.fused),
                "not_fused": _reasons(srep.not_fused),
                "skipped": _reasons(srep.skipped),
                "proof": srep.proof,
            }
        new.eval()
        with torch.no_grad():
            before, after = bench.time_pair(partial(model, *args), partial(new, *args), SAMPLES)
        row |= {
            "before_ms": 1e3 * statistics.median(before),
            "after_ms": 1e3 * statistics.median(after),
        }
        rows.append(row)
        done = row.get("converted", row.get("swapped"))
        print(
            f"{label:34s} {how:7s} {done:4d} fused {row['fused']:3d}  "
            f"{row['before_ms']:8.2f} ms -> {row['after_ms']:8.2f} ms",
            flush=True,
        )
    return rows


def main() -> None:
    args = small_input_args(__doc__)
    save(args.out, "adoption", run())


if __name__ == "__main__":
    main()
