"""The study's configuration: what one run is (:class:`RunSpec`), what every run of a study
shares (:class:`TrainConfig`), the study itself (:class:`StudyConfig`), its presets and the arm
names. Nothing here imports the rest of the study, so data, models, training, runner and report
all import from here and never from each other's configuration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ARM_NAMES",
    "BATCH_NORMS",
    "DATASETS",
    "GROUP_NORMS",
    "NORMS",
    "PRESETS",
    "SPLITS",
    "RunSpec",
    "StudyConfig",
    "TrainConfig",
    "with_overrides",
]

NORMS = ("bn", "syncbn", "gn", "ln", "in", "gnws")
BATCH_NORMS = ("bn", "syncbn")
GROUP_NORMS = ("gn", "gnws")  # the arms that take G or channels per group
ARM_NAMES = {
    "bn": "BN",
    "syncbn": "SyncBN",
    "gn": "GN",
    "ln": "LN",
    "in": "IN",
    "gnws": "GN+WS",
}
# Not an arm of its own: every BN run is also evaluated with population statistics re-estimated
# over its training images (same weights, so the difference isolates the running statistics).
POP_ARM = "BN (pop. stats)"
DATASETS = ("strokes", "fashion-mnist", "cifar10", "cifar100")
SPLITS = ("test", "val")


@dataclass(frozen=True)
class TrainConfig:
    """What every run of one study shares."""

    epochs: int = 14
    lr: float = 0.2  # at N = 32 images per device; scaled by N / 32
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on all parameters, gamma and beta included (the paper)
    workers: int = 8  # W: devices (emulated in one process, or real with DDP); the paper's 8
    width: int = 16  # ResNet widths (w, 2w, 4w)
    blocks: int = 1  # basic blocks per stage
    eval_epochs: int = 3  # metric = median error of the last this-many epochs
    warmup: float = 0.1  # fraction of the steps with a linear warm-up

    def __post_init__(self) -> None:
        for name in ("epochs", "workers", "width", "blocks", "eval_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_epochs > self.epochs:
            raise ValueError(
                f"the metric is the median error of the last {self.eval_epochs} epochs (the "
                f"preset's eval_epochs), more than the {self.epochs} epochs asked: give "
                f"--epochs >= {self.eval_epochs}"
            )
        if not 0 <= self.warmup < 0.5:
            raise ValueError(f"warmup is a fraction of the steps in [0, 0.5), got {self.warmup}")
        if not (0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf) or not (
            0 <= self.momentum < 1
        ):
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr="
                f"{self.lr}, weight_decay={self.weight_decay}, "
                f"momentum={self.momentum}"
            )

    @property
    def stage_widths(self) -> tuple[int, int, int]:
        return (self.width, 2 * self.width, 4 * self.width)


@dataclass(frozen=True)
class RunSpec:
    """One cell of the study and one seed: which norm, how many images per device, which G."""

    norm: str
    batch: int  # N: images per device
    seed: int
    groups: int | None = None  # gn: G
    group_size: int | None = None  # gn: channels per group (instead of G)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.batch < 1:
            raise ValueError(f"batch (images per device) must be >= 1, got {self.batch}")
        grouped = self.norm in GROUP_NORMS
        if grouped and (self.groups is None) == (self.group_size is None):
            raise ValueError(f"a {self.norm} run takes exactly one of groups or group_size")
        if not grouped and (self.groups is not None or self.group_size is not None):
            raise ValueError(f"groups/group_size only apply to {GROUP_NORMS}, not {self.norm}")

    @property
    def key(self) -> str:
        """A stable identity: the results file holds at most one finished run per key."""
        g = f"-G{self.groups}" if self.groups is not None else ""
        g += f"-cpg{self.group_size}" if self.group_size is not None else ""
        return f"{self.norm}{g}-N{self.batch}-s{self.seed}"

    @property
    def label(self) -> str:
        """The arm's name in tables and plots."""
        return (
            ARM_NAMES[self.norm]
            + (f" (G={self.groups})" if self.groups is not None else "")
            + (f" ({self.group_size} ch/group)" if self.group_size is not None else "")
        )


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study's results (saved to ``OUT/config.json``).

    Data: ``val_size`` images are held out of the training file (a fixed draw, ``data_seed``)
    for recipe choices; the rest is the pool, and each seed trains on its own draw of
    ``train_size`` images from it (None: the whole pool), so the intervals over seeds include
    the sampling of the training data. ``evaluate``: ``test`` (the study) or ``val`` (choosing a
    recipe: every error is then measured on the held-out images, never on the test set).
    """

    data: str = "strokes"
    train_size: int | None = 10000
    test_size: int | None = 2000  # None: the whole test set
    val_size: int = 0
    data_seed: int = 0
    image_size: int = 12  # strokes images are image_size x image_size
    arms: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {
            "bn": (32, 16, 8, 4, 2),
            "gn": (32, 16, 8, 4, 2),
            "ln": (32, 16, 8, 4, 2),
            "in": (32, 16, 8, 4, 2),
        }
    )
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sweep: bool = False  # GN over G and channels per group at N = 32
    gn_groups: int = 16  # the GN arm's G, capped at each layer's channel count
    evaluate: str = "test"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for norm, batches in self.arms.items():
            if norm not in NORMS:
                raise ValueError(f"unknown arm {norm!r}; arms are {NORMS}")
            if not batches or any(n < 1 for n in batches):
                raise ValueError(f"arm {norm}: batch sizes must be positive, got {batches}")
        if not self.seeds:
            raise ValueError("a study needs at least one seed")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 px, got {self.image_size}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data {self.data!r}; choose one of {DATASETS}")
        if self.evaluate not in SPLITS:
            raise ValueError(f"evaluate must be one of {SPLITS}, got {self.evaluate!r}")
        if self.evaluate == "val" and self.val_size < 1:
            raise ValueError("evaluate='val' needs a validation split: set val_size >= 1")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        for name in ("train_size", "test_size"):
            size = getattr(self, name)
            if size is not None and size < 1:
                raise ValueError(f"{name} must be >= 1 (or None: all images), got {size}")
        if self.gn_groups < 1:
            raise ValueError(f"gn_groups (--gn-groups) must be >= 1, got {self.gn_groups}")
        for c in self.train.stage_widths:
            if c % min(self.gn_groups, c):
                raise ValueError(
                    f"gn_groups (--gn-groups) {self.gn_groups} does not divide the stage width {c} "
                    f"(widths {self.train.stage_widths}); the GN arm needs a G that divides each, "
                    "or at least the width"
                )

    def channels_per_group(self) -> tuple[int, ...]:
        """The GN arm's channels per group in each stage (G capped at the stage's width)."""
        return tuple(c // min(self.gn_groups, c) for c in self.train.stage_widths)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["arms"] = {k: list(v) for k, v in self.arms.items()}
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StudyConfig:
        d = dict(d)
        d["arms"] = {k: tuple(v) for k, v in d["arms"].items()}
        d["seeds"] = tuple(d["seeds"])
        d["train"] = TrainConfig(**d["train"])
        return cls(**d)


def with_overrides(cfg: StudyConfig, **changes: Any) -> StudyConfig:
    """``cfg`` with its own fields replaced, and TrainConfig's given as ``train_<name>``.

    StudyConfig's names win: ``train_size`` is the study's, not a TrainConfig ``size``.
    """
    own = {f.name for f in fields(StudyConfig)}
    top = {k: v for k, v in changes.items() if k in own}
    train = {k.removeprefix("train_"): v for k, v in changes.items() if k not in own}
    return replace(cfg, train=replace(cfg.train, **train), **top)


# The quick preset (the README's command: strokes, 2 CPU cores, 7-16 minutes) is a
# demonstration, not the evidence: its recipe (W = 4, lr 0.2, 12 px, G = 16) was chosen on test
# error (8,000 images x 14 epochs, cut to fit its time); docs/study.md says so. Its results
# (docs/study-quick) reproduce bit for bit on the machine and software stack that made them
# (docs/study.md: not on another). The evidence is the "full" preset, a pre-registered
# protocol (groupnorm.study.protocol) on Fashion-MNIST; its recipe is stated in FULL_RECIPE.
_QUICK_RECIPE = TrainConfig(epochs=12, lr=0.2, workers=4)
FULL_RECIPE = TrainConfig(epochs=18, lr=0.1, workers=4, width=8, eval_epochs=1)
# Tuning seeds are never reported seeds: a recipe is chosen with seeds from 100 up on the
# validation split (``--tune``), the study reports seeds 0 .. 7 on the test set.
TUNING_SEEDS = (100, 101)
PRESETS: dict[str, StudyConfig] = {
    "full": StudyConfig(
        data="fashion-mnist",
        train_size=8000,
        test_size=None,
        val_size=5000,
        image_size=28,
        arms={
            "bn": (32, 16, 8, 4, 2),
            "gn": (32, 16, 8, 4, 2),
            "ln": (32,),
            "in": (32,),
            "syncbn": (2,),
        },
        seeds=tuple(range(8)),
        gn_groups=4,
        train=FULL_RECIPE,
    ),
    "quick": StudyConfig(
        # 6,000 images, 12 epochs, three seeds: 8,000 x 14 x 4 seeds took 18.5 minutes on 2
        # idle cores of this machine, x 3 seeds 15.2 and 8,000 x 12 x 3 16.0 (its speed varies
        # by 20 % between runs), over the 15 the preset is for.
        train_size=6000,
        arms={"bn": (32, 8, 2), "gn": (32, 8, 2), "ln": (32,), "in": (32,)},
        seeds=(0, 1, 2),
        train=_QUICK_RECIPE,
    ),
    "tiny": StudyConfig(
        train_size=256,
        test_size=64,
        arms={"bn": (4, 2), "gn": (4, 2)},
        seeds=(0, 1),
        train=TrainConfig(epochs=2, workers=2, width=4, eval_epochs=1),
    ),
}
