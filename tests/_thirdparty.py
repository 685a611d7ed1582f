"""Importing third-party model libraries in tests: skip where they are not installed (a dev venv
without them), fail where they must be (CI's model environment sets
GROUPNORM_REQUIRE_MODEL_LIBS=1, so a broken install cannot pass as a skip)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TypeVar

import pytest
import torch
from torch import nn

REQUIRE = os.environ.get("GROUPNORM_REQUIRE_MODEL_LIBS") == "1"


def need(name: str) -> ModuleType:
    """``import name``, or a skip (a failure under GROUPNORM_REQUIRE_MODEL_LIBS=1).

    Any exception counts, not only ImportError: a torchvision built for another torch raises
    RuntimeError when its operators register, and diffusers then fails in its own imports."""
    try:
        return importlib.import_module(name)
    except Exception as e:
        why = f"{name} does not import here ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        if REQUIRE:
            pytest.fail(f"{why}; GROUPNORM_REQUIRE_MODEL_LIBS=1 requires it")
        pytest.skip(why)


M = TypeVar("M", bound=nn.Module)


def randomize(model: M, seed: int = 0) -> M:
    """Random affine parameters for every BatchNorm and GroupNorm (fresh modules start at
    weight 1, bias 0: a copy of those would pass a test that copied nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


def small_vae(diffusers: ModuleType, seed: int) -> nn.Module:
    """A diffusers AutoencoderKL small enough for CPU tests (32x32 RGB in), random weights."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
    )
    return randomize(vae.eval(), seed)


def small_unet_condition(diffusers: ModuleType, seed: int) -> nn.Module:
    """A diffusers UNet2DConditionModel for (N, 4, 8, 8) latents and (N, L, 16) context."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return randomize(unet.eval(), seed)
