"""The study's data: a procedurally generated offline default ("strokes") and CIFAR-10/100.

``strokes``: 10 classes of 3 x 12 x 12 images (``size=`` to change), generated in-process from a
fixed seed, so every machine sees the same pixels with no download. A class is an (orientation,
colour family) pair: five bar orientations, pi/5 apart, x two colour families (warm: red above
blue; cool: blue above red). Each image has three bars of its class (each bar's angle jittered,
its position and length random, one colour from the family), two fainter distractor bars of any
angle and colour, a random background and pixel noise. The jitter makes neighbouring
orientations overlap and the colour families overlap by a margin, so some images are ambiguous:
the quick preset's small ResNet ends at 23-27 % test error with BN or GN, not 1 %, and there is
room to do worse.

CIFAR (the torchvision folder layout, MD5-checked) is read by :mod:`groupnorm.study.cifar`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from groupnorm.study import cifar

if TYPE_CHECKING:
    from groupnorm.study.runner import StudyConfig

__all__ = ["DATASETS", "Dataset", "load_dataset", "make_strokes"]

ORIENTATIONS = 5


@dataclass(frozen=True)
class Dataset:
    """Tensors in memory: images (N, C, H, W) float32, standardized per channel with the
    training set's statistics; labels (N,) int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])


def _colour(family: torch.Tensor, gen: torch.Generator, overlap: float) -> torch.Tensor:
    """(B,) family (0 warm, 1 cool) -> (B, 3) RGB in [0, 1]. Warm has red above blue and cool
    the reverse by a random margin in (-overlap, 1): a fraction of each family crosses over."""
    B = family.shape[0]
    base = torch.rand(B, generator=gen) * 0.6 + 0.2
    margin = torch.rand(B, generator=gen) * (1 + overlap) - overlap
    green = torch.rand(B, generator=gen)
    sign = 1 - 2 * family.float()  # warm +1, cool -1
    red = base + 0.5 * sign * margin * 0.6
    blue = base - 0.5 * sign * margin * 0.6
    return torch.stack([red, green, blue], dim=1).clamp(0, 1)


