"""Plan, run and resume a study: every (arm, N, seed) run is trained once, in parallel processes
where cores allow, and appended to ``OUT/results.jsonl`` the moment it finishes.

Resuming: ``OUT/config.json`` is written when a study starts; a later call with the same
``--out`` reads it, refuses a different configuration (naming the fields that differ), skips every
run already in the results file and runs the rest.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from groupnorm.study.data import Dataset, load_dataset
from groupnorm.study.models import GROUP_NORMS, NORMS
from groupnorm.study.results import append_result, read_results, repair
from groupnorm.study.training import RunSpec, TrainConfig, train_run

__all__ = ["PRESETS", "StudyConfig", "plan_runs", "run_study"]

CONFIG = "config.json"
SWEEP_GROUPS = (1, 2, 4, 8, 16, 32)
SWEEP_GROUP_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study's results (saved to ``OUT/config.json``)."""

    data: str = "strokes"
    train_size: int | None = 10000  # None: the whole training set (CIFAR)
    test_size: int | None = 2000
    data_seed: int = 0
    image_size: int = 12  # strokes images are image_size x image_size (CIFAR: 32)
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


# Presets. "quick" is the README's command (2 CPU cores, under 15 minutes; the cells the four
# checks need, 4 seeds); "full" is every arm at every N, 5 seeds and the G sweep with the same
# recipe (a GPU, or hours of CPU); "tiny" is for tests. The recipe, from single-seed probes on the
# 2-core machine (docs/study.md has the numbers):
# - W = 4 devices, not the paper's 8: with fixed epochs the N = 32 arm then takes twice the
#   steps, and at this budget it needs them (earlier tuning with W = 8 and 10 epochs: GN at
#   N = 32 ended at 26.9 %, at N = 2 at 20-23 %).
# - lr 0.2 at N = 32: at 0.4, LN's runs were unstable (26.7-33.0 % over 5 seeds) and hid the
#   IN-vs-LN order; at 0.2 LN trained better and IN fell to last.
# - 12 x 12 images: the last stage is 3 x 3, so at N = 2 BatchNorm estimates each statistic
#   from 18 values (32 at 16 x 16): BN's N = 2 penalty was 8 points instead of 4, and a seed
#   costs about 0.76 of a 16 x 16 seed (0.6 for the N = 32 runs, 0.9 for N = 2), which pays
#   for the fourth seed.
# - GN with G = 16 (1, 2 and 4 channels per group in the 16-, 32- and 64-channel stages):
#   at G = 8 the N = 32 arm ended 3 points behind N = 2 (under-trained, 18.7 vs 13.8 % train
#   error); at G = 16 it matched that N = 2 arm (16 x 16 probes).
_RECIPE = TrainConfig(epochs=14, lr=0.2, workers=4)
PRESETS: dict[str, StudyConfig] = {
    "full": StudyConfig(train_size=8000, sweep=True, train=_RECIPE),
    "quick": StudyConfig(
        train_size=8000,
        arms={"bn": (32, 8, 2), "gn": (32, 8, 2), "ln": (32,), "in": (32,)},
        seeds=(0, 1, 2, 3),
        train=_RECIPE,
    ),
    "tiny": StudyConfig(
        train_size=256,
        test_size=64,
        arms={"bn": (4, 2), "gn": (4, 2)},
        seeds=(0, 1),
        train=TrainConfig(epochs=2, workers=2, width=4, eval_epochs=1),
    ),
}


def plan_runs(cfg: StudyConfig) -> list[RunSpec]:
    """Every run of the study, seed-major (an interrupted study has whole cells at fewer seeds)
    and small N first within a seed (the longest runs start first)."""
    specs: dict[str, RunSpec] = {}
    for seed in cfg.seeds:
        cells: list[RunSpec] = []
        for norm, batches in cfg.arms.items():
            for n in batches:
                g = cfg.gn_groups if norm in GROUP_NORMS else None
                cells.append(RunSpec(norm, n, seed, groups=g))
        if cfg.sweep:
            cells += [RunSpec("gn", 32, seed, groups=g) for g in SWEEP_GROUPS]
            cells += [RunSpec("gn", 32, seed, group_size=s) for s in SWEEP_GROUP_SIZES]
        for spec in sorted(cells, key=lambda s: s.batch):
            specs.setdefault(spec.key, spec)
    return list(specs.values())


def save_or_check_config(out: Path, cfg: StudyConfig) -> None:
    """Save the config, or refuse one that differs from the one the study started with."""
    path = out / CONFIG
    mine = cfg.to_json()
    if not path.exists():
        path.write_text(json.dumps(mine, indent=2, sort_keys=True) + "\n")
        return
    saved = json.loads(path.read_text())
    if saved == mine:
        return

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for k, v in d.items():
            items.update(
                flat(v, f"{prefix}{k}.")
                if isinstance(v, dict) and k != "arms"
                else {f"{prefix}{k}": v}
            )
        return items

    a, b = flat(saved), flat(mine)
    diffs = [
        f"{k}: {a.get(k)!r} in {path.name}, {b.get(k)!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    raise ValueError(
        f"{out} holds a study with a different configuration; resuming it with "
        f"these options would mix results. Differences: "
        + "; ".join(diffs)
        + ". Resume with the original options, or use a new --out."
    )


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: the first CUDA device where there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def default_jobs(device: torch.device) -> int:
    """Parallel runs: one per CPU core on the CPU (each run single-threaded: small models
    scale poorly over threads), one on a GPU."""
    if device.type != "cpu":
        return 1
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


# Worker-process state: the dataset is built once per process, not once per run.
_WORKER: dict[str, Any] = {}


