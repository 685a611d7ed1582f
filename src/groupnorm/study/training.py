"""One training run of the study, following Wu & He (2018) section 4.1, scaled down.

Protocol: SGD with momentum 0.9; learning rate ``lr * N / 32`` for N images per (virtual)
device, the same number of epochs for every N; the rate drops 10x at 50 % and 75 % of the
steps; weight decay on every parameter, gamma and beta included. One SGD step sees
``workers * N`` samples; BatchNorm's statistics are computed per N-sample chunk (per device),
GroupNorm never looks across samples. Each run trains on its own seed's draw of training
images (``Dataset.run_indices``). Test and train error are measured in eval mode at the end of
each of the last ``eval_epochs`` epochs (BN with its running statistics; train error on the
run's training images), and the run's metric is their median, as the paper reports the median
of its last 5 epochs. The running train-mode error of every epoch is kept too: for BN at small N
it includes predicting with N-image statistics. BN runs are also evaluated with population
statistics re-estimated over their training images (``pop_test_error``), the same weights with
only the statistics changed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm.study.config import RunSpec, TrainConfig
from groupnorm.study.data import Dataset
from groupnorm.study.models import (
    ResNet,
    make_norm,
    reestimate_bn,
    set_synchronized,
    set_virtual_devices,
)
from groupnorm.ws import WSConv2d

__all__ = ["evaluate", "train_run"]


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
        # BN: statistics per N-chunk; SyncBN: over the whole W*N step (one chunk).
        set_virtual_devices(model, cfg.workers if spec.norm == "bn" else 1)
    else:
        set_virtual_devices(model, 1)  # each process is one device
        set_synchronized(model, spec.norm == "syncbn")
    step_batch = cfg.workers * spec.batch
    mine = data.run_indices(spec.seed)
    train_x, train_y = data.train_x[mine], data.train_y[mine]
    per_epoch = len(train_y) // step_batch
    if per_epoch < 1:
        raise ValueError(
            f"the training set ({len(train_y)} images) is smaller than one "
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
    running_err: list[float] = []
    pop_err: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    step = 0
    for epoch in range(cfg.epochs):
        net.train()
        order = torch.randperm(len(train_y), generator=gen)[: per_epoch * step_batch]
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        for idx in order.view(per_epoch, step_batch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, base_lr, cfg.warmup)
            if world > 1:
                idx = idx[rank * spec.batch : (rank + 1) * spec.batch]
            xb, yb = train_x[idx].to(device), train_y[idx].to(device)
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
        running_err.append(100.0 * int(wrong) / len(order))
        if epoch >= cfg.epochs - cfg.eval_epochs:  # only these epochs enter the metric
            test_err.append(evaluate(model, data.test_x, data.test_y, device))
            train_err.append(evaluate(model, train_x, train_y, device))
            if spec.norm == "bn":
                pop_err.append(_pop_error(model, train_x, data, device))
    record = {
        "key": spec.key,
        "spec": asdict(spec),
        "label": spec.label,
        "evaluated_on": data.evaluated_on,
        "test_error": statistics.median(test_err),
        "train_error": statistics.median(train_err),
        "test_error_per_epoch": test_err,
        "train_error_per_epoch": train_err,
        "running_train_error_per_epoch": running_err,
        "train_images": len(train_y),
        "steps": total,
        "seconds": time.perf_counter() - start,
        # CPU time of this process: on a shared machine, what the run would take alone.
        "cpu_seconds": time.process_time() - cpu_start,
        "device": str(device),
        "processes": world,
        "environment": environment(),
    }
    if pop_err:
        record["pop_test_error"] = statistics.median(pop_err)
        record["pop_test_error_per_epoch"] = pop_err
    return record


@functools.cache
def _source_digest() -> str:
    """The library's version and the first 16 hex digits of a SHA-256 over its source files
    (.py and .c, in path order): the GN, LN and IN arms run this library's own kernels, whose
    arithmetic changed between sittings of one study, and a record must say which code made
    it (a GN run re-run on later code moved by 0.35 points)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".c"):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return f"{groupnorm.__version__}+{digest.hexdigest()[:16]}"


def environment() -> dict[str, str]:
    """What a run's numbers depend on beyond its spec and recipe: the same code gives bitwise
    the same record on one machine and software stack with the same number of threads, not
    across them (bn-N32-s0 of docs/study-quick: 25.05 % when recorded and when re-run on
    2026-12-02, 25.35 % in the preset's single-threaded workers on 2026-12-03)."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?"
            )
    except OSError:
        pass
    return {
        "groupnorm": _source_digest(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu,
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


def _pop_error(
    model: nn.Module, train_x: torch.Tensor, data: Dataset, device: torch.device
) -> float:
    """Test error of a copy of ``model`` whose BN statistics are re-estimated over ``train_x``
    (on one device): the trained model, its running statistics and the main metric are
    untouched."""
    twin = copy.deepcopy(model)
    set_synchronized(twin, False)
    reestimate_bn(twin, train_x, device)
    return evaluate(twin, data.test_x, data.test_y, device)
