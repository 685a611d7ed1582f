"""torch.save(model) / torch.load(path) with weights_only=True, once our classes are allowed."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import GroupNorm, GroupNormAct, WSConv2d, swap_group_norm
from groupnorm.convert import GroupNormDropAct
from tests._inputs import make_x
from tests._thirdparty import randomize


class Fusable(nn.Module):
    """A model whose swap moves a SiLU into a Linear's forward pre-hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = WSConv2d(3, 8, 3, padding=1)
        self.norm, self.act, self.proj = nn.GroupNorm(2, 8), nn.SiLU(), nn.Linear(3, 8)
        self.tail = nn.Sequential(
            GroupNorm(3, 8, uneven=True), GroupNormAct(4, 8), GroupNormDropAct(2, 8, act=nn.GELU())
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.conv(x)))
        return self.tail(h + self.proj(self.act(t))[:, :, None, None])


def test_saved_model_loads_with_weights_only_once_our_classes_are_allowed() -> None:
    model, report = swap_group_norm(randomize(Fusable(), seed=36).eval())
    assert [f.moved_to for f in report.fused] == [("proj",)]
    x, t = make_x((2, 3, 5, 5), torch.float32, seed=37), make_x((2, 3), torch.float32, seed=38)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(buf)  # torch's default is weights_only=True
    buf.seek(0)
    with torch.serialization.safe_globals(groupnorm.safe_globals(Fusable())):
        loaded = torch.load(buf)
    assert loaded.tail[0].plan == model.tail[0].plan and loaded.norm.activation == "silu"
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))  # the same computation, hook included


def test_safe_globals_lists_ours_then_the_models_classes_once() -> None:
    ours = groupnorm.safe_globals()
    assert GroupNorm in ours and WSConv2d in ours and nn.Sequential not in ours
    listed = groupnorm.safe_globals(Fusable())
    assert listed[: len(ours)] == ours and len(set(listed)) == len(listed)
    assert {Fusable, nn.Sequential, nn.SiLU, nn.GELU, nn.Linear} <= set(listed)


def test_regression_safe_globals_of_a_fresh_model_allow_what_the_swap_added() -> None:
    """safe_globals(model) of a model built the same way as a swapped one lacked nn.Identity,
    which swap_group_norm puts where a fused activation was: torch.load refused it with
    "Unsupported global: torch.nn.modules.linear.Identity"."""

    def build() -> nn.Module:
        return randomize(nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.SiLU()), 39)

    swapped, report = swap_group_norm(build().eval())
    assert type(swapped[2]) is nn.Identity and report.fused
    buf = io.BytesIO()
    torch.save(swapped, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(groupnorm.safe_globals(build())):
        loaded = torch.load(buf)
    x = make_x((2, 3, 6, 6), torch.float32, seed=40)
    with torch.no_grad():
        assert torch.equal(loaded(x), swapped(x))
