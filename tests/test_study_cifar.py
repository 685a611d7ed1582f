"""The CIFAR reader: torchvision's folder layout, real pickle format, MD5 checks, download."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from groupnorm.study import cifar
from groupnorm.study.config import StudyConfig
from groupnorm.study.data import load_dataset
from tests._tolerances import assert_matches


def _write(path: Path, obj: object) -> str:
    """Pickle ``obj`` as the CIFAR files are (protocol 2, str keys written as bytes); return
    the file's MD5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake(
    root: Path, name: str, rng: np.random.Generator, per_file: int = 6
) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """A small file set in the real layout; returns (sums, first train images, all labels)."""
    spec = cifar.CIFAR[name]
    folder = root / spec.folder
    sums: dict[str, str] = {}
    images, labels = [], []
    for f in spec.train + spec.test:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        y = rng.integers(0, spec.num_classes, per_file).tolist()
        entry = {b"data": data, spec.label_key: y, b"batch_label": f.encode()}
        sums[f] = _write(folder / f, entry)
        images.append(data)
        labels.append(y)
    meta_key = b"label_names" if name == "cifar10" else b"fine_label_names"
    sums[spec.meta] = _write(folder / spec.meta, {meta_key: [b"a"] * spec.num_classes})
    return sums, np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reader_reads_the_torchvision_layout(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    sums, images, labels = _fake(tmp_path, name, rng)
    tx, ty, vx, vy, classes = cifar.read_cifar(tmp_path, name, md5=sums)
    n_train = 6 * len(cifar.CIFAR[name].train)
    assert classes == cifar.CIFAR[name].num_classes
    assert tx.shape == (n_train, 3, 32, 32) and vx.shape == (6, 3, 32, 32)
    # Channel-major rows: the first 1024 bytes are the red plane.
    assert np.array_equal(tx.reshape(n_train, -1), images[:n_train])
    assert np.array_equal(tx[0, 0, 0], images[0, :32])
    assert np.array_equal(np.concatenate([ty, vy]), labels)


def test_wrong_md5_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sums, _, _ = _fake(tmp_path, "cifar10", rng)
    bad = dict(sums, data_batch_3="0" * 32)
    with pytest.raises(ValueError, match=r"data_batch_3: MD5 .* does not match"):
        cifar.read_cifar(tmp_path, "cifar10", md5=bad)
    # The production table holds the published sums: a fake file fails against it.
    with pytest.raises(ValueError, match=r"batches\.meta: MD5"):
        cifar.read_cifar(tmp_path, "cifar10")


def test_published_sums_are_the_official_ones() -> None:
    assert cifar.CIFAR["cifar10"].archive_md5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar.CIFAR["cifar10"].md5["test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert cifar.CIFAR["cifar100"].archive_md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert cifar.CIFAR["cifar100"].md5["train"] == "16019d7e3df5f24257cddd939b257f8d"


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-100-python/ as torchvision"):
        cifar.read_cifar(tmp_path, "cifar100")
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset(StudyConfig(data="cifar10"), None)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        del format, args


def _archive(src: Path, folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / folder, arcname=folder)
    return buf.getvalue()


def test_download_fetches_checks_and_unpacks(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, www = server
    rng = np.random.default_rng(2)
    sums, images, _ = _fake(tmp_path / "src", "cifar10", rng)
    blob = _archive(tmp_path / "src", "cifar-10-batches-py")
    (www / "c10.tar.gz").write_bytes(blob)
    good = hashlib.md5(blob).hexdigest()
    dest = tmp_path / "data"
    folder = cifar.download(dest, "cifar10", url=f"{url}/c10.tar.gz", archive_md5=good)
    assert folder == dest / "cifar-10-batches-py"
    tx, *_ = cifar.read_cifar(dest, "cifar10", md5=sums)
    assert np.array_equal(tx.reshape(len(tx), -1), images[: len(tx)])
    # A corrupted archive is refused and nothing is unpacked.
    (www / "bad.tar.gz").write_bytes(blob[:-10] + b"0123456789")
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz from .* has MD5"):
        cifar.download(other, "cifar10", url=f"{url}/bad.tar.gz", archive_md5=good)
    assert not (other / "cifar-10-batches-py").exists()
    # The published sum is the default: this fake archive does not have it.
    with pytest.raises(ValueError, match="c58f30108f718f92721af3b95e74349a"):
        cifar.download(tmp_path / "third", "cifar10", url=f"{url}/c10.tar.gz")


def test_load_dataset_standardizes_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    rng = np.random.default_rng(3)
    sums, images, labels = _fake(tmp_path, "cifar100", rng, per_file=12)
    monkeypatch.setitem(
        cifar.CIFAR, "cifar100", dataclasses.replace(cifar.CIFAR["cifar100"], md5=sums)
    )
    data = load_dataset(StudyConfig(data="cifar100", train_size=10, test_size=None), str(tmp_path))
    assert data.num_classes == 100 and data.in_channels == 3
    # The pool is every training image; each run draws train_size = 10 of them.
    assert data.train_x.shape == (12, 3, 32, 32) and data.test_x.shape == (12, 3, 32, 32)
    assert data.run_size == 10 and len(data.run_indices(0)) == 10
    mean = data.train_x.double().mean(dim=(0, 2, 3))
    assert mean.abs().max() < 1e-5  # standardized with the pool's images
    raw = images[:12].reshape(12, 3, 32, 32).astype(np.float64) / 255
    expected = (raw - raw.mean(axis=(0, 2, 3), keepdims=True)) / raw.std(
        axis=(0, 2, 3), ddof=1, keepdims=True
    )
    assert_matches(
        data.train_x, expected, torch.float32, reduction=12 * 1024, what="standardized CIFAR"
    )
    assert data.test_y.tolist() == labels[12:].tolist()