def _render(
    labels: torch.Tensor,
    gen: torch.Generator,
    size: int,
    noise: float,
    overlap: float,
    jitter: float,
    strokes: int,
    distractors: int,
) -> torch.Tensor:
    """Images (B, 3, size, size) for ``labels`` (B,), drawn with ``gen``."""
    B = labels.shape[0]
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32) + 0.5,
        torch.arange(size, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    bg = torch.rand(B, 3, 1, 1, generator=gen) * 0.4 + 0.3
    img = bg.expand(B, 3, size, size).clone()

    def draw(
        img: torch.Tensor, angle: torch.Tensor, col: torch.Tensor, alpha: float
    ) -> torch.Tensor:
        """One bar per sample (half-length 2.5-4.5 px, half-width 0.6 px, soft edges) at a
        random position, composited with opacity ``alpha``."""
        centre = torch.rand(B, 2, generator=gen) * (size - 4) + 2
        half = torch.rand(B, generator=gen) * 2.0 + 2.5
        c, s = torch.cos(angle).view(B, 1, 1), torch.sin(angle).view(B, 1, 1)
        dx = xs - centre[:, 0].view(B, 1, 1)
        dy = ys - centre[:, 1].view(B, 1, 1)
        along = (c * dx + s * dy).abs() - half.view(B, 1, 1)
        across = (-s * dx + c * dy).abs() - 0.6
        d = torch.maximum(along, across)
        cover = torch.sigmoid(-d / 0.35).unsqueeze(1) * alpha
        return img * (1 - cover) + col * cover

    for _ in range(distractors):  # any orientation and colour, fainter
        img = draw(
            img, torch.rand(B, generator=gen) * math.pi, torch.rand(B, 3, 1, 1, generator=gen), 0.35
        )
    base = (labels % ORIENTATIONS).float() * math.pi / ORIENTATIONS
    col = _colour(labels // ORIENTATIONS, gen, overlap).view(B, 3, 1, 1)
    for _ in range(strokes):
        angle = base + (torch.rand(B, generator=gen) * 2 - 1) * jitter
        img = draw(img, angle, col, 0.9)
    return img + noise * torch.randn(img.shape, generator=gen)


def make_strokes(
    train: int = 10000,
    test: int = 2000,
    *,
    seed: int = 0,
    size: int = 12,
    noise: float = 0.05,
    overlap: float = 0.1,
    jitter: float = 0.4,
    strokes: int = 3,
    distractors: int = 2,
) -> Dataset:
    """The procedurally generated default: ``train`` + ``test`` images of 3 x size x size.

    The same ``seed`` gives the same pixels on every machine (CPU generator, float32 ops).
    Classes are balanced. ``noise``: the pixel noise's std; ``overlap``: how far the colour
    families overlap (a fraction ``overlap / (1 + overlap)`` of each family has the other's
    red/blue order); ``jitter``: each bar's angle deviates from its class's by up to this
    many radians (the classes are pi/5 = 0.63 rad apart); ``strokes``: bars per image;
    ``distractors``: fainter bars of any angle and colour.
    """
    if train < 10 or test < 10:
        raise ValueError(f"strokes needs at least 10 train and 10 test images, got {train}, {test}")
    if size < 8:
        raise ValueError(
            f"strokes images must be at least 8 px (bars up to 9 px long), got size={size}"
        )
    gen = torch.Generator().manual_seed(seed)
    num_classes = 2 * ORIENTATIONS
    labels = torch.arange(train + test) % num_classes
    labels = labels[torch.randperm(train + test, generator=gen)]
    x = torch.cat(
        [
            _render(chunk, gen, size, noise, overlap, jitter, strokes, distractors)
            for chunk in labels.split(4096)
        ]
    )
    return _standardized("strokes", x, labels, train, num_classes)


def _standardized(
    name: str, x: torch.Tensor, labels: torch.Tensor, train: int, num_classes: int
) -> Dataset:
    """Split at ``train`` and standardize every channel with the training images' statistics."""
    x = x.float()
    mean = x[:train].mean(dim=(0, 2, 3), keepdim=True)
    std = x[:train].std(dim=(0, 2, 3), keepdim=True)
    x = (x - mean) / std
    return Dataset(
        name,
        x[:train].contiguous(),
        labels[:train].contiguous(),
        x[train:].contiguous(),
        labels[train:].contiguous(),
        num_classes,
    )


DATASETS = ("strokes", "cifar10", "cifar100")


def load_dataset(
    cfg: StudyConfig, data_dir: str | None, *, download_url: str | None = None
) -> Dataset:
    """The study's data: generated (``strokes``) or read from ``data_dir`` (CIFAR; fetched first
    when ``download_url`` is given, "" meaning the official address). ``train_size`` /
    ``test_size`` take the first images of each split (all of them when None)."""
    if cfg.data == "strokes":
        return make_strokes(
            cfg.train_size or 10000, cfg.test_size or 2000, seed=cfg.data_seed, size=cfg.image_size
        )
    if cfg.data not in DATASETS:
        raise ValueError(f"unknown data {cfg.data!r}; choose one of {DATASETS}")
    if data_dir is None:
        raise ValueError(
            f"--data {cfg.data} reads the torchvision folder layout from "
            f"--data-dir DIR (add --download to fetch it)"
        )
    if download_url is not None:
        cifar.download(Path(data_dir), cfg.data, url=download_url or None)
    tx, ty, vx, vy, classes = cifar.read_cifar(Path(data_dir), cfg.data)
    ntr = len(ty) if cfg.train_size is None else min(cfg.train_size, len(ty))
    nte = len(vy) if cfg.test_size is None else min(cfg.test_size, len(vy))
    x = torch.from_numpy(np.concatenate([tx[:ntr], vx[:nte]])).float() / 255
    y = torch.from_numpy(np.concatenate([ty[:ntr], vy[:nte]]))
    return _standardized(cfg.data, x, y, ntr, classes)
