"""``groupnorm study``: the batch-size study from the command line.

groupnorm study --quick --out runs/quick     # the README's command: 2 CPU cores, < 15 min
groupnorm study --out runs/full              # the pre-registered study on Fashion-MNIST
groupnorm study --tune --lr 0.1 --out runs/t # a recipe candidate, on the validation split
groupnorm study --report runs/quick          # re-render report.md and the PNGs
torchrun --nproc-per-node 2 --no-python groupnorm study --quick --out runs/ddp  # devices
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from groupnorm.study.config import (
    DATASETS,
    NORMS,
    PRESETS,
    TUNING_SEEDS,
    StudyConfig,
    with_overrides,
)
from groupnorm.study.results import read_results
from groupnorm.study.runner import run_study

__all__ = ["add_arguments", "run"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return _once(values, text)


def _once(values: tuple[Any, ...], text: str) -> tuple[Any, ...]:
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} given more than once in {text!r}")
    return values


def _norms(text: str) -> tuple[str, ...]:
    values = tuple(text.split(","))
    bad = [v for v in values if v not in NORMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown norm(s) {bad}; choose from {NORMS}")
    return _once(values, text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    presets = p.add_mutually_exclusive_group()
    presets.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="preset",
        help="the quick preset (= --preset quick): 2 CPU cores, under 15 minutes",
    )
    presets.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="full (default: the pre-registered study on Fashion-MNIST, 8 seeds), quick, tiny",
    )
    p.add_argument("--out", type=Path, help="results, config and report (default runs/<preset>)")
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="only re-render DIR/report.md and its plots from DIR/results.jsonl (no other "
        "option but --no-progress)",
    )
    p.add_argument(
        "--data",
        choices=DATASETS,
        help="strokes (generated; the quick preset's), fashion-mnist (the full preset's), "
        "cifar10, cifar100",
    )
    p.add_argument(
        "--image-size", type=int, help="side of the generated strokes images in px (default 12)"
    )
    p.add_argument(
        "--data-dir",
        help="fashion-mnist: the idx files' folder (default /usr/share/datasets/fashion-mnist, "
        "where Debian's dataset-fashion-mnist puts them); cifar: the folder holding "
        "cifar-10-batches-py/ or cifar-100-python/",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch the CIFAR archive into --data-dir first (MD5-checked)",
    )
    p.add_argument("--download-url", help="fetch the archive from this address instead")
    p.add_argument("--norms", type=_norms, help=f"arms, comma-separated, from {NORMS}")
    p.add_argument("--batches", type=_ints, help="images per device N, e.g. 32,16,8,4,2")
    p.add_argument("--seeds", type=int, help="number of seeds (0 .. K-1)")
    p.add_argument(
        "--tune",
        action="store_true",
        help=f"choose a recipe: evaluate on the validation split held out of the training "
        f"images, never the test set, with the tuning seeds {TUNING_SEEDS} (or "
        f"--seeds K: {TUNING_SEEDS[0]} .. {TUNING_SEEDS[0]}+K-1), never reported ones",
    )
    p.add_argument("--val-size", type=int, help="training images held out for --tune")
    p.add_argument(
        "--sweep",
        action="store_true",
        default=None,
        help="add the GN sweep over G and channels per group at N=32",
    )
    p.add_argument("--gn-groups", type=int, help="G of the GN arm")
    p.add_argument(
        "--workers",
        type=int,
        help="devices W: one step sees W x N images, BN statistics per N (emulated "
        "in one process; under torchrun the world size)",
    )
    p.add_argument("--epochs", type=int, help="epochs, the same for every N")
    p.add_argument("--lr", type=float, help="learning rate at N=32 (scaled by N/32)")
    p.add_argument("--width", type=int, help="ResNet base width (stages w, 2w, 4w)")
    p.add_argument("--train-size", type=int, help="training images (CIFAR default: all)")
    p.add_argument("--test-size", type=int, help="test images (CIFAR default: all)")
    p.add_argument(
        "--jobs", type=int, help="runs in parallel (default: one per CPU core, one on a GPU)"
    )
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The preset's config with every option the user gave applied on top."""
    cfg = PRESETS[args.preset or "full"]
    changes: dict[str, Any] = {}
    for name in (
        "data",
        "train_size",
        "test_size",
        "val_size",
        "gn_groups",
        "sweep",
        "image_size",
    ):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        first = TUNING_SEEDS[0] if args.tune else 0
        if not args.tune and args.seeds > TUNING_SEEDS[0]:
            raise ValueError(
                f"--seeds {args.seeds} would report seeds up to {args.seeds - 1}, and "
                f"{TUNING_SEEDS[0]} and up are the tuning seeds (--tune): at most "
                f"{TUNING_SEEDS[0]} seeds"
            )
        changes["seeds"] = tuple(range(first, first + args.seeds))
    elif args.tune:
        changes["seeds"] = TUNING_SEEDS
    if args.tune:
        changes["evaluate"] = "val"
        if not changes.get("val_size", cfg.val_size):
            raise ValueError(
                f"--tune evaluates on a validation split, and the {args.preset or 'full'} "
                "preset holds none: give --val-size (training images held out, e.g. 64)"
            )
    if args.norms is not None or args.batches is not None:
        batches = args.batches or tuple(
            sorted({n for b in cfg.arms.values() for n in b}, reverse=True)
        )
        changes["arms"] = {norm: batches for norm in (args.norms or tuple(cfg.arms))}
    for name in ("workers", "epochs", "lr", "width"):
        if getattr(args, name) is not None:
            changes[f"train_{name}"] = getattr(args, name)
    if args.data in ("cifar10", "cifar100") and args.train_size is None:
        changes.update(train_size=None, test_size=args.test_size)
    return with_overrides(cfg, **changes)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:
        raise  # the reader of stdout went away (`| head`): groupnorm.cli.main ends quietly
    except (ValueError, OSError) as e:  # OSError: --out or the data where they cannot be
        print(f"groupnorm study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is how a study is paused: every finished run is already in results.jsonl
        # (appended whole as it finished), so a traceback would only hide that.
        print(f"groupnorm study: {_interrupted(args)}", file=sys.stderr)
        return 130


def _out_dir(args: argparse.Namespace) -> Path:
    return args.out or Path("runs") / (args.preset or "full")


# Every option but --report and --no-progress, by its dest: what a run uses and --report not.
RUN_OPTIONS = {
    "preset": "--preset/--quick",
    "out": "--out",
    "data": "--data",
    "image_size": "--image-size",
    "data_dir": "--data-dir",
    "download": "--download",
    "download_url": "--download-url",
    "norms": "--norms",
    "batches": "--batches",
    "seeds": "--seeds",
    "tune": "--tune",
    "val_size": "--val-size",
    "sweep": "--sweep",
    "gn_groups": "--gn-groups",
    "workers": "--workers",
    "epochs": "--epochs",
    "lr": "--lr",
    "width": "--width",
    "train_size": "--train-size",
    "test_size": "--test-size",
    "jobs": "--jobs",
    "device": "--device",
}


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest)
    # `is`, not `in`: 0 == False, and --seeds 0 is given
    return value is not None and value is not False and not (dest == "device" and value == "auto")


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot become the study's folder before any work (the data check
    can take minutes): without it, ``[Errno 17] File exists`` came after loading the data.
    Creates nothing, so that a refused call leaves nothing behind."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out}: a link to nothing ({os.readlink(out)}); give a folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file of that name exists; give a folder for the study")
    for parent in out.parents:
        if parent.is_dir():
            if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--out {out}: cannot create it in {parent} (no permission)")
            break
        if parent.exists():
            raise ValueError(
                f"--out {out}: {parent} is a file, not a folder; give a path under a folder"
            )
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable")


