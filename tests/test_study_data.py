"""The generated default data (strokes) and how the study's config reaches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from groupnorm.cli import main
from groupnorm.study.config import PRESETS, StudyConfig, with_overrides
from groupnorm.study.data import load_dataset, make_strokes


def test_strokes_are_reproducible_balanced_and_standardized() -> None:
    a = make_strokes(200, 50, seed=3, size=10)
    b = make_strokes(200, 50, seed=3, size=10)
    assert a.train_x.shape == (200, 3, 10, 10) and a.test_x.shape == (50, 3, 10, 10)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, make_strokes(200, 50, seed=4, size=10).train_x)
    counts = torch.bincount(torch.cat([a.train_y, a.test_y]), minlength=10)
    assert counts.tolist() == [25] * 10
    mean = a.train_x.mean(dim=(0, 2, 3))
    std = a.train_x.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-5, rtol=0)


def test_the_config_sets_the_image_size() -> None:
    cfg = with_overrides(PRESETS["tiny"], image_size=9)
    assert load_dataset(cfg, None).train_x.shape[2:] == (9, 9)
    assert PRESETS["quick"].image_size == 12
    with pytest.raises(ValueError, match="image_size must be at least 8 px, got 4"):
        StudyConfig(image_size=4)


@pytest.mark.parametrize(("data", "size"), [("cifar10", 32), ("fashion-mnist", 28)])
def test_image_size_is_refused_for_published_data(
    capsys: pytest.CaptureFixture[str], data: str, size: int
) -> None:
    """(Regression: Fashion-MNIST's images were said to be 32 x 32.)"""
    assert main(["study", "--data", data, "--data-dir", "x", "--image-size", "16"]) == 2
    assert f"{data} images are {size} x {size}" in capsys.readouterr().err


def test_regression_too_few_epochs_for_the_metric_names_the_flag() -> None:
    """The error named eval_epochs, which no flag sets."""
    with pytest.raises(ValueError, match="last 3 epochs .* give --epochs >= 3"):
        with_overrides(PRESETS["quick"], train_epochs=2)


def test_a_study_from_before_image_size_is_not_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its images were 16 x 16: resuming with today's 12 x 12 would mix two data sets.
    old = PRESETS["tiny"].to_json()
    del old["image_size"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert main(["study", "--preset", "tiny", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "image_size: None in config.json, 12 now" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:K, got 'bogus'"),
        (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:K, got 'mps'"),
        (["--lr", "nan"], "need lr > 0"),
        (["--lr", "inf"], "need lr > 0"),
        (["--test-size", "0"], "test_size must be >= 1"),
        (["--train-size", "0"], "train_size must be >= 1"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--jobs", "-1"], "--jobs must be >= 1, got -1"),
        (["--gn-groups", "0"], "gn_groups (--gn-groups) must be >= 1, got 0"),
        (["--gn-groups", "3"], "gn_groups (--gn-groups) 3 does not divide the stage width 4"),
    ],
)
def test_regression_study_refuses_bad_values_before_writing_anything(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these trained with the value, ended in a traceback, or (--device) wrote
    config.json first; --test-size 0 ran on 2000 test images and recorded 0; --gn-groups 0
    wrote config.json first, and --gn-groups 3 (no divisor of the stage widths) trained the BN
    arm before the GN model failed to build."""
    out = tmp_path / "out"
    assert main(["study", "--preset", "tiny", "--no-progress", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_regression_study_refuses_cuda_where_there_is_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["study", "--preset", "tiny", "--out", str(out), "--device", "cuda"]) == 2
    assert "--device cuda: this machine has 0 CUDA device(s)" in capsys.readouterr().err
    assert not out.exists()


def test_regression_study_reports_an_unusable_out_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where --out's parent folder should be ended in a NotADirectoryError traceback."""
    (tmp_path / "file").write_text("")
    assert main(["study", "--preset", "tiny", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "groupnorm study: error: " in capsys.readouterr().err


def test_train_size_is_the_studys_not_the_trainers() -> None:
    # "train_size" starts like the train_<name> overrides of TrainConfig, yet is StudyConfig's.
    cfg = with_overrides(PRESETS["tiny"], train_size=100, train_epochs=3)
    assert (cfg.train_size, cfg.train.epochs) == (100, 3)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_reaches_exactly_its_total(
    tmp_path: Path, jobs: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from groupnorm.study.runner import run_study

    # 1 epoch of 64 images: 8 steps at N=4 and 16 at N=2, 2 devices; in-process and in a pool.
    cfg = with_overrides(
        PRESETS["tiny"],
        train_size=64,
        test_size=16,
        seeds=(0,),
        arms={"gn": (4, 2)},
        train_epochs=1,
    )
    run_study(cfg, tmp_path, jobs=jobs, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    finals = [line for line in bar if line.startswith("runs 2/2")]
    assert finals and "100%" in finals[-1], bar[-3:]


def test_regression_a_test_size_beyond_the_test_set_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--test-size above the dataset's test images was cut to them silently, while the report
    printed the number asked for."""
    import numpy as np

    from groupnorm.study import fashion

    def small(*_: object, **__: object) -> tuple[np.ndarray, ...]:
        images = np.zeros((50, 28, 28), dtype=np.uint8)
        return images, np.zeros(50, dtype=np.int64), images[:20], np.zeros(20, dtype=np.int64)

    monkeypatch.setattr(fashion, "read_fashion_mnist", small)
    cfg = with_overrides(PRESETS["tiny"], data="fashion-mnist", train_size=20, test_size=30)
    with pytest.raises(ValueError, match="--test-size 30: fashion-mnist has 20 test images"):
        load_dataset(cfg, None)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--quick", "--preset", "tiny"], "not allowed with argument"),
        (["--norms", "gn,gn"], "gn given more than once"),
        (["--batches", "2,4,2"], "2 given more than once"),
        (["--seeds", "101"], "100 and up are the tuning seeds"),
    ],
)
def test_regression_conflicting_study_options_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], match: str
) -> None:
    """--quick with --preset took the last one, a norm or batch given twice passed, and
    --seeds 101 without --tune made tuning seed 100 a reported one."""
    code: object
    try:
        code = main(["study", *args, "--out", str(tmp_path / "s")])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("file", "--out {out}: a file of that name exists; give a folder for the study"),
        ("file/out", "--out {out}: {tmp}/file is a file, not a folder"),
        ("file/a/b", "--out {out}: {tmp}/file is a file, not a folder"),
        ("dangling", "--out {out}: a link to nothing ({tmp}/nowhere); give a folder"),
    ],
)
def test_regression_an_unusable_out_is_named_before_any_work(
    out: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--out afile (an existing file) said "[Errno 17] File exists: 'afile'" and --out
    /etc/passwd/x "[Errno 20] Not a directory", neither naming --out, both after the data
    were fetched and loaded (minutes for CIFAR with --download)."""
    from groupnorm.study import runner

    def no_data(*args: object) -> None:
        raise AssertionError("the data were loaded before --out was checked")

    monkeypatch.setattr(runner, "checked_data", no_data)
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    path = tmp_path / out
    assert main(["study", "--preset", "tiny", "--no-progress", "--out", str(path)]) == 2
    assert message.format(out=path, tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--preset", "tiny", "--out", "{out}", "--download-url", "https://example.org/c"],
            "--download-url needs --download",
        ),
        (["--report", "{out}", "--quick"], "so --preset/--quick would change nothing: drop it"),
        (["--report", "{out}", "--out", "{out}"], "so --out would change nothing: drop it"),
        (["--report", "{out}", "--epochs", "3"], "so --epochs would change nothing: drop it"),
        (["--report", "{out}", "--tune", "--seeds", "2"], "so --seeds, --tune would change"),
        (["--report", "{out}", "--device", "cpu"], "so --device would change nothing"),
        (["--report", "{out}", "--seeds", "0"], "so --seeds would change nothing"),  # 0 == False
    ],
)
def test_regression_options_the_study_would_ignore_are_refused(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--download-url without --download was accepted and ignored (the study ran on the data
    already there), and --report DIR ignored every other option (--report DIR --epochs 3
    re-rendered DIR as it was)."""
    out = tmp_path / "out"
    assert main(["study", "--no-progress", *(a.format(out=out) for a in args)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_regression_tune_without_a_validation_split_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tune on a preset without a validation split said "evaluate='val' needs a validation
    split: set val_size >= 1", naming the config field, not the --val-size flag."""
    out = tmp_path / "out"
    assert main(["study", "--preset", "tiny", "--tune", "--no-progress", "--out", str(out)]) == 2
    assert "the tiny preset holds none: give --val-size" in capsys.readouterr().err
    assert not out.exists()
