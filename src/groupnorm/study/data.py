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

Fashion-MNIST (idx files, checksummed) is read by :mod:`groupnorm.study.fashion`, CIFAR (the
torchvision folder layout, MD5-checked) by :mod:`groupnorm.study.cifar`.

Splits: ``val_size`` images of the training file (a fixed draw with ``data_seed``) are held out
for recipe choices; the rest is the pool each run draws its own ``train_size`` images from (the
draw depends on the run's seed). The test set is the first ``test_size`` test images (None: all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groupnorm.study import cifar, fashion
from groupnorm.study.config import StudyConfig

__all__ = ["Dataset", "load_dataset", "make_strokes"]

ORIENTATIONS = 5
NUM_STROKE_CLASSES = 2 * ORIENTATIONS


@dataclass(frozen=True)
class Dataset:
    """Tensors in memory: images (N, C, H, W) float32, standardized per channel with the
    pool's statistics; labels (N,) int64.

    ``train_x``/``train_y``: the pool runs draw their training images from; ``test_x``/
    ``test_y``: what runs are evaluated on, the test set or, when choosing a recipe, the
    validation split (``evaluated_on`` says which; the other is not loaded at all);
    ``run_size``: training images per run (None: the whole pool, in its order).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    evaluated_on: str = "test"
    run_size: int | None = None

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    def run_indices(self, seed: int) -> torch.Tensor:
        """The pool indices of seed ``seed``'s training images: a draw of ``run_size`` without
        replacement (its own generator, so the model's init and batch order do not shift it),
        or the whole pool when ``run_size`` is None or not smaller than the pool."""
        pool = len(self.train_y)
        if self.run_size is None or self.run_size >= pool:
            return torch.arange(pool)
        gen = torch.Generator().manual_seed(20_000 + seed)
        return torch.randperm(pool, generator=gen)[: self.run_size].sort().values


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


def _strokes_raw(
    train: int,
    test: int,
    seed: int,
    size: int,
    noise: float = 0.05,
    overlap: float = 0.1,
    jitter: float = 0.4,
    strokes: int = 3,
    distractors: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``train + test`` unstandardized images (B, 3, size, size) and balanced labels (B,)."""
    if train < 10 or test < 10:
        raise ValueError(f"strokes needs at least 10 train and 10 test images, got {train}, {test}")
    if size < 8:
        raise ValueError(
            f"strokes images must be at least 8 px (bars up to 9 px long), got size={size}"
        )
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(train + test) % NUM_STROKE_CLASSES
    labels = labels[torch.randperm(train + test, generator=gen)]
    x = torch.cat(
        [
            _render(chunk, gen, size, noise, overlap, jitter, strokes, distractors)
            for chunk in labels.split(4096)
        ]
    )
    return x, labels


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
    x, labels = _strokes_raw(train, test, seed, size, noise, overlap, jitter, strokes, distractors)
    mean = x[:train].mean(dim=(0, 2, 3), keepdim=True)
    std = x[:train].std(dim=(0, 2, 3), keepdim=True)
    x = (x - mean) / std
    return Dataset(
        "strokes",
        x[:train].contiguous(),
        labels[:train].contiguous(),
        x[train:].contiguous(),
        labels[train:].contiguous(),
        NUM_STROKE_CLASSES,
    )


def _splits(
    cfg: StudyConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
) -> Dataset:
    """Hold ``cfg.val_size`` of the training file out, standardize every channel with the
    pool's statistics, and keep the split runs are evaluated on (``cfg.evaluate``)."""
    if cfg.val_size:
        if cfg.val_size >= len(y):
            raise ValueError(
                f"val_size {cfg.val_size} leaves no training images of the {len(y)} there are"
            )
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.data_seed))
        val, pool = order[: cfg.val_size], order[cfg.val_size :].sort().values
        val_x, val_y, x, y = x[val], y[val], x[pool], y[pool]
    if cfg.train_size is not None and cfg.train_size > len(y):
        raise ValueError(
            f"train_size {cfg.train_size} exceeds the {len(y)} training images left after "
            f"holding out {cfg.val_size} for validation"
        )
    x = x.float()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True)
    if cfg.evaluate == "val":
        test_x, test_y = val_x, val_y
    return Dataset(
        cfg.data,
        ((x - mean) / std).contiguous(),
        y.contiguous(),
        ((test_x.float() - mean) / std).contiguous(),
        test_y.contiguous(),
        num_classes,
        evaluated_on=cfg.evaluate,
        run_size=cfg.train_size,
    )


def fetch(cfg: StudyConfig, data_dir: str | None, download_url: str | None) -> None:
    """Download the data set first when it can be and ``download_url`` is given ("" meaning
    the official address); the generated and Debian-packaged sets need nothing."""
    if download_url is None:
        return
    if cfg.data not in cifar.CIFAR:
        raise ValueError(
            f"--download fetches CIFAR only; {cfg.data} is "
            + ("generated" if cfg.data == "strokes" else f"installed: {fashion.INSTALL_HINT}")
        )
    if data_dir is None:
        raise ValueError(f"--download needs --data-dir DIR to put {cfg.data} in")
    cifar.download(Path(data_dir), cfg.data, url=download_url or None)


def load_dataset(cfg: StudyConfig, data_dir: str | None) -> Dataset:
    """The study's data: generated (``strokes``) or read from ``data_dir`` (Fashion-MNIST: by
    default where Debian installs it; CIFAR: the torchvision layout), split as the module
    docstring says."""
    if cfg.data == "strokes":
        n_train = (cfg.train_size or 10000) + cfg.val_size
        n_test = cfg.test_size or 2000
        x, y = _strokes_raw(n_train, n_test, cfg.data_seed, cfg.image_size)
        return _splits(cfg, x[:n_train], y[:n_train], x[n_train:], y[n_train:], NUM_STROKE_CLASSES)
    if cfg.data == "fashion-mnist":
        tx, ty, vx, vy = fashion.read_fashion_mnist(data_dir or fashion.DEFAULT_DIR)
        tx, vx = tx[:, None], vx[:, None]  # (n, 1, 28, 28)
        classes = fashion.NUM_CLASSES
    else:
        if data_dir is None:
            raise ValueError(
                f"--data {cfg.data} reads the torchvision folder layout from "
                f"--data-dir DIR (add --download to fetch it)"
            )
        tx, ty, vx, vy, classes = cifar.read_cifar(Path(data_dir), cfg.data)
    if cfg.test_size is not None and cfg.test_size > len(vy):
        raise ValueError(
            f"--test-size {cfg.test_size}: {cfg.data} has {len(vy)} test images; give at most "
            f"{len(vy)} (or leave it out for all)"
        )
    nte = len(vy) if cfg.test_size is None else cfg.test_size
    return _splits(
        cfg,
        torch.from_numpy(np.ascontiguousarray(tx)).float() / 255,
        torch.from_numpy(ty),
        torch.from_numpy(np.ascontiguousarray(vx[:nte])).float() / 255,
        torch.from_numpy(vy[:nte]),
        classes,
    )
