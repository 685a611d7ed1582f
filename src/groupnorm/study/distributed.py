"""The study on real devices: ``torchrun --nproc-per-node K groupnorm study ...``.

One process per device, DistributedDataParallel (gloo on the CPU, nccl on GPUs), W = K: every
step sees K x N images, each process normalizes its own N with BatchNorm (per device, as in the
paper), or all K x N with the ``syncbn`` arm. Every rank trains every run of the plan in the
same order; rank 0 alone reads and writes ``OUT/results.jsonl`` and the report, and tells the
others which runs are left, so resuming works as in one process.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from groupnorm.study.config import StudyConfig, with_overrides
from groupnorm.study.data import load_dataset
from groupnorm.study.results import append_result
from groupnorm.study.runner import (
    checked_data,
    nothing_left,
    only_writer,
    pick_device,
    plan_runs,
    prepare,
)
from groupnorm.study.training import train_run

__all__ = ["run_distributed"]


def run_distributed(
    cfg: StudyConfig,
    out: Path,
    *,
    data_dir: str | None = None,
    download_url: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> int:
    """Run the study's remaining runs with one process per device (torchrun's environment)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device, local_rank)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        with contextlib.ExitStack() as held:
            if cfg.train.workers != world:
                cfg = with_overrides(cfg, train_workers=world)
            _run_ranks(cfg, out, held, rank, world, dev, data_dir, download_url, progress)
            # Every rank here before any tears gloo down: a teardown while a peer is still
            # connected and working aborted processes now and then in the tests' gloo groups.
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _run_ranks(
    cfg: StudyConfig,
    out: Path,
    held: contextlib.ExitStack,
    rank: int,
    world: int,
    dev: torch.device,
    data_dir: str | None,
    download_url: str | None,
    progress: bool,
) -> None:
    """Rank 0 checks the data, takes the folder (``held`` keeps it until the study ends) and
    tells the others the runs left, or the error that stopped it, which every rank raises."""
    told: list[object] = [None]
    if rank == 0:
        try:
            if not nothing_left(cfg, out):  # a finished study needs no data
                checked_data(cfg, data_dir, download_url)  # before any rank reads the files
            held.enter_context(only_writer(out))
            told = [[s.key for s in prepare(cfg, out)]]
        except (ValueError, OSError) as e:
            told = [e]
    dist.broadcast_object_list(told, src=0)
    keys = told[0]
    if isinstance(keys, BaseException):
        raise keys
    assert isinstance(keys, list)
    specs = [s for s in plan_runs(cfg) if s.key in set(keys)]
    if specs:  # a finished study needs no data
        data = load_dataset(cfg, data_dir)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        for i, spec in enumerate(specs):
            record = train_run(spec, cfg.train, data, dev, rank=rank, world=world)
            if rank == 0:
                append_result(out, record)
                if progress:
                    print(
                        f"[{i + 1}/{len(specs)}] {record['key']:>18}: test "
                        f"{record['test_error']:5.1f} %  train {record['train_error']:5.1f} %"
                        f"  ({record['seconds']:.0f} s, {world} processes)",
                        flush=True,
                    )
    if rank == 0:
        from groupnorm.study.report import render_report

        render_report(out)
        print(f"report in {out}/report.md", flush=True)
