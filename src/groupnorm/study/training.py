"""One training run of the study, following Wu & He (2018) section 4.1, scaled down.

Protocol: SGD with momentum 0.9; learning rate ``lr * N / 32`` for N images per (virtual)
device, the same number of epochs for every N; the rate drops 10x at 50 % and 75 % of the
steps; weight decay on every parameter, gamma and beta included. One SGD step sees
``workers * N`` samples; BatchNorm's statistics are computed per N-sample chunk (per device),
GroupNorm never looks across samples. Test error is measured in eval mode (BN with
its running statistics); the run's metric is the median of the last ``eval_epochs`` epochs, as
the paper reports the median of its last 5 (only
those epochs are evaluated, to save time). Train error is the running error of the same
epochs, in train mode (as the paper's training curves).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from groupnorm.study.data import Dataset
from groupnorm.study.models import (
    GROUP_NORMS,
    NORMS,
    ResNet,
    WSConv2d,
    make_norm,
    reestimate_bn,
    set_synchronized,
    set_virtual_devices,
)

__all__ = ["ARM_NAMES", "RunSpec", "TrainConfig", "evaluate", "train_run"]

ARM_NAMES = {
    "bn": "BN",
    "syncbn": "SyncBN",
    "gn": "GN",
    "ln": "LN",
    "in": "IN",
    "gnws": "GN+WS",
    "bnpop": "BN (pop. stats)",
}


@dataclass(frozen=True)
class TrainConfig:
    """What every run of one study shares."""

    epochs: int = 14
    lr: float = 0.2  # at N = 32 images per device; scaled by N / 32
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on all parameters, gamma and beta included (the paper)
    workers: int = 8  # W: devices (emulated in one process, or real with DDP);
    #                                 the paper's 8. The presets use 4: see runner.PRESETS.
    width: int = 16  # ResNet widths (w, 2w, 4w)
    blocks: int = 1  # basic blocks per stage
    eval_epochs: int = 3  # metric = median test error of the last this-many epochs
    warmup: float = 0.1  # fraction of the steps with a linear warm-up

    def __post_init__(self) -> None:
        for name in ("epochs", "workers", "width", "blocks", "eval_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_epochs > self.epochs:
            raise ValueError(
                f"eval_epochs ({self.eval_epochs}) cannot exceed epochs ({self.epochs})"
            )
        if not 0 <= self.warmup < 0.5:
            raise ValueError(f"warmup is a fraction of the steps in [0, 0.5), got {self.warmup}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr="
                f"{self.lr}, weight_decay={self.weight_decay}, "
                f"momentum={self.momentum}"
            )


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


def build_model(spec: RunSpec, cfg: TrainConfig, data: Dataset) -> nn.Module:
    torch.manual_seed(spec.seed)
    return ResNet(
        make_norm(spec.norm, spec.groups, spec.group_size),
        width=cfg.width,
        blocks=cfg.blocks,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        conv=WSConv2d if spec.norm == "gnws" else nn.Conv2d,
    )


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the steps (Goyal et al. 2017, for
    the large rates of large steps), ``base`` until 50 % of the steps, /10, then /100 from 75 %.
    """
    ramp = min(1.0, (step + 1) / max(1.0, warmup * total))
    return ramp * base * (0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4)))


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 500
) -> float:
    """Error (%) of ``model`` in eval mode on (x, y)."""
    model.eval()
    wrong = 0
    for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
        wrong += int((model(xb.to(device)).argmax(1) != yb.to(device)).sum())
    return 100.0 * wrong / len(y)


def _average_buffers(model: nn.Module, world: int) -> None:
    """Average every BN running buffer over the devices: what the emulation's running
    statistics are (the mean of per-chunk updates), so that eval matches it."""
    import torch.distributed as dist

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf.div_(world)


def train_run(
    spec: RunSpec,
    cfg: TrainConfig,
    data: Dataset,
    device: torch.device,
    *,
    progress: Callable[[int, int], None] | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Train one run; return its record (spec, per-epoch errors, medians of the last epochs).

    Single process (``world == 1``): ``cfg.workers`` devices are emulated, BN statistics per
    N-chunk of each W*N step. Distributed (``world > 1``, torch.distributed initialized, one
    process per device, ``cfg.workers == world``): DistributedDataParallel; every rank draws
    the same W*N indices per step and takes chunk ``rank``, so each device sees exactly the
    chunk the emulation would give it. ``progress(done_steps, total_steps)`` after every step.
    """
    if world > 1 and cfg.workers != world:
        raise ValueError(
            f"a distributed run needs workers == world size, got workers="
            f"{cfg.workers} with {world} processes"
        )
    model = build_model(spec, cfg, data).to(device)
    if world == 1:
        # BN arms: statistics per N-chunk; SyncBN: over the whole W*N step (one chunk).
        set_virtual_devices(model, cfg.workers if spec.norm in ("bn", "bnpop") else 1)
    else:
        set_virtual_devices(model, 1)  # each process is one device
        set_synchronized(model, spec.norm == "syncbn")
    step_batch = cfg.workers * spec.batch
    per_epoch = len(data.train_y) // step_batch
    if per_epoch < 1:
        raise ValueError(
            f"the training set ({len(data.train_y)} images) is smaller than one "
            f"step ({cfg.workers} workers x {spec.batch} images)"
        )
    total = per_epoch * cfg.epochs
    base_lr = cfg.lr * spec.batch / 32
    opt = torch.optim.SGD(
        model.parameters(),
        lr=base_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )
    net: nn.Module = model
    if world > 1:
        # broadcast_buffers=False: each device keeps its own BN running statistics, as in the
        # paper; they are averaged before each evaluation.
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    test_err: list[float] = []
    train_err: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    step = 0
    for epoch in range(cfg.epochs):
        net.train()
        order = torch.randperm(len(data.train_y), generator=gen)[: per_epoch * step_batch]
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        for idx in order.view(per_epoch, step_batch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, base_lr, cfg.warmup)
            if world > 1:
                idx = idx[rank * spec.batch : (rank + 1) * spec.batch]
            xb, yb = data.train_x[idx].to(device), data.train_y[idx].to(device)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{spec.key}: loss is {loss.item()} at step {step}")
            wrong += (logits.argmax(1) != yb).sum()
            step += 1
            if progress is not None:
                progress(step, total)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(wrong)
            _average_buffers(model, world)
        train_err.append(100.0 * int(wrong) / len(order))
        if epoch >= cfg.epochs - cfg.eval_epochs:  # only these epochs enter the metric
            if spec.norm == "bnpop":
                reestimate_bn(model, data.train_x, device)
            test_err.append(evaluate(model, data.test_x, data.test_y, device))
    return {
        "key": spec.key,
        "spec": asdict(spec),
        "label": spec.label,
        "test_error": statistics.median(test_err),
        "train_error": statistics.median(train_err[-cfg.eval_epochs :]),
        "test_error_per_epoch": test_err,
        "train_error_per_epoch": train_err,
        "steps": total,
        "seconds": time.perf_counter() - start,
        # CPU time of this process: on a shared machine, what the run would take alone.
        "cpu_seconds": time.process_time() - cpu_start,
        "device": str(device),
        "processes": world,
    }
