"""The Fashion-MNIST idx reader and the study's data splits, on small idx files the tests write."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from groupnorm.cli import main
from groupnorm.study import fashion
from groupnorm.study.config import PRESETS, with_overrides
from groupnorm.study.data import load_dataset


def _idx(values: np.ndarray) -> bytes:
    """idx bytes written by hand: 0, 0, type 0x08, ndim, big-endian sizes, the values."""
    return (
        bytes([0, 0, 8, values.ndim])
        + struct.pack(f">{values.ndim}I", *values.shape)
        + (values.astype(np.uint8).tobytes())
    )


def _write_set(folder: Path, n_train: int, n_test: int, packed: bool) -> dict[str, str]:
    """Four idx files of random images with labels; returns their content SHA-256 sums."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for stem, values in arrays.items():
        data = _idx(values)
        sums[stem] = hashlib.sha256(data).hexdigest()
        if packed:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return sums


@pytest.mark.parametrize("packed", [True, False])
def test_reads_idx_files_gzipped_or_not(tmp_path: Path, packed: bool) -> None:
    sums = _write_set(tmp_path, 30, 12, packed)
    tx, ty, vx, vy = fashion.read_fashion_mnist(tmp_path, sha256=sums)
    assert tx.shape == (30, 28, 28) and vx.shape == (12, 28, 28) and tx.dtype == np.uint8
    assert ty.tolist() == [i % 10 for i in range(30)] and vy.dtype == np.int64
    assert tx[3, 5, 7] == np.random.default_rng(0).integers(0, 256, (30, 28, 28))[3, 5, 7]


def test_parse_idx_checks_the_header() -> None:
    good = _idx(np.arange(6).reshape(2, 3))
    assert fashion.parse_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="not an idx file"):
        fashion.parse_idx(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="idx type 0x0d"):
        fashion.parse_idx(good[:2] + b"\x0d" + good[3:])
    with pytest.raises(ValueError, match=r"shape \(2, 3\) \(6 values\) but 5 bytes"):
        fashion.parse_idx(good[:-1])


def test_a_wrong_or_missing_file_says_what_to_install(tmp_path: Path) -> None:
    sums = _write_set(tmp_path, 20, 10, packed=True)
    with pytest.raises(
        ValueError, match="is not Fashion-MNIST's .*apt-get install dataset-fashion"
    ):
        fashion.read_fashion_mnist(tmp_path)  # the real sums: these files are not the data set
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="neither t10k-labels-idx1-ubyte.gz nor"):
        fashion.read_fashion_mnist(tmp_path, sha256=sums)
    with pytest.raises(FileNotFoundError, match="no folder .*dataset-fashion-mnist"):
        fashion.read_fashion_mnist(tmp_path / "absent")


def test_the_cli_says_how_to_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["study", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "none")]
    assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_splits_and_per_seed_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sums = _write_set(tmp_path, 100, 20, packed=True)
    monkeypatch.setattr(fashion, "FILES", sums)
    cfg = with_overrides(PRESETS["full"], train_size=40, val_size=30, test_size=None)
    data = load_dataset(cfg, str(tmp_path))
    # The pool is the 70 training images not held out, standardized with its own statistics.
    assert data.train_x.shape == (70, 1, 28, 28) and data.test_x.shape == (20, 1, 28, 28)
    assert float(data.train_x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(data.train_x.std()) == pytest.approx(1.0, abs=1e-5)
    # Each seed draws its own 40 distinct pool images, the same ones every time.
    a, b = data.run_indices(0), data.run_indices(1)
    assert len(a) == len(set(a.tolist())) == 40 and not torch.equal(a, b)
    assert torch.equal(a, data.run_indices(0))
    # --tune evaluates on the 30 held-out images (same standardization), none of them in the
    # pool; the pool and the held-out images together are the 100 training images.
    val = load_dataset(with_overrides(cfg, evaluate="val"), str(tmp_path))
    assert val.evaluated_on == "val" and val.test_x.shape == (30, 1, 28, 28)
    assert torch.equal(val.train_x, data.train_x)
    pool = {x.numpy().tobytes() for x in data.train_x}
    held = {x.numpy().tobytes() for x in val.test_x}
    assert len(pool) == 70 and len(held) == 30 and not pool & held
    with pytest.raises(ValueError, match="train_size 80 exceeds the 70 training images"):
        load_dataset(with_overrides(cfg, train_size=80), str(tmp_path))


@pytest.mark.parametrize(
    "damage",
    [
        lambda gz: b"no",  # not gzip at all
        lambda gz: gz[: len(gz) // 2],  # cut short
        lambda gz: gz[:10] + bytes(b ^ 0xFF for b in gz[10:-8]) + gz[-8:],  # corrupt data
    ],
    ids=["not-gzip", "truncated", "corrupt"],
)
def test_regression_a_damaged_gz_file_is_named_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any
) -> None:
    """A damaged train-images-idx3-ubyte.gz gave "groupnorm study: error: Not a gzipped file
    (b'no')" (no file named), and a truncated or corrupt one an EOFError or zlib.error
    traceback."""
    _write_set(tmp_path, 20, 10, packed=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    args = ["study", "--data", "fashion-mnist", "--data-dir", str(tmp_path), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a readable gzip file" in err and "delete it" in err, err
    assert not (tmp_path / "out").exists()
