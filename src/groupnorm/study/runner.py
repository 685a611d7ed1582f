"""Plan, run and resume a study: every (arm, N, seed) run is trained once, in parallel processes
where cores allow, and appended to ``OUT/results.jsonl`` the moment it finishes.

Resuming: ``OUT/config.json`` is written when a study starts, after its data and options are
checked; a later call with the same ``--out`` reads it, refuses a different configuration
(naming the fields that differ) or results without it, skips every run already in the results
file and runs the rest. ``OUT/.running`` holds the writing process's id while a study runs, so
a second study on the same folder is refused (under torchrun too). A run whose loss diverges is
not recorded; the others finish and are, then the study stops with an error. Any other error in
a run stops the study: runs not started are cancelled, those running finish and are recorded.
Ctrl-C (KeyboardInterrupt) cancels the runs not started and stops the running ones at their
next step, unrecorded.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from groupnorm.study.config import GROUP_NORMS, RunSpec, StudyConfig
from groupnorm.study.data import Dataset, fetch, load_dataset
from groupnorm.study.results import RESULTS, append_result, read_results, repair
from groupnorm.study.training import train_run

__all__ = [
    "checked_data",
    "nothing_left",
    "only_writer",
    "pick_device",
    "plan_runs",
    "prepare",
    "run_study",
]

CONFIG = "config.json"
SWEEP_GROUPS = (1, 2, 4, 8, 16, 32)
SWEEP_GROUP_SIZES = (1, 2, 4, 8, 16, 32)


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
        if read_results(out):
            raise ValueError(
                f"{out / RESULTS} holds finished runs but {path} is missing, so the "
                "configuration they were trained with is unknown and a different one would mix "
                "with them unseen; restore config.json, or use a new --out"
            )
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


def pick_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: a CUDA device where there is one, else the CPU. Under torchrun
    (``local_rank`` given) a CUDA request means this process's own GPU, made current.
    Raises ValueError for anything but auto, cpu and an existing CUDA device."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:K, got {requested!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {requested}: this machine has {count} CUDA device(s)")
    if local_rank is not None and device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def checked_data(cfg: StudyConfig, data_dir: str | None, download_url: str | None) -> Dataset:
    """Fetch (where asked) and load the study's data, and check that one step of every planned
    run fits in a seed's training images: before anything is written to the study's folder,
    so that a refused call leaves nothing a corrected one would be refused for."""
    fetch(cfg, data_dir, download_url)
    data = load_dataset(cfg, data_dir)
    images = len(data.run_indices(cfg.seeds[0]))  # the same count for every seed
    most = max(s.batch for s in plan_runs(cfg))
    if cfg.train.workers * most > images:
        raise ValueError(
            f"a step of {cfg.train.workers} devices x N = {most} images needs "
            f"{cfg.train.workers * most} training images, and each run has {images}: lower "
            "--workers or the largest N (--batches), or raise --train-size"
        )
    return data


def prepare(cfg: StudyConfig, out: Path) -> list[RunSpec]:
    """The prologue every way of running shares: create ``out``, save or check the config,
    cut a torn last line off the results and return the planned runs not yet finished."""
    out.mkdir(parents=True, exist_ok=True)
    save_or_check_config(out, cfg)
    cut = repair(out)
    if cut:
        print(
            f"{out / RESULTS}: cut off a partial last line ({cut} bytes), a run a crash "
            "interrupted while it was recorded; it runs again",
            file=sys.stderr,
        )
    finished = {r["key"] for r in read_results(out)}
    return [s for s in plan_runs(cfg) if s.key not in finished]


def nothing_left(cfg: StudyConfig, out: Path) -> bool:
    """Whether ``out`` already holds every planned run of ``cfg`` (read only: writes nothing).

    A resumed study with nothing left to run needs no data, and loading it (fetching, decoding
    a data set, checking every run's step) is then wasted. A folder with another configuration
    is not "done": the usual path refuses it with the differences.
    """
    path = Path(out) / CONFIG
    if not path.exists() or json.loads(path.read_text()) != cfg.to_json():
        return False
    finished = {r["key"] for r in read_results(out)}
    return all(s.key in finished for s in plan_runs(cfg))


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
    cfg_json: dict[str, Any],
    data_dir: str | None,
    device: str,
    threads: int,
    progress: Any,
    stop: Any,
) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (through ``stop``),
    # so that a worker neither prints its own traceback nor goes on to the next queued run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    cfg = StudyConfig.from_json(cfg_json)
    _WORKER.update(
        cfg=cfg,
        data=load_dataset(cfg, data_dir),
        device=torch.device(device),
        progress=progress,
        stop=stop,
        parent=os.getppid(),
    )


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    q = _WORKER["progress"]
    per_step = _step_work(spec, _WORKER["cfg"])

    def report(step: int, total: int) -> None:
        if os.getppid() != _WORKER["parent"]:
            os._exit(1)  # the study was killed: its unfinished run would be thrown away anyway
        if _WORKER["stop"].is_set():
            raise KeyboardInterrupt  # the study was interrupted: the same, and the parent lives
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


def _work(spec: RunSpec, cfg: StudyConfig, data: Dataset) -> int:
    steps = len(data.run_indices(spec.seed)) // (cfg.train.workers * spec.batch) * cfg.train.epochs
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
    dev = pick_device(device)  # before prepare writes anything
    if nothing_left(cfg, out):
        return read_results(out)
    data = checked_data(cfg, data_dir, download_url)
    with only_writer(out):
        return _run_study(cfg, out, dev, data, data_dir, jobs, progress)


RUNNING = ".running"


@contextlib.contextmanager
def only_writer(out: Path) -> Iterator[None]:
    """Hold ``out/.running`` (this process's id) while the study writes to ``out``: two
    studies on one folder ran every run twice, and the report took the duplicates for extra
    seeds (an interval 2.6x too narrow). A file left by a process that is gone is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUNNING
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = path.read_text().strip()
            if owner.isdigit() and _alive(int(owner)):
                raise FileExistsError(
                    f"another study (process {owner}) is writing to {out}; wait for it to "
                    f"finish or give another --out (or delete {path} if no study runs)"
                ) from None
            path.unlink(missing_ok=True)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_study(
    cfg: StudyConfig,
    out: Path,
    dev: torch.device,
    data: Dataset,
    data_dir: str | None,
    jobs: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    todo = prepare(cfg, out)
    if not todo:
        return read_results(out)
    jobs = min(jobs or default_jobs(dev), len(todo))
    all_runs = len(plan_runs(cfg))
    finished = all_runs - len(todo)
    bar = _bar(sum(_work(s, cfg, data) for s in todo), finished, all_runs, progress)
    done = finished

    def finish(record: dict[str, Any]) -> None:
        nonlocal done
        append_result(out, record)
        done += 1
        bar.set_description_str(f"runs {done}/{all_runs}")
        # test_error holds the error on the split the run was evaluated on (val under --tune).
        split = "val" if record.get("evaluated_on") == "val" else "test"
        bar.write(
            f"{record['key']:>18}: {split} {record['test_error']:5.1f} %  train "
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
    failed: dict[str, BaseException] = {}
    for spec in todo:
        per_step = _step_work(spec, cfg)

        def advance(step: int, total: int, k: int = per_step) -> None:
            bar.update(k)

        try:
            finish(train_run(spec, cfg.train, data, dev, progress=advance))
        except FloatingPointError as e:
            failed[spec.key] = e
    _raise_failed(failed)


def _raise_failed(failed: dict[str, BaseException]) -> None:
    """After every other run finished and was recorded: the runs that raised (a diverged
    loss raises FloatingPointError), none of them recorded. The protocol has no rule for a
    diverged run, so the study stops short of a report rather than pick one."""
    if failed:
        lines = "; ".join(str(failed[key]) for key in sorted(failed))
        raise ValueError(
            f"{len(failed)} run(s) failed and were not recorded ({lines}); every other run is "
            "in results.jsonl. The protocol has no rule for them (docs/study.md): decide one "
            "before reading the results"
        )


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
    interrupted = ctx.Event()
    threads = max(1, default_jobs(torch.device("cpu")) // jobs) if dev.type == "cpu" else 1
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(progress_queue, bar, stop), daemon=True)
    drainer.start()
    try:
        with ProcessPoolExecutor(
            jobs,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(cfg.to_json(), data_dir, str(dev), threads, progress_queue, interrupted),
        ) as pool:
            keys = {pool.submit(_worker_run, s): s.key for s in todo}
            failed: dict[str, BaseException] = {}
            fatal: BaseException | None = None
            try:
                for fut in _as_finished(set(keys)):
                    if fut.cancelled():
                        continue
                    error = fut.exception()
                    if isinstance(error, FloatingPointError):
                        failed[keys[fut]] = error  # the others go on and are recorded
                    else:
                        try:
                            finish(fut.result())  # result() raises the run's own error
                        except Exception as e:
                            # A run's error (any but divergence) or one recording it: the
                            # queued runs are cancelled, the running ones finish and are
                            # recorded, then it is raised.
                            fatal = fatal or e
                            for queued in keys:
                                queued.cancel()
            except BaseException:
                # Ctrl-C (or any error here): leaving the pool waits for its work, so the
                # running runs stop at their next step and the queued ones are cancelled (a
                # run already handed to a worker stops at its first); none would be recorded.
                interrupted.set()
                for queued in keys:
                    queued.cancel()
                raise
        if fatal is not None:
            raise fatal
        _raise_failed(failed)
    finally:
        stop.set()
        drainer.join()


def _as_finished(pending: set[Future[dict[str, Any]]]) -> Iterator[Future[dict[str, Any]]]:
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        yield from done