def _interrupted(args: argparse.Namespace) -> str:
    if args.report is not None:
        return f"interrupted while rendering {args.report / 'report.md'}; rerun to render it"
    out = _out_dir(args)
    try:
        n = len(read_results(out))
        saved = f"{n} run{'' if n == 1 else 's'} saved"
    except (ValueError, OSError):  # a damaged results file: the rerun names what is wrong
        saved = "finished runs are saved"
    return f"interrupted: {saved} in {out}; rerun the same command to resume"


def _run(args: argparse.Namespace) -> int:
    from groupnorm.study.report import render_report

    if args.report is not None:
        given = [flag for dest, flag in RUN_OPTIONS.items() if _given(args, dest)]
        if given:
            raise ValueError(
                f"--report re-renders DIR's report from its results.jsonl and config.json "
                f"alone, so {', '.join(given)} would change nothing: drop "
                f"{'it' if len(given) == 1 else 'them'}, or run the study without --report"
            )
        text = render_report(args.report)
        print(text)
        print(f"wrote {args.report / 'report.md'}")
        return 0
    cfg = config_from_args(args)
    if cfg.data != "strokes" and args.image_size is not None:
        size = 28 if cfg.data == "fashion-mnist" else 32
        raise ValueError(
            f"--image-size sets the generated strokes images; {cfg.data} images "
            f"are {size} x {size} as published"
        )
    if cfg.data == "strokes" and (args.download or args.data_dir):
        raise ValueError(
            "--data-dir and --download are for --data fashion-mnist, cifar10 or cifar100; the "
            "default data (strokes) is generated, not read"
        )
    if args.download_url is not None and not args.download:
        raise ValueError(
            "--download-url needs --download: it is where --download fetches the archive "
            "from; add --download, or drop --download-url"
        )
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    out = _out_dir(args)
    _check_out(out)
    download_url = (args.download_url or "") if args.download else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from groupnorm.study.distributed import run_distributed

        return run_distributed(
            cfg,
            out,
            data_dir=args.data_dir,
            download_url=download_url,
            device=args.device,
            progress=not args.no_progress,
        )
    records = run_study(
        cfg,
        out,
        data_dir=args.data_dir,
        download_url=download_url,
        jobs=args.jobs,
        device=args.device,
        progress=not args.no_progress,
    )
    text = render_report(out)
    print(text)
    print(f"{len(records)} runs in {out}/results.jsonl; report in {out}/report.md")
    if cfg.data == "strokes":
        print(
            "note: generated strokes images make a demonstration, not the evidence (the quick "
            "recipe was chosen on test error); the evidence is `groupnorm study --preset full` "
            "on Fashion-MNIST, a pre-registered protocol (docs/study.md)"
        )
    return 0