def _init_worker(
    cfg_json: dict[str, Any], data_dir: str | None, device: str, threads: int, progress: Any
) -> None:
    torch.set_num_threads(threads)
    cfg = StudyConfig.from_json(cfg_json)
    _WORKER.update(
        cfg=cfg,
        data=load_dataset(cfg, data_dir),
        device=torch.device(device),
        progress=progress,
        parent=os.getppid(),
    )


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    q = _WORKER["progress"]
    per_step = _step_work(spec, _WORKER["cfg"])

    def report(step: int, total: int) -> None:
        if os.getppid() != _WORKER["parent"]:
            os._exit(1)  # the study was killed: its unfinished run would be thrown away anyway
        if step % 20 == 0 or step == total:
            q.put(per_step * (20 if step % 20 == 0 else step % 20))

    return train_run(
        spec, _WORKER["cfg"].train, _WORKER["data"], _WORKER["device"], progress=report
    )


# The progress bar counts work, not images: a step costs a fixed overhead plus its images. In
# the quick preset on the 2-core CPU machine a step took about 4.0 ms + 0.164 ms per image (N=2:
# 5.3 ms for 8 images; N=32: 25 ms for 128), an overhead worth ~24 images. Counted in images
# alone, the first ETAs (the small-N runs go first) were twice the real time.
STEP_OVERHEAD_IMAGES = 24


def _step_work(spec: RunSpec, cfg: StudyConfig) -> int:
    return cfg.train.workers * spec.batch + STEP_OVERHEAD_IMAGES


def _work(spec: RunSpec, cfg: StudyConfig, data_len: int) -> int:
    steps = data_len // (cfg.train.workers * spec.batch) * cfg.train.epochs
    return steps * _step_work(spec, cfg)


def _bar(total: int, done_runs: int, all_runs: int, enabled: bool) -> Any:
    from tqdm import tqdm  # the study extra; imported here so the library never needs it

    return tqdm(
        total=total,
        disable=not enabled,
        dynamic_ncols=True,
        desc=f"runs {done_runs}/{all_runs}",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left",
    )


def run_study(
    cfg: StudyConfig,
    out: Path,
    *,
    data_dir: str | None = None,
    download_url: str | None = None,
    jobs: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every planned run not yet in ``out/results.jsonl``; return all finished records.

    ``download_url``: fetch CIFAR first ("" = the official address; None = no download).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_or_check_config(out, cfg)
    repair(out)
    finished = {r["key"] for r in read_results(out)}
    todo = [s for s in plan_runs(cfg) if s.key not in finished]
    if not todo:
        return read_results(out)
    dev = pick_device(device)
    jobs = min(jobs or default_jobs(dev), len(todo))
    data = load_dataset(cfg, data_dir, download_url=download_url)
    all_runs = len(finished) + len(todo)
    bar = _bar(
        sum(_work(s, cfg, len(data.train_y)) for s in todo), len(finished), all_runs, progress
    )
    done = len(finished)

    def finish(record: dict[str, Any]) -> None:
        nonlocal done
        append_result(out, record)
        done += 1
        bar.set_description_str(f"runs {done}/{all_runs}")
        bar.write(
            f"{record['key']:>18}: test {record['test_error']:5.1f} %  train "
            f"{record['train_error']:5.1f} %  ({record['seconds']:.0f} s)"
        )

    try:
        if jobs == 1:
            _run_here(todo, cfg, data, dev, bar, finish)
        else:
            _run_pool(todo, cfg, data_dir, dev, jobs, bar, finish)
    finally:
        bar.close()
    return read_results(out)


def _run_here(
    todo: list[RunSpec],
    cfg: StudyConfig,
    data: Dataset,
    dev: torch.device,
    bar: Any,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    for spec in todo:
        per_step = _step_work(spec, cfg)

        def advance(step: int, total: int, k: int = per_step) -> None:
            bar.update(k)

        finish(train_run(spec, cfg.train, data, dev, progress=advance))


def _drain(q: Any, bar: Any, stop: threading.Event) -> None:
    while not stop.is_set() or not q.empty():
        try:
            bar.update(q.get(timeout=0.2))
        except queue.Empty:
            continue


def _run_pool(
    todo: list[RunSpec],
    cfg: StudyConfig,
    data_dir: str | None,
    dev: torch.device,
    jobs: int,
    bar: Any,
    finish: Callable[[dict[str, Any]], None],
) -> None:
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks
    progress_queue = ctx.Queue()
    threads = max(1, default_jobs(torch.device("cpu")) // jobs) if dev.type == "cpu" else 1
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(progress_queue, bar, stop), daemon=True)
    drainer.start()
    try:
        with ProcessPoolExecutor(
            jobs,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(cfg.to_json(), data_dir, str(dev), threads, progress_queue),
        ) as pool:
            pending: set[Future[dict[str, Any]]] = {pool.submit(_worker_run, s) for s in todo}
            for fut in _as_finished(pending):
                finish(fut.result())
    finally:
        stop.set()
        drainer.join()


def _as_finished(pending: set[Future[dict[str, Any]]]) -> Iterator[Future[dict[str, Any]]]:
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        yield from done


def with_overrides(cfg: StudyConfig, **changes: Any) -> StudyConfig:
    """``cfg`` with its own fields replaced, and TrainConfig's given as ``train_<name>``.

    StudyConfig's names win: ``train_size`` is the study's, not a TrainConfig ``size``.
    """
    own = {f.name for f in fields(StudyConfig)}
    top = {k: v for k, v in changes.items() if k in own}
    train = {k.removeprefix("train_"): v for k, v in changes.items() if k not in own}
    return replace(cfg, train=replace(cfg.train, **train), **top)
